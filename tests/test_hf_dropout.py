"""Dropout on (as in every Hugging Face config): the masks of training are replayed.

A tiny BERT with hidden and attention dropout 0.1 trained by a real ``Trainer`` with
``callbacks=[TrajectoryCallback(path)]`` alone: the callback stores the RNG state right before every
micro-batch's training forward, and the data view's batch-coupled gradient computer replays the
masks, so the residual drops to round-off. Recorded without the RNG states, replay is impossible:
the data view names the dropout modules in a warning and reports the measured (large) residual,
and the decomposition stays complete.
"""

from __future__ import annotations

import pytest
import torch

from captum_explaind import TrainingDataInfluence
from captum_explaind.adapters.huggingface import TrajectoryCallback

import hf_models as hf

pytestmark = pytest.mark.filterwarnings("ignore:vmap .* does not work:RuntimeWarning")

ARGS = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=1, max_grad_norm=1.0,
            learning_rate=2e-3)


def _dropout_bert(attn="eager"):
    m = hf.tiny_bert()
    m.config.hidden_dropout_prob = m.config.attention_probs_dropout_prob = 0.1
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.1
    return m


@pytest.fixture(scope="module")
def setup():
    tok = hf.make_tokenizer()
    rows = hf.classification_rows(tok, hf.sentences(12, seed=11))
    enc = tok(hf.sentences(2, seed=12), padding=True, return_tensors="pt")
    return rows, dict(enc), torch.tensor([1, 0])


def _run(rows, tmp, **cb_options):
    model = _dropout_bert()
    cb = TrajectoryCallback(tmp / "traj", **cb_options)
    hf.trainer_run(model, hf.DictDataset(rows), hf.PadCollate(), tmp / "out", callbacks=[cb], **ARGS)
    return model, cb.trajectory


def _complete(res):
    return (res.scores.sum(1) + res.regularization + res.residual + res.delta - res.change).abs().max()


def test_dropout_masks_are_replayed_to_round_off(setup, tmp_path):
    rows, enc, target = setup
    model, traj = _run(rows, tmp_path)
    assert traj.record(1).batches[0].rng_state is not None
    assert traj.manifest["training_modes"]["dropout"]  # names of the dropout modules in train mode
    res = TrainingDataInfluence(model, traj, hf.DictDataset(rows), collate_fn=hf.PadCollate()).explain(
        enc, target=target)
    assert _complete(res) <= 1e-9
    assert res.residual.abs().max() <= 1e-9 * res.change.abs().max(), (res.residual, res.change)


def test_without_rng_states_the_residual_is_reported_and_the_modules_named(setup, tmp_path):
    rows, enc, target = setup
    model, traj = _run(rows, tmp_path, record_rng=False)
    assert traj.record(1).batches[0].rng_state is None
    with pytest.warns(RuntimeWarning, match=r"dropout.*bert\.embeddings\.dropout"):
        tdi = TrainingDataInfluence(model, traj, hf.DictDataset(rows), collate_fn=hf.PadCollate())
        res = tdi.explain(enc, target=target)
    assert _complete(res) <= 1e-9
    # the masks the eval-mode replay lacks leave a measured, non-negligible residual
    assert res.residual.abs().max() >= 1e-3 * res.change.abs().max()
