"""TrajectoryCallback: a real ``transformers.Trainer`` run recorded by ``callbacks=[cb]`` alone.

The key check: the callback's recording of a run with gradient accumulation, clipping, a warmup
schedule, two parameter groups (weight decay off for biases and norms) and a partial last batch
equals a hand-written loop's recording of the same run — every θ_s bit for bit, the learning rate
of each group, the dataset indices of every micro-batch (checked against the rows the dataset
itself served) and their weights — for a classifier (a per-micro-batch mean the Trainer does not
divide, since BERT ignores ``num_items_in_batch``) and for a causal LM (token-count normalization
over the accumulation window, with padding and ``-100`` labels).
"""

from __future__ import annotations

import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from captum_explaind import Trajectory
from captum_explaind.adapters.huggingface import TrajectoryCallback
from captum_explaind.errors import TrajectoryError

import hf_models as hf

N_TRAIN, BATCH, ACCUM, EPOCHS, WARMUP, CLIP = 11, 4, 2, 2, 2, 0.5
# 11 rows in batches of 4: 4, 4, 3 per epoch; 2 micro-batches per step: windows [4, 4], [3].
BATCH_SIZES = [4, 4, 3] * EPOCHS
ACCUMULATION = [2, 1] * EPOCHS


def _args():
    return dict(per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM, num_train_epochs=EPOCHS,
                max_grad_norm=CLIP, warmup_steps=WARMUP, lr_scheduler_type="linear", weight_decay=0.01)


def _assert_same_recording(a: Trajectory, b: Trajectory, weights_rtol: float = 0.0) -> None:
    assert a.num_steps == b.num_steps == len(ACCUMULATION)
    assert a.trainable == b.trainable
    for s in range(a.num_steps + 1):
        pa, pb = a.params(s), b.params(s)
        for n in a.trainable:
            assert torch.equal(pa[n], pb[n]), (s, n)
    for s in range(1, a.num_steps + 1):
        ra, rb = a.record(s), b.record(s)
        assert ra.lr == rb.lr, s
        assert len(ra.batches) == len(rb.batches) == ACCUMULATION[s - 1]
        for ma, mb in zip(ra.batches, rb.batches):
            assert torch.equal(ma.indices, mb.indices)
            assert torch.allclose(ma.weights, mb.weights, rtol=weights_rtol, atol=0), (ma.weights, mb.weights)
        assert ra.grad_norm == pytest.approx(rb.grad_norm, rel=1e-12)


def _run_both(model_fn, rows, collate, tmp_path, token_normalized):
    data = hf.AccessLog(rows)
    cb = TrajectoryCallback(tmp_path / "cb")
    model = model_fn()
    trainer = hf.trainer_run(model, data, collate, tmp_path / "out", callbacks=[cb], **_args())
    assert len(data.served) == N_TRAIN * EPOCHS
    windows = hf.windows_from(data.served, BATCH_SIZES, ACCUMULATION)
    total = len(ACCUMULATION)
    hand = hf.hand_loop(model_fn(), hf.OptimizerLike(trainer.optimizer, model),
                        lambda opt: get_linear_schedule_with_warmup(opt, WARMUP, total), data, collate, windows,
                        tmp_path / "hand", max_grad_norm=CLIP, token_normalized=token_normalized)
    return trainer, cb, hand, windows


def test_classifier_run_equals_a_hand_written_loop(tmp_path):
    tok = hf.make_tokenizer()
    rows = hf.classification_rows(tok, hf.sentences(N_TRAIN, seed=3))
    trainer, cb, hand, windows = _run_both(hf.tiny_bert, rows, hf.PadCollate(), tmp_path, token_normalized=False)
    traj = cb.trajectory
    _assert_same_recording(traj, hand)
    assert cb.loss_normalization == "mean"  # BERT gets num_items_in_batch but ignores it
    # the schedule, the two parameter groups and clipping are really exercised
    lrs = [traj.record(s).lr for s in range(1, traj.num_steps + 1)]
    assert len(lrs[0]) == 2 and [g[0] for g in lrs] == pytest.approx([0.0, 0.025, 0.05, 0.025])
    assert traj.manifest["optimizer"]["groups"][0]["weight_decay"] == 0.01
    assert traj.manifest["optimizer"]["groups"][1]["weight_decay"] == 0.0
    norms = [traj.record(s).grad_norm for s in range(1, traj.num_steps + 1)]
    assert max(norms) == pytest.approx(CLIP, rel=1e-5)  # clipped: max_norm / (norm + 1e-6)
    # final parameters are the model the Trainer returns
    final = traj.params(traj.num_steps)
    for n, p in trainer.model.named_parameters():
        assert torch.equal(final[n], p.detach()), n


