"""Benchmark: recording a ``transformers.Trainer`` run with ``TrajectoryCallback``, and the views on it.

One process, the same run several times (fresh model from one seed, interleaved repetitions, the
fastest of each kept): a BERT classifier of ~2.5M parameters built from a config (4 layers, d=192,
default dropout 0.1), a generated text-classification task with a word-level tokenizer made in
code, ``Trainer`` with AdamW, a warmup schedule, clipping and gradient accumulation.

1. **Recording overhead** — ``trainer.train()`` wall time without a callback, with
   ``TrajectoryCallback(path)`` (float32 storage and bfloat16 storage), and with EleutherAI
   Bergson's ``GradientCollectorCallback`` where it imports (``pip install --no-deps bergson`` plus
   its light dependencies on ``--bergson-path``; it needs ``prepare_for_gradient_collection``, which
   rewrites the Trainer's dataset and collator). Ratio to the plain run; bytes written per step.
2. **Views as a multiple of training time** on the float32 recording (``"fast"`` preset: float32,
   Gauss–Legendre 2, no error control; a few test sentences): reconstruction, per-layer
   ``StepInfluence``, per-layer ``ParameterInfluence``, the data view ``TrainingDataInfluence``
   (``loss_fn=None``: the model's own loss), each with its convergence delta.

Usage::

    python benchmarks/huggingface.py                  # full run, writes benchmarks/results/huggingface.md
    python benchmarks/huggingface.py --quick          # smoke run
    python benchmarks/huggingface.py --bergson-path /tmp/bergson_pkg
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

warnings.filterwarnings("ignore")


# ----------------------------------------------------------------------------- workload
def make_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2}
    for i in range(vocab_size - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]")


def make_texts(n: int, vocab_words: int, seed: int, max_len: int = 24):
    """Sentences of random words; label 1 when more of them come from the first half of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for _ in range(n):
        k = int(torch.randint(6, max_len + 1, (1,), generator=g))
        ids = torch.randint(0, vocab_words, (k,), generator=g)
        texts.append(" ".join(f"w{int(i)}" for i in ids))
        labels.append(int((ids < vocab_words // 2).float().mean() > 0.5))
    return texts, labels


def make_model(cfg: argparse.Namespace, model: str = "bert"):
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    if model == "gpt2":
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab, n_embd=cfg.hidden, n_layer=cfg.layers, n_head=4,
                                          n_positions=64, bos_token_id=2, eos_token_id=2,
                                          attn_implementation="eager"))
    config = BertConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                        num_attention_heads=4, intermediate_size=4 * cfg.hidden, max_position_embeddings=64,
                        num_labels=2, attn_implementation="eager")
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def make_dataset(cfg: argparse.Namespace, tok, model: str = "bert"):
    """The tokenized training set and its collator (padding; causal-LM labels with -100 on padding)."""
    import datasets
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding

    texts, labels = make_texts(cfg.batch * cfg.accum * cfg.steps, cfg.vocab - 3, seed=1)
    if model == "gpt2":
        ds = datasets.Dataset.from_dict({"text": texts})
        return (ds.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"]),
                DataCollatorForLanguageModeling(tok, mlm=False))
    ds = datasets.Dataset.from_dict({"text": texts, "label": labels})
    return ds.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"]), DataCollatorWithPadding(tok)


