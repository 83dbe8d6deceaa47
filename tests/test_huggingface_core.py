"""The core on Hugging Face models: BatchEncoding/dict inputs, ModelOutput, dict training sets.

Tiny BERT and GPT-2 built from configs (float64, no dropout, right padding with attention
masks, a tokenizer made in code). Every view is checked for completeness against the real model
output, and the data view against an independent brute-force computation that tokenizes each
training sample alone (no padding) and differentiates it with plain autograd.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call

from captum_explaind import (
    ExactPathKernel,
    ParameterInfluence,
    PredictionSimilarity,
    StepInfluence,
    TrainingDataInfluence,
)
from captum_explaind.epk import DataDecomposition, EPKOptions, Reconstruction, ScoreResult

import hf_models as hf

pytestmark = pytest.mark.filterwarnings("ignore:vmap .* does not work:RuntimeWarning")

TOL = 1e-9


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    tok = hf.make_tokenizer()
    texts = hf.sentences(8, seed=1)
    train = hf.DictDataset(hf.classification_rows(tok, texts))
    model = hf.tiny_bert()
    traj = hf.record(model, train, hf.PadCollate(), hf.classification_loss, tmp_path_factory.mktemp("bert"))
    test_texts = hf.sentences(3, seed=7)
    enc = tok(test_texts, padding=True, return_tensors="pt")
    return tok, model, traj, train, test_texts, enc


def _truth_change(model, traj, enc, target):
    inputs = dict(enc)
    f0 = hf.outputs_at(model, traj, 0, inputs)
    fN = hf.outputs_at(model, traj, traj.num_steps, inputs)
    idx = torch.as_tensor(target).view(-1, 1)
    return f0, fN, (fN - f0).gather(1, idx).squeeze(1)


def test_batch_encoding_reconstructs_the_real_logits_and_padding_changes_nothing(bert_run):
    tok, model, traj, _, texts, enc = bert_run
    epk = ExactPathKernel(model, traj)
    parts = epk.reconstruct(enc)  # a BatchEncoding: passed by keyword, ids and mask stay integers
    f0, fN, _ = _truth_change(model, traj, enc, [0, 0, 0])
    assert torch.allclose(parts.initial, f0, atol=1e-12) and torch.allclose(parts.final, fN, atol=1e-12)
    total = parts.initial + parts.kernel + parts.regularization + parts.buffers + parts.other
    assert (parts.final - total).abs().max() <= TOL
    assert (parts.delta).abs().max() <= TOL
    # Longer right padding (masked) must not change any part.
    longer = tok(texts, padding="max_length", max_length=10, return_tensors="pt")
    again = epk.reconstruct(dict(longer))
    for name in ("initial", "kernel", "regularization", "final"):
        assert torch.allclose(getattr(again, name), getattr(parts, name), atol=1e-10), name


def test_tuple_inputs_go_positionally_and_mappings_by_keyword(bert_run):
    _, model, traj, _, _, enc = bert_run
    epk = ExactPathKernel(model, traj)
    by_kw = epk.forward(traj.num_steps, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    # BertForSequenceClassification.forward(input_ids, attention_mask, ...): a tuple is positional
    by_pos = epk.forward(traj.num_steps, (enc["input_ids"], enc["attention_mask"]))
    assert torch.allclose(by_kw, by_pos, atol=1e-12)
    assert enc["input_ids"].dtype == torch.long  # nothing cast the caller's tensors


def test_model_and_training_views_add_up_on_dict_inputs(bert_run):
    _, model, traj, _, _, enc = bert_run
    target = [0, 1, 1]
    _, _, change = _truth_change(model, traj, enc, target)
    layers = ["bert.embeddings", "bert.encoder", "bert.pooler", "classifier"]
    scores, delta = ParameterInfluence(model, traj).attribute(dict(enc), target=target, layers=layers,
                                                              return_convergence_delta=True)
    assert scores.shape == (3, 4)
    assert (scores.sum(1) + delta - change).abs().max() <= TOL and delta.abs().max() <= TOL
    per_param = ParameterInfluence(model, traj).attribute(enc, target=target)
    assert (sum(v.flatten(1).sum(1) for v in per_param.values()) - change).abs().max() <= TOL
    steps, d2 = StepInfluence(model, traj).attribute(enc, target=target, return_convergence_delta=True)
    assert steps.shape == (3, traj.num_steps)
    assert (steps.sum(1) - change).abs().max() <= TOL and d2.abs().max() <= TOL


# ----------------------------------------------------------------------------- brute force
def _flat_grad(model, traj, theta_flat, inputs, scalar):
    """∇_θ scalar(model(θ; **inputs)) by plain autograd on the named parameters."""
    names = list(traj.trainable)
    shapes = [traj.spec[n].shape for n in names]
    th = theta_flat.detach().clone().requires_grad_(True)
    params, start = {}, 0
    for n, s in zip(names, shapes):
        k = int(np.prod(s)) if len(s) else 1
        params[n] = th[start : start + k].view(s)
        start += k
    out = functional_call(model, params, (), inputs)
    (g,) = torch.autograd.grad(scalar(out), th)
    return g


def _theta(traj, s):
    p = traj.params(s)
    return torch.cat([p[n].double().reshape(-1) for n in traj.trainable])


def _bruteforce_data_view(model, traj, train, test_inputs, target, nodes=16, lr=0.05, mu=0.9):
    """Γ(x, k) = Σ_s φ_s(x) · Δ_s^{(k)} for SGD with momentum (no decay, no clipping), each training
    sample tokenized alone; φ_s by 16-point Gauss–Legendre on plain autograd gradients."""
    model = model.double().eval()
    N = traj.num_steps
    xs, ws = np.polynomial.legendre.leggauss(nodes)
    t_nodes, w_nodes = (xs + 1) / 2, ws / 2
    thetas = [_theta(traj, s) for s in range(N + 1)]
    n_test, n_train = test_inputs["input_ids"].shape[0], len(train)
    grads = {}  # (step i, sample k) -> w_{i,k} ∇L_k(θ_{i−1})
    for i in range(1, N + 1):
        rec = traj.record(i)
        for b in rec.batches:
            for k, w in zip(b.indices.tolist(), b.weights.tolist()):
                row = train[k]
                inputs = {"input_ids": torch.as_tensor([row["input_ids"]]),
                          "attention_mask": torch.ones(1, len(row["input_ids"]), dtype=torch.long)}
                y = torch.as_tensor([row["labels"]])
                g = _flat_grad(model, traj, thetas[i - 1], inputs,
                               lambda out, y=y: torch.nn.functional.cross_entropy(out.logits, y))
                grads[(i, k)] = grads.get((i, k), 0) + w * g
    scores = torch.zeros(n_test, n_train, dtype=torch.float64)
    gram = torch.zeros(n_test, n_test, dtype=torch.float64)
    replayed = []
    for s in range(1, N + 1):
        delta_s = thetas[s] - thetas[s - 1]
        shares = torch.zeros(n_train, delta_s.numel(), dtype=torch.float64)
        for (i, k), g in grads.items():
            if i <= s:
                shares[k] += -lr * mu ** (s - i) * g
        replayed.append((shares.sum(0) - delta_s).abs().max().item())
        dense = []  # Γ_s(p, x_q, k) = φ_s(x_q)_p Δ_s^{(k)}_p, [n_train, P] per test input
        for q in range(n_test):
            inp = {k: v[q : q + 1] for k, v in test_inputs.items()}
            phi = sum(w * _flat_grad(model, traj, thetas[s - 1] + t * delta_s, inp,
                                     lambda out, q=q: out.logits[0, target[q]])
                      for t, w in zip(t_nodes, w_nodes))
            scores[q] += shares @ phi
            dense.append(shares * phi.unsqueeze(0))
        flat = torch.stack(dense).reshape(n_test, -1)
        gram = gram + flat @ flat.T  # inner products of the flattened influence tensors (Def. 4.4)
    return scores, max(replayed), gram


def test_data_view_on_a_dict_training_set_equals_bruteforce(bert_run):
    tok, model, traj, train, _, enc = bert_run
    target = [1, 0, 1]
    tdi = TrainingDataInfluence(model, traj, train, hf.classification_loss, collate_fn=hf.PadCollate())
    res = tdi.explain(enc, target=target)
    _, _, change = _truth_change(model, traj, enc, target)
    total = res.scores.sum(1) + res.regularization + res.residual + res.delta
    assert (total - change).abs().max() <= TOL
    assert res.residual.abs().max() <= 1e-10  # the replay explains every update
    assert all(abs(c - 1.0) < 1e-10 for c in res.grad_scale.values())  # no clipping: c = 1
    ref, replay_err, _ = _bruteforce_data_view(model, traj, train, dict(enc), target)
    assert replay_err <= 1e-12  # the brute-force replay itself reproduces every recorded update
    scale = ref.abs().max()
    assert (res.scores - ref).abs().max() <= 1e-9 * max(1.0, float(scale))
    # Padding the replayed training batches to a fixed length changes no score.
    padded = TrainingDataInfluence(model, traj, train, hf.classification_loss, collate_fn=hf.PadCollate(length=12))
    assert torch.allclose(padded.attribute(enc, target=target), res.scores, atol=1e-11)


def test_similarity_on_dict_inputs_equals_the_dense_cosine(bert_run):
    _, model, traj, train, _, enc = bert_run
    sim = PredictionSimilarity(model, traj, train, hf.classification_loss, collate_fn=hf.PadCollate())
    S = sim.attribute(enc, target=[0, 0, 0])
    assert torch.allclose(S.diagonal(), torch.ones(3, dtype=S.dtype), atol=1e-12)
    assert torch.allclose(S, S.T, atol=1e-12)
    # The cosine of the dense steps × parameters × samples influence tensors, built by brute force
    # (each training sample tokenized alone, plain autograd), without the factorization.
    _, _, gram = _bruteforce_data_view(model, traj, train, dict(enc), [0, 0, 0])
    norms = gram.diagonal().sqrt()
    torch.testing.assert_close(S, gram / (norms.unsqueeze(1) * norms.unsqueeze(0)), rtol=0, atol=1e-9)
    assert bool((S.abs() <= 1 + 1e-12).all())
    other = sim.attribute(dict(enc), others=dict(enc), target=[0, 0, 0])
    assert torch.allclose(other, S, atol=1e-12)


# ----------------------------------------------------------------------------- GPT-2
@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    tok = hf.make_tokenizer()
    train = hf.DictDataset(hf.lm_rows(tok, hf.sentences(8, seed=3)))
    model = hf.tiny_gpt2()
    traj = hf.record(model, train, hf.PadCollate(lm=True), hf.lm_loss, tmp_path_factory.mktemp("gpt2"), steps=3)
    return tok, model, traj, train


def test_gpt2_last_token_logits_with_output_fn(gpt2_run):
    tok, model, traj, train = gpt2_run
    texts = hf.sentences(3, seed=11, min_len=4, max_len=4)  # equal length: the last token is real
    enc = tok(texts, return_tensors="pt")
    last = lambda out: out.logits[:, -1]  # noqa: E731
    parts = ExactPathKernel(model, traj, output_fn=last).reconstruct(enc)
    f0 = hf.outputs_at(model, traj, 0, dict(enc))[:, -1]
    fN = hf.outputs_at(model, traj, traj.num_steps, dict(enc))[:, -1]
    assert parts.final.shape == (3, model.config.vocab_size)
    assert torch.allclose(parts.initial, f0, atol=1e-12) and torch.allclose(parts.final, fN, atol=1e-12)
    assert parts.delta.abs().max() <= TOL
    nxt = [5, 6, 7]
    tdi = TrainingDataInfluence(model, traj, train, hf.lm_loss, collate_fn=hf.PadCollate(lm=True), output_fn=last)
    res = tdi.explain(enc, target=nxt)
    change = (fN - f0).gather(1, torch.tensor(nxt).view(-1, 1)).squeeze(1)
    assert (res.scores.sum(1) + res.regularization + res.residual + res.delta - change).abs().max() <= TOL
    assert res.residual.abs().max() <= 1e-10  # per-token loss with -100 labels replays exactly
    si = StepInfluence(model, traj, output_fn=last).attribute(enc, target=nxt)
    assert (si.sum(1) - change).abs().max() <= TOL
    S = PredictionSimilarity(model, traj, train, hf.lm_loss, collate_fn=hf.PadCollate(lm=True),
                             output_fn=last).attribute(enc, target=nxt)
    assert torch.allclose(S.diagonal(), torch.ones(3, dtype=S.dtype), atol=1e-12)


# ----------------------------------------------------------------------------- options and results
def test_options_and_results_round_trip(bert_run, tmp_path):
    _, model, traj, train, _, enc = bert_run
    opts = EPKOptions.preset("fast", nodes=3)
    assert EPKOptions.from_dict(opts.to_dict()) == opts
    assert opts.to_dict()["dtype"] == "float32" and opts.to_dict()["refine"] is False
    epk = ExactPathKernel(model, traj, "exact")
    parts = epk.reconstruct(enc)
    assert parts.options["rtol"] == 1e-10 and parts.stats is not None
    back = Reconstruction.from_dict(parts.to_dict())
    assert torch.equal(back.kernel, parts.kernel) and back.stats.evaluations == parts.stats.evaluations
    parts.save(tmp_path / "rec")
    loaded = Reconstruction.load(tmp_path / "rec")
    assert torch.equal(loaded.delta, parts.delta) and loaded.options == parts.options
    res = StepInfluence(model, traj).explain(enc, target=[0, 1, 0], window=2, layers=["bert", "classifier"])
    assert isinstance(res, ScoreResult)
    assert res.windows == [range(1, 3), range(3, 5)] and res.groups == ["bert", "classifier"]
    res.save(tmp_path / "steps")
    again = ScoreResult.load(tmp_path / "steps")
    assert again.windows == res.windows and torch.equal(again.scores["total"], res.scores["total"])
    dd = TrainingDataInfluence(model, traj, train, hf.classification_loss, collate_fn=hf.PadCollate(),
                               options="fast").explain(enc, target=[0, 1, 0])
    assert dd.options["dtype"] == "float32" and dd.scores.dtype == torch.float32
    rt = DataDecomposition.from_dict(dd.to_dict())
    assert torch.equal(rt.scores, dd.scores) and rt.grad_scale == dd.grad_scale
    with pytest.raises(TypeError, match="unknown option"):
        ExactPathKernel(model, traj, notanoption=1)
    with pytest.raises(ValueError, match="rtol"):
        EPKOptions(rtol=-1.0)
