"""Tiny Hugging Face models, a tokenizer built in code, dict datasets and recorded runs for the tests.

Everything is made offline: configs with a few units (float64, dropout off, eager attention),
a word-level tokenizer over a fixed vocabulary, and sentences generated from a seed.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from captum_explaind import TrajectoryRecorder  # noqa: E402

WORDS = ["good", "bad", "fine", "awful", "great", "poor", "nice", "sad", "movie", "plot", "the", "a", "very", "not"]
POSITIVE = {"good", "fine", "great", "nice"}


def make_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` (pad id 0, right padding), built in code."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]")
    fast.padding_side = "right"
    return fast


def sentences(n: int, seed: int, min_len: int = 2, max_len: int = 6) -> List[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (k,), generator=g).tolist()
        out.append(" ".join(WORDS[i] for i in idx))
    return out


def label_of(text: str) -> int:
    return int(sum(w in POSITIVE for w in text.split()) > len(text.split()) / 3)


def tiny_bert(num_labels: int = 2, vocab: int = 32):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=32, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg).double()


def tiny_gpt2(vocab: int = 32):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, n_positions=32, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).double()


class DictDataset(torch.utils.data.Dataset):
    """Tokenized rows as dicts (``input_ids`` of varying length and ``labels``), like a ``datasets`` row."""

    def __init__(self, rows: Sequence[Dict[str, Any]]) -> None:
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return self.rows[i]


def classification_rows(tok, texts: Sequence[str]) -> List[Dict[str, Any]]:
    return [{"input_ids": tok(t)["input_ids"], "labels": label_of(t)} for t in texts]


def lm_rows(tok, texts: Sequence[str]) -> List[Dict[str, Any]]:
    return [{"input_ids": tok(t)["input_ids"]} for t in texts]


class PadCollate:
    """Right-pads ``input_ids`` (to the longest, or to ``length``), builds ``attention_mask``;
    class labels stay ``[n]``, causal-LM labels are the ids with ``-100`` on padding."""

    def __init__(self, pad_id: int = 0, length: int = 0, lm: bool = False) -> None:
        self.pad_id, self.length, self.lm = pad_id, length, lm

    def __call__(self, items: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        L = max([len(it["input_ids"]) for it in items] + [self.length])
        ids = torch.full((len(items), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(items), L, dtype=torch.long)
        for r, it in enumerate(items):
            n = len(it["input_ids"])
            ids[r, :n] = torch.as_tensor(it["input_ids"])
            mask[r, :n] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        if self.lm:
            out["labels"] = ids.masked_fill(mask == 0, -100)
        else:
            out["labels"] = torch.as_tensor([it["labels"] for it in items], dtype=torch.long)
        return out


def classification_loss(out: Any, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example cross-entropy of the logits (loss_fn for Mapping items: the whole batch)."""
    return nn.functional.cross_entropy(out.logits, batch["labels"], reduction="none")


def lm_loss(out: Any, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example mean next-token loss over the non-padding targets (the causal shift, -100 ignored)."""
    logits = out.logits[:, :-1]
    labels = batch["labels"][:, 1:]
    tok = nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    count = (labels != -100).sum(1).clamp_min(1)
    return tok.sum(1) / count


def record(model: nn.Module, dataset, collate, loss_fn, path, steps: int = 4, batch_size: int = 4,
           lr: float = 0.05, momentum: float = 0.9):
    """SGD with momentum over a shuffled padding loader; mean of the per-example losses."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    g = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=g,
                                         collate_fn=collate)
    rec = TrajectoryRecorder(model, opt, path)
    done = 0
    model.train()
    with rec:
        while done < steps:
            for batch in rec.track(loader):
                opt.zero_grad()
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                loss_fn(model(**inputs), batch).mean().backward()
                opt.step()
                done += 1
                if done == steps:
                    break
    model.eval()
    return rec.trajectory


