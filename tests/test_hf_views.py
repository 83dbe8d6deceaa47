"""Every view on models a ``transformers.Trainer`` trained, recorded by ``callbacks=[TrajectoryCallback]``.

Float64 tiny BERT (sequence classification), GPT-2 (causal LM, token-count normalization with
padding and ``-100`` labels) and a ``peft`` LoRA fine-tune of BERT. Each view is complete against
the real model outputs at θ_0 and θ_N; the data view with ``loss_fn=None`` (the model's own loss,
weighted as the Trainer weighted it) equals an independent brute-force AdamW replay that collates
every training row alone (no padding) and differentiates it with plain autograd.
"""

from __future__ import annotations

import pytest
import torch

from captum_explaind import ExactPathKernel, ParameterInfluence, StepInfluence, TrainingDataInfluence
from captum_explaind.adapters.huggingface import (
    ModelLoss,
    TrajectoryCallback,
    layer_groups,
    training_rows,
)

import hf_models as hf

pytestmark = pytest.mark.filterwarnings("ignore:vmap .* does not work:RuntimeWarning")

TOL = 1e-9
ARGS = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=2, max_grad_norm=1.0,
            warmup_steps=1, weight_decay=0.01, learning_rate=2e-3)
# (AdamW's first steps move every weight by ~lr: small enough that Gauss–Legendre needs no refinement)


def _train(model, rows, collate, tmp, **extra):
    cb = TrajectoryCallback(tmp / "traj")
    hf.trainer_run(model, hf.DictDataset(rows), collate, tmp / "out", callbacks=[cb], **{**ARGS, **extra})
    return cb.trajectory


def _logits_at(model, traj, step, inputs):
    return hf.outputs_at(model, traj, step, dict(inputs))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    tok = hf.make_tokenizer()
    texts = hf.sentences(10, seed=5)
    rows = hf.classification_rows(tok, texts)
    model = hf.tiny_bert()
    traj = _train(model, rows, hf.PadCollate(), tmp_path_factory.mktemp("bert"))
    enc = tok(hf.sentences(3, seed=8), padding=True, return_tensors="pt")
    target = torch.tensor([0, 1, 1])
    return tok, texts, rows, model, traj, enc, target


def _change(model, traj, enc, target):
    f0, fN = _logits_at(model, traj, 0, enc), _logits_at(model, traj, traj.num_steps, enc)
    return (fN - f0).gather(1, target.view(-1, 1)).squeeze(1)


def test_bert_reconstruction_is_the_returned_model(bert):
    _, _, _, model, traj, enc, _ = bert
    parts = ExactPathKernel(model, traj).reconstruct(enc)
    with torch.no_grad():
        live = model.eval()(**enc).logits  # the model object the Trainer returns
    assert torch.allclose(parts.final, live, atol=1e-12)
    total = parts.initial + parts.kernel + parts.regularization + parts.buffers + parts.other + parts.delta
    assert (parts.final - total).abs().max() <= TOL and parts.delta.abs().max() <= TOL


def test_layer_groups_partition_the_model_and_add_up(bert):
    _, _, _, model, traj, enc, target = bert
    groups = layer_groups(model)
    assert list(groups) == ["embeddings", "block.0", "final", "head"]
    fine = layer_groups(model, sublayers=True)
    assert list(fine) == ["embeddings", "block.0.attention", "block.0.mlp", "final", "head"]
    for g in (groups, fine):
        names = [n for ns in g.values() for n in ns]
        assert sorted(names) == sorted(traj.trainable) and len(names) == len(set(names))
    assert all("attention" in n for n in fine["block.0.attention"])
    change = _change(model, traj, enc, target)
    scores, delta = ParameterInfluence(model, traj).attribute(enc, target=target, layers=fine,
                                                              return_convergence_delta=True)
    assert list(scores) == list(fine)  # a mapping of groups gives a dict of [n] scores
    assert (torch.stack(list(scores.values()), 1).sum(1) + delta - change).abs().max() <= TOL
    res = StepInfluence(model, traj).explain(enc, target=target, layers=groups)
    total = res.scores["total"]
    assert total.shape == (3, traj.num_steps, len(groups)) and res.groups == list(groups)
    assert (total.sum((1, 2)) + res.delta.sum(1) - change).abs().max() <= TOL