def test_causal_lm_token_normalized_run_equals_a_hand_written_loop(tmp_path):
    tok = hf.make_tokenizer()
    rows = hf.lm_rows(tok, hf.sentences(N_TRAIN, seed=4, min_len=2, max_len=7))
    _, cb, hand, windows = _run_both(hf.tiny_gpt2, rows, hf.PadCollate(lm=True), tmp_path, token_normalized=True)
    assert cb.loss_normalization == "num_items_in_batch"
    _assert_same_recording(cb.trajectory, hand, weights_rtol=1e-15)
    # weights: 1 / num_items_in_batch of the whole window, the last short window included
    rec = cb.trajectory.record(cb.trajectory.num_steps)
    collate = hf.PadCollate(lm=True)
    # (the Trainer counts all non -100 labels for GPT-2, whose loss_type is None; the model's loss sums the
    # shifted ones: the weight is what reached the model)
    n_items = sum(int((collate([rows[i] for i in idx])["labels"] != -100).sum()) for idx in windows[-1])
    assert torch.allclose(rec.batches[0].weights, torch.full((3,), 1.0 / n_items, dtype=torch.float64))


def test_eval_logging_and_saving_are_unaffected(tmp_path):
    tok = hf.make_tokenizer()
    rows = hf.classification_rows(tok, hf.sentences(N_TRAIN, seed=3))
    evals = hf.DictDataset(hf.classification_rows(tok, hf.sentences(5, seed=9)))
    kw = dict(_args(), eval_strategy="steps", eval_steps=1, logging_strategy="steps", logging_steps=1,
              save_strategy="steps", save_steps=2)
    runs = []
    for name, callbacks in (("plain", []), ("recorded", [TrajectoryCallback(tmp_path / "traj")])):
        model = hf.tiny_bert()
        trainer = hf.trainer_run(model, hf.DictDataset(rows), hf.PadCollate(), tmp_path / name, callbacks=callbacks,
                                 eval_dataset=evals, **kw)
        logs = [{k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k}
                for e in trainer.state.log_history]
        runs.append((model, logs, sorted(p.name for p in (tmp_path / name).glob("checkpoint-*"))))
    (m0, l0, c0), (m1, l1, c1) = runs
    assert l0 == l1 and c0 == c1 and len(c0) >= 1 and any("eval_loss" in e for e in l0)
    for (n, p), (_, q) in zip(m0.named_parameters(), m1.named_parameters()):
        assert torch.equal(p, q), n


class _StopAt:
    """A plain TrainerCallback that interrupts training after ``step`` optimizer steps."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    control.should_training_stop = True
                return control

        return Stop()


def test_resume_from_checkpoint_appends_to_the_recording(tmp_path):
    tok = hf.make_tokenizer()
    rows = hf.classification_rows(tok, hf.sentences(N_TRAIN, seed=3))
    kw = dict(_args(), save_strategy="steps", save_steps=1)
    whole = TrajectoryCallback(tmp_path / "whole")
    hf.trainer_run(hf.tiny_bert(), hf.DictDataset(rows), hf.PadCollate(), tmp_path / "a", callbacks=[whole], **kw)
    # the same run, interrupted after 3 steps (the second epoch's first step) and resumed from checkpoint-3
    first = TrajectoryCallback(tmp_path / "parts")
    hf.trainer_run(hf.tiny_bert(), hf.DictDataset(rows), hf.PadCollate(), tmp_path / "b",
                   callbacks=[first, _StopAt(3)], **kw)
    assert first.trajectory.num_steps == 3
    from transformers import Trainer

    second = TrajectoryCallback(tmp_path / "parts")
    trainer = Trainer(hf.tiny_bert(), hf.training_args(tmp_path / "b", **kw), train_dataset=hf.DictDataset(rows),
                      data_collator=hf.PadCollate(), callbacks=[second])
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    _assert_same_recording(second.trajectory, whole.trajectory)
    # a checkpoint that is not the recording's last step (or no recording at all) is refused, naming both
    for path, match in ((tmp_path / "parts", "at step 2, but the recording .* has 4 steps"),
                        (tmp_path / "new", "at step 2, but .* holds no readable recording")):
        trainer = Trainer(hf.tiny_bert(), hf.training_args(tmp_path / "b", **kw), train_dataset=hf.DictDataset(rows),
                          data_collator=hf.PadCollate(), callbacks=[TrajectoryCallback(path)])
        with pytest.raises(TrajectoryError, match=match):
            trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))


def test_trajectory_before_training_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="training has not started"):
        _ = TrajectoryCallback(tmp_path / "t").trajectory


def test_bad_recorder_options_are_named_when_the_callback_is_created(tmp_path):
    """Before the Trainer starts: an unknown option and an invalid value each raise, naming it."""
    with pytest.raises(TypeError, match=r"no option\(s\) \['bogus'\]"):
        TrajectoryCallback(tmp_path / "a", bogus=1)
    with pytest.raises(ValueError, match="store_dtype"):
        TrajectoryCallback(tmp_path / "b", store_dtype="half")
    with pytest.raises(ValueError, match="overwrite=True .* or resume=True"):
        TrajectoryCallback(tmp_path / "c", overwrite=True, resume=True)
    assert not (tmp_path / "a").exists()  # nothing was created