def outputs_at(model: nn.Module, traj, step: int, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Ground truth: the model's logits at the recorded θ_step (plain forward, no library code)."""
    import copy

    m = copy.deepcopy(model).double().eval()
    state = {k: v.double() for k, v in traj.params(step).items()}
    m.load_state_dict(state, strict=False)
    with torch.no_grad():
        return m(**inputs).logits


# ----------------------------------------------------------------------------- Trainer runs
class AccessLog(DictDataset):
    """A DictDataset that notes every row index it serves (in order): an independent record of
    which rows the Trainer's loader fetched (num_workers=0, so fetch order = feed order)."""

    def __init__(self, rows: Sequence[Dict[str, Any]]) -> None:
        super().__init__(rows)
        self.served: List[int] = []

    def __getitem__(self, i: int) -> Dict[str, Any]:
        self.served.append(int(i))
        return self.rows[i]


def training_args(out_dir, **overrides):
    """TrainingArguments for tiny CPU runs: no reporting, no saving, seeded, single process."""
    from transformers import TrainingArguments

    base = dict(per_device_train_batch_size=4, num_train_epochs=1, learning_rate=5e-2, report_to=[],
                use_cpu=True, save_strategy="no", logging_strategy="no", seed=0, data_seed=0,
                dataloader_num_workers=0, disable_tqdm=True)
    base.update(overrides)
    return TrainingArguments(str(out_dir), **base)


def trainer_run(model, dataset, collate, out_dir, callbacks=(), eval_dataset=None, **overrides):
    """``Trainer(model, args, ...).train()``; returns the trainer."""
    from transformers import Trainer

    trainer = Trainer(model, training_args(out_dir, **overrides), train_dataset=dataset, eval_dataset=eval_dataset,
                      data_collator=collate, callbacks=list(callbacks))
    trainer.train()
    return trainer


def hand_loop(model, optimizer_like, scheduler_fn, dataset, collate, windows, path, max_grad_norm=0.0,
              token_normalized=False):
    """The same run written by hand: ``windows`` = per step, the micro-batches' dataset indices.

    The loss is the model's own: a micro-batch mean (BERT's CrossEntropyLoss, which ignores
    ``num_items_in_batch``), or, with ``token_normalized``, the token sum over the window's token
    count (``num_items_in_batch``, as the Trainer passes it to GPT-2). Weights are logged by hand.
    """
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [dict(model.named_parameters())[n] for n in names]}
              for g, names in optimizer_like]
    opt_cls, defaults = optimizer_like.cls, optimizer_like.defaults
    opt = opt_cls(groups, **defaults)
    sched = scheduler_fn(opt)
    rec = TrajectoryRecorder(model, opt, path, scheduler=sched)
    model.train()
    with rec:
        for window in windows:
            batches = [collate([dataset.rows[i] for i in idx]) for idx in window]
            # The Trainer's count: every label that is not -100 (it counts labels[..., 1:] only for models
            # whose loss_type maps to ForCausalLMLoss; GPT-2's loss_type is None, so position 0 counts too).
            n_items = sum(int((b["labels"] != -100).sum()) for b in batches)
            for idx, batch in zip(window, batches):
                if token_normalized:
                    loss = model(**batch, num_items_in_batch=torch.tensor(n_items)).loss
                    rec.log_batch(idx, [1.0 / n_items] * len(idx))
                else:
                    loss = model(**batch).loss
                    rec.log_batch(idx)
                loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            sched.step()
            model.zero_grad()
    model.eval()
    return rec.trajectory