def test_bert_data_view_is_complete_and_equals_brute_force(bert):
    tok, texts, rows, model, traj, enc, target = bert
    tdi = TrainingDataInfluence(model, traj, hf.DictDataset(rows), collate_fn=hf.PadCollate())
    assert isinstance(tdi.loss_fn, ModelLoss)  # loss_fn=None on an HF model: its own loss, per sample
    res = tdi.explain(enc, target=target)
    change = _change(model, traj, enc, target)
    assert torch.allclose(res.change, change, atol=1e-12)
    assert (res.scores.sum(1) + res.regularization + res.residual + res.delta - change).abs().max() <= TOL
    assert res.residual.abs().max() <= 1e-10 * change.abs().max()  # deterministic float64: round-off
    ref, reg = hf.bruteforce_adamw_data_view(model, traj, rows, hf.PadCollate(), dict(enc),
                                             lambda out, r: out.logits[0, target[r]],
                                             lambda out, b: torch.nn.functional.cross_entropy(
                                                 out.logits, b["labels"], reduction="none"))
    assert torch.allclose(res.scores, ref, atol=1e-10 * float(ref.abs().max()), rtol=0)
    assert torch.allclose(res.regularization, reg, atol=1e-12)
    # ... mapped back to dataset rows (text and label)
    top = training_rows(res, [{"text": t, "label": hf.label_of(t)} for t in texts], k=3)
    assert len(top) == 3 and len(top[0]) == 3
    for r, picks in enumerate(top):
        assert picks[0]["score"] == pytest.approx(float(res.scores[r].max()))
        for p in picks:
            assert p["text"] == texts[p["index"]] and p["label"] == rows[p["index"]]["labels"]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    tok = hf.make_tokenizer()
    rows = hf.lm_rows(tok, hf.sentences(10, seed=6, min_len=2, max_len=7))
    model = hf.tiny_gpt2()
    traj = _train(model, rows, hf.PadCollate(lm=True), tmp_path_factory.mktemp("gpt2"))
    prompts = tok(["the movie was", "a plot not", "very nice the"], return_tensors="pt")  # equal lengths
    continuation = torch.tensor([tok.convert_tokens_to_ids(w) for w in ("good", "bad", "movie")])
    return rows, model, traj, dict(prompts), continuation


def _next_token_logprob(out):
    return out.logits[:, -1].log_softmax(-1)


def test_gpt2_token_normalized_data_view_equals_brute_force(gpt2):
    rows, model, traj, prompts, cont = gpt2
    rec = traj.record(1)
    assert all(torch.allclose(mb.weights, rec.batches[0].weights) for mb in rec.batches)  # one window count
    tdi = TrainingDataInfluence(model, traj, hf.DictDataset(rows), collate_fn=hf.PadCollate(lm=True),
                                output_fn=_next_token_logprob)
    res = tdi.explain(prompts, target=cont)
    f = [hf.outputs_at(model, traj, s, prompts)[:, -1].log_softmax(-1).gather(1, cont.view(-1, 1)).squeeze(1)
         for s in (0, traj.num_steps)]
    assert torch.allclose(res.change, f[1] - f[0], atol=1e-12)
    assert (res.scores.sum(1) + res.regularization + res.residual + res.delta - res.change).abs().max() <= TOL
    # the model's float32 loss upcast (logits.float()) rounds the training gradient: a small residual
    assert res.residual.abs().max() <= 1e-5 * res.change.abs().max()
    ref, reg = hf.bruteforce_adamw_data_view(
        model, traj, rows, hf.PadCollate(lm=True), prompts,
        lambda out, r: out.logits[0, -1].log_softmax(-1)[cont[r]],
        lambda out, b: torch.nn.functional.cross_entropy(out.logits[:, :-1].transpose(1, 2), b["labels"][:, 1:],
                                                         ignore_index=-100, reduction="none").sum(1))
    assert torch.allclose(res.scores, ref, atol=1e-10 * float(ref.abs().max()), rtol=0)
    assert torch.allclose(res.regularization, reg, atol=1e-12)


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    peft = pytest.importorskip("peft")
    tok = hf.make_tokenizer()
    texts = hf.sentences(10, seed=5)
    rows = hf.classification_rows(tok, texts)
    base = hf.tiny_bert()
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0,
                          task_type="SEQ_CLS", init_lora_weights=False)
    model = peft.get_peft_model(base, cfg).double()
    traj = _train(model, rows, hf.PadCollate(), tmp_path_factory.mktemp("lora"))
    enc = tok(hf.sentences(3, seed=8), padding=True, return_tensors="pt")
    return rows, model, traj, enc, torch.tensor([0, 1, 1])


def test_lora_records_and_analyses_only_the_adapter(lora):
    rows, model, traj, enc, target = lora
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(traj.trainable) == trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert len(traj.frozen) > len(traj.trainable)  # the frozen base is stored once, at θ_0
    groups = layer_groups(model)
    assert "block.0" in groups and all("lora_" in n for n in groups["block.0"])
    change = _change(model, traj, enc, target)
    per_layer = ParameterInfluence(model, traj).explain(enc, target=target, layers=groups)
    assert (per_layer.scores["total"].sum((1, 2)) + per_layer.delta.sum(1) - change).abs().max() <= TOL
    res = TrainingDataInfluence(model, traj, hf.DictDataset(rows), collate_fn=hf.PadCollate()).explain(
        enc, target=target)
    assert (res.scores.sum(1) + res.regularization + res.residual + res.delta - change).abs().max() <= TOL
    ref, reg = hf.bruteforce_adamw_data_view(model, traj, rows, hf.PadCollate(), dict(enc),
                                             lambda out, r: out.logits[0, target[r]],
                                             lambda out, b: torch.nn.functional.cross_entropy(
                                                 out.logits, b["labels"], reduction="none"))
    assert torch.allclose(res.scores, ref, atol=1e-10 * float(ref.abs().max()), rtol=0)