def trainer_args(cfg: argparse.Namespace, out: str):
    from transformers import TrainingArguments

    return TrainingArguments(out, per_device_train_batch_size=cfg.batch, gradient_accumulation_steps=cfg.accum,
                             max_steps=cfg.steps, learning_rate=1e-4, warmup_steps=max(1, cfg.steps // 10),
                             max_grad_norm=1.0, weight_decay=0.01, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", seed=0, data_seed=0, dataloader_num_workers=0,
                             disable_tqdm=True)


# ----------------------------------------------------------------------------- runs
def run_training(cfg, train_ds, collator, kind: str, workdir: Path, bergson: Any = None,
                 arch: str = "bert") -> Dict[str, Any]:
    from transformers import Trainer

    from captum_explaind.adapters.huggingface import TrajectoryCallback

    model = make_model(cfg, arch)
    workdir = workdir / arch
    out = workdir / f"out_{kind}"
    callbacks: List[Any] = []
    cb = None
    if kind.startswith("ours"):
        store = torch.bfloat16 if kind == "ours-bf16" else None
        cb = TrajectoryCallback(workdir / f"traj_{kind}", overwrite=True, store_dtype=store)
        callbacks = [cb]
    elif kind == "bergson":
        bpath = workdir / "bergson"
        shutil.rmtree(bpath, ignore_errors=True)
        callbacks = [bergson.GradientCollectorCallback(bpath, projection_dim=16)]
    trainer = Trainer(model, trainer_args(cfg, str(out)), train_dataset=train_ds, data_collator=collator,
                      callbacks=callbacks)
    if kind == "bergson":
        bergson.prepare_for_gradient_collection(trainer)
    t0, c0 = time.perf_counter(), time.thread_time()
    trainer.train()
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    # CPU time of the training thread, and of the recorder's background writer thread
    writer_cpu = getattr(cb.recorder, "writer_cpu_seconds", float("nan")) if cb is not None else 0.0
    row: Dict[str, Any] = {"kind": kind, "time": wall, "cpu": cpu, "writer_cpu": writer_cpu, "model": model, "cb": cb}
    target = workdir / (f"traj_{kind}" if cb is not None else "bergson")
    if kind != "plain" and target.exists():
        row["bytes"] = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    return row


def load_bergson(path: Optional[str]) -> Any:
    if path:
        sys.path.insert(0, path)
    try:
        import bergson.huggingface as bh

        return bh
    except Exception as err:  # noqa: BLE001 - any import failure means "not available here"
        return f"{type(err).__name__}: {err}"


def time_views(cfg, model, traj, train_ds, collator, tok, train_time: float) -> List[Dict[str, Any]]:
    from captum_explaind import ExactPathKernel, ParameterInfluence, StepInfluence, TrainingDataInfluence
    from captum_explaind.adapters.huggingface import ModelColumns, layer_groups

    texts, labels = make_texts(cfg.n_test, cfg.vocab - 3, seed=99)
    enc = dict(tok(texts, padding=True, return_tensors="pt"))
    target = torch.tensor(labels)
    groups = layer_groups(model)
    rows = []

    def timed(name: str, fn: Callable[[], Any], delta: Callable[[Any], torch.Tensor]) -> None:
        t0 = time.perf_counter()
        res = fn()
        dt = time.perf_counter() - t0
        rows.append({"view": name, "time": dt, "x": dt / train_time, "delta": float(delta(res).abs().max())})
        print(f"  {name:<42} {dt:8.1f} s  {dt / train_time:6.1f}x training   max|delta| {rows[-1]['delta']:.2e}",
              flush=True)

    timed("reconstruct (ExactPathKernel)", lambda: ExactPathKernel(model, traj, "fast").reconstruct(enc),
          lambda r: r.delta)
    timed(f"StepInfluence, {len(groups)} layer groups",
          lambda: StepInfluence(model, traj, "fast").explain(enc, target=target, layers=groups), lambda r: r.delta)
    timed(f"ParameterInfluence, {len(groups)} layer groups",
          lambda: ParameterInfluence(model, traj, "fast").explain(enc, target=target, layers=groups),
          lambda r: r.delta)
    data = ModelColumns(train_ds, model)
    timed("TrainingDataInfluence (loss_fn=None)",
          lambda: TrainingDataInfluence(model, traj, data, collate_fn=collator, options="fast").explain(
              enc, target=target), lambda r: r.delta)
    return rows


# ----------------------------------------------------------------------------- report
def report(cfg, tables: List[Dict[str, Any]], view_rows: List[Dict[str, Any]]) -> str:
    lines = [
        "# Hugging Face benchmark (`python benchmarks/huggingface.py`)",
        "",
        f"Models from configs ({cfg.layers} layers, d={cfg.hidden}, vocabulary {cfg.vocab}, default dropout 0.1, "
        f"eager attention); `Trainer` (AdamW, warmup, clipping 1.0), {cfg.steps} optimizer steps of "
        f"{cfg.accum} × {cfg.batch} generated sentences (6–24 words), float32, CPU "
        f"({torch.get_num_threads()} thread(s)); fastest of {cfg.reps} interleaved repetitions of each run, "
        "all in one process. Load average (1 min) at the start of the run: "
        f"{cfg.load_at_start:.2f}, at the end: {os.getloadavg()[0]:.2f}.",
        "",
    ]
    for t in tables:
        base = t["rows"]["plain"]["time"]
        lines += [f"**{t['title']}** ({t['n_params'] / 1e6:.2f}M parameters; repetitions alternate the order "
                  "plain, ours, ... / plain, ..., ours)", "",
                  "| run | fastest `trainer.train()` (s) | fastest ÷ fastest plain | median of paired ratios "
                  "(same repetition) | training-thread CPU ÷ plain (mean) | writer-thread CPU (mean, s) "
                  "| bytes / step on disk |",
                  "|---|---|---|---|---|---|---|"]
        cpu_base = t["cpu"]["plain"][0]
        for kind, row in t["rows"].items():
            per_step = row.get("bytes")
            size = "–" if per_step is None else f"{per_step / cfg.steps / 2**20:.2f} MiB"
            ratios = sorted(t["paired"].get(kind, [1.0]))
            median = ratios[len(ratios) // 2] if len(ratios) % 2 else sum(ratios[len(ratios) // 2 - 1:][:2]) / 2
            train_cpu, writer_cpu = t["cpu"][kind]
            lines.append(f"| {kind} | {row['time']:.2f} | {row['time'] / base:.3f} | {median:.3f} | "
                         f"{train_cpu / cpu_base:.3f} | {writer_cpu:.2f} | {size} |")
        lines += ["", t["note"], ""] if t.get("note") else [""]
    if view_rows:
        lines += ["Views on the BERT float32 recording (`\"fast\"` preset: float32, Gauss–Legendre 2, no error "
                  f"control; {cfg.n_test} test sentences, target = label), as a multiple of that run's training time:",
                  "", "| view | time (s) | × training | max \\|delta\\| |", "|---|---|---|---|"]
        for r in view_rows:
            lines.append(f"| {r['view']} | {r['time']:.1f} | {r['x']:.1f}× | {r['delta']:.2e} |")
    return "\n".join(lines) + "\n"


def run_table(cfg, arch: str, tok, bergson: Any, work: Path) -> Dict[str, Any]:
    train_ds, collator = make_dataset(cfg, tok, arch)
    kinds = ["plain", "ours", "ours-bf16"] + (["bergson"] if arch == "gpt2" and not isinstance(bergson, str) else [])
    n_params = sum(p.numel() for p in make_model(cfg, arch).parameters())
    print(f"{arch}: {n_params / 1e6:.2f}M parameters, {cfg.steps} steps; runs: {kinds}", flush=True)
    best: Dict[str, Dict[str, Any]] = {}
    paired: Dict[str, List[float]] = {}
    cpu_sums: Dict[str, List[float]] = {}
    note = ""
    for rep in range(cfg.reps):
        plain_time = None
        # alternate the order (plain first, then plain last) so that drift in the machine's load
        # does not favour one side; each variant is paired with the plain run of its repetition
        order = list(kinds) if rep % 2 == 0 else ["plain"] + list(reversed(kinds[1:]))
        done: Dict[str, Dict[str, Any]] = {}
        for kind in order:
            try:
                row = run_training(cfg, train_ds, collator, kind, work, bergson, arch)
            except Exception as err:  # noqa: BLE001 - a peer failing is a result, not a crash
                if kind != "bergson":
                    raise
                note = f"Bergson: installed, but its callback failed on this run: {type(err).__name__}: {err}"
                kinds.remove("bergson")
                continue
            print(f"  rep {rep} {kind:<10} {row['time']:.2f} s wall, training thread {row['cpu']:.2f} s CPU, "
                  f"writer thread {row['writer_cpu']:.2f} s CPU, load {os.getloadavg()[0]:.2f}", flush=True)
            done[kind] = row
            if kind not in best or row["time"] < best[kind]["time"]:
                best[kind] = row
            cpu_sums.setdefault(kind, [0.0, 0.0, 0])
            cpu_sums[kind][0] += row["cpu"]
            cpu_sums[kind][1] += row["writer_cpu"]
            cpu_sums[kind][2] += 1
        plain_time = done["plain"]["time"] if "plain" in done else None
        for kind, row in done.items():
            if kind != "plain" and plain_time is not None:
                paired.setdefault(kind, []).append(row["time"] / plain_time)
    if arch == "gpt2" and isinstance(bergson, str):
        note = f"Bergson: not run, `import bergson.huggingface` fails here ({bergson})."
    elif "bergson" in best:
        note = ("Bergson 2.5.1 (`pip install --no-deps bergson` + its light dependencies, CPU): "
                "`GradientCollectorCallback(path, projection_dim=16)` after `prepare_for_gradient_collection(trainer)` "
                "(which rewrites the Trainer's datasets, collator and private `_signature_columns`). It stores "
                "projected per-sample gradients, not a replayable trajectory. (It assumes sequence-shaped inputs "
                "to every Linear, so it does not run on the BERT classifier's pooled head.)")
    title = "BERT sequence classifier" if arch == "bert" else "GPT-2 causal LM (token-count normalization)"
    cpu = {k: (v[0] / v[2], v[1] / v[2]) for k, v in cpu_sums.items()}
    return {"title": title, "n_params": n_params, "rows": best, "paired": paired, "cpu": cpu, "note": note,
            "train_ds": train_ds, "collator": collator}


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--n-test", type=int, default=4)
    p.add_argument("--skip-views", action="store_true")
    p.add_argument("--models", default="bert,gpt2", help="comma-separated: bert, gpt2 (views need bert first)")
    p.add_argument("--bergson-path", default=None, help="a --target directory where bergson was pip-installed")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, few steps")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "huggingface.md"))
    cfg = p.parse_args(argv)
    if cfg.quick:
        cfg.steps, cfg.hidden, cfg.layers, cfg.vocab, cfg.reps, cfg.n_test = 4, 32, 1, 200, 1, 2
    cfg.load_at_start = os.getloadavg()[0]
    tok = make_tokenizer(cfg.vocab)
    bergson = load_bergson(cfg.bergson_path)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tables = [run_table(cfg, arch, tok, bergson, work) for arch in cfg.models.split(",")]
        views: List[Dict[str, Any]] = []
        if not cfg.skip_views:
            bert = tables[0]
            ours = bert["rows"]["ours"]
            print("views:", flush=True)
            views = time_views(cfg, ours["model"], ours["cb"].trajectory, bert["train_ds"], bert["collator"], tok,
                               ours["time"])
        text = report(cfg, tables, views)
    print(text)
    if not cfg.quick:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(text, encoding="utf-8")
        print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main()