class OptimizerLike(list):
    """``[(group hyperparameters, parameter names), ...]`` plus ``cls``/``defaults`` of a live optimizer."""

    def __init__(self, optimizer, model) -> None:
        inner = getattr(optimizer, "optimizer", optimizer)
        name_of = {id(p): n for n, p in model.named_parameters()}
        super().__init__(({k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")},
                          [name_of[id(p)] for p in g["params"]]) for g in inner.param_groups)
        self.cls = type(inner)
        import inspect

        accepted = inspect.signature(type(inner).__init__).parameters
        self.defaults = {k: v for k, v in inner.defaults.items() if k in accepted}


def windows_from(served: Sequence[int], batch_sizes: Sequence[int], accumulation: Sequence[int]) -> List[List[List[int]]]:
    """Cut the served row order into micro-batches of ``batch_sizes`` and steps of ``accumulation``."""
    out, pos, b = [], 0, 0
    for n_micro in accumulation:
        window = []
        for _ in range(n_micro):
            window.append(list(served[pos : pos + batch_sizes[b]]))
            pos += batch_sizes[b]
            b += 1
        out.append(window)
    return out


# ----------------------------------------------------------------------------- brute force (AdamW)
def _flat(traj, params) -> torch.Tensor:
    return torch.cat([params[n].double().reshape(-1) for n in traj.trainable])


def _split(traj, flat):
    out, start = {}, 0
    for n in traj.trainable:
        shape = traj.spec[n].shape
        k = int(torch.Size(shape).numel())
        out[n] = flat[start : start + k].view(shape)
        start += k
    return out


def _grad_of(model, traj, flat, inputs, scalar):
    """∇_θ scalar(model(θ; **inputs)) by plain autograd (frozen parameters from θ_0)."""
    from torch.func import functional_call

    th = flat.detach().clone().requires_grad_(True)
    params = dict(traj.frozen_params(dtype=torch.float64))
    params.update(_split(traj, th))
    (g,) = torch.autograd.grad(scalar(functional_call(model, params, (), inputs)), th)
    return g


def bruteforce_adamw_data_view(model, traj, rows, collate, test_inputs, explained, sample_loss, nodes=16):
    """Γ(x, k) = Σ_s φ_s(x) · Δ_s^{(k)} for torch AdamW, written from MATH.md with nothing from the
    library's epk/attr code: every training row collated *alone* (no padding) and differentiated with
    plain autograd; ``Δ_s^{(k)} = −lr_s/(1−β1^s) · (1−β1) Σ_{i≤s} β1^{s−i} c_i w_{i,k} g_{i,k} / d_s``
    with ``d_s = sqrt(v_s/(1−β2^s)) + ε`` from the recorded ``exp_avg_sq``, ``c_i`` = recorded norm over
    the replayed one; φ_s by Gauss–Legendre on autograd gradients of ``explained(out) -> [n]``.

    Returns:
        (scores [n_test, n_rows], regularization [n_test])
    """
    import copy

    import numpy as np

    model = copy.deepcopy(model).double().eval()
    N, P, n = traj.num_steps, sum(traj.spec[k].numel for k in traj.trainable), len(rows)
    groups = traj.groups_initial
    thetas = [_flat(traj, traj.params(s)) for s in range(N + 1)]
    group_of = [traj.spec[k].group for k in traj.trainable]
    sizes = [traj.spec[k].numel for k in traj.trainable]

    def per_param(values):  # group value -> [P] vector
        return torch.cat([torch.full((m,), float(values[g]), dtype=torch.float64) for g, m in zip(group_of, sizes)])

    b1 = per_param([g["betas"][0] for g in groups])
    b2 = per_param([g["betas"][1] for g in groups])
    eps = per_param([g["eps"] for g in groups])
    wd = per_param([g["weight_decay"] for g in groups])
    # per step: G[i] = [n, P] of c_i w_{i,k} g_{i,k}
    G = []
    for i in range(1, N + 1):
        rec = traj.record(i)
        w = torch.zeros(n, dtype=torch.float64)
        for mb in rec.batches:
            w.index_add_(0, mb.indices, mb.weights)
        g = torch.zeros(n, P, dtype=torch.float64)
        for k in torch.nonzero(w).flatten().tolist():
            batch = collate([rows[k]])
            inputs = {kk: v for kk, v in batch.items() if kk != "labels"}
            g[k] = _grad_of(model, traj, thetas[i - 1], inputs, lambda out, b=batch: sample_loss(out, b).sum())
        replayed = (w[:, None] * g).sum(0)
        c = rec.grad_norm / float(replayed.norm())
        G.append(c * w[:, None] * g)
    xs, ws = np.polynomial.legendre.leggauss(nodes)
    scores = torch.zeros(test_inputs["input_ids"].shape[0], n, dtype=torch.float64)
    reg = torch.zeros(scores.shape[0], dtype=torch.float64)
    m = torch.zeros(n, P, dtype=torch.float64)
    for s in range(1, N + 1):
        lr = per_param(traj.record(s).lr)
        v = _flat(traj, traj.state(s, "exp_avg_sq"))
        d = (v / (1 - b2**s)).sqrt() + eps
        m = b1 * m + (1 - b1) * G[s - 1]
        share = -lr / (1 - b1**s) * m / d  # [n, P]: Δ_s^{(k)}
        reg_s = -lr * wd * thetas[s - 1]
        delta = thetas[s] - thetas[s - 1]
        phi = torch.zeros(scores.shape[0], P, dtype=torch.float64)
        for x, wq in zip(xs, ws):
            t = (x + 1) / 2
            point = thetas[s - 1] + t * delta
            for r in range(scores.shape[0]):
                one = {kk: v[r : r + 1] for kk, v in test_inputs.items()}
                phi[r] += wq / 2 * _grad_of(model, traj, point, one, lambda out, r=r: explained(out, r).sum())
        scores += phi @ share.T
        reg += phi @ reg_s
    return scores, reg
