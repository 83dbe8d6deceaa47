"""A tokenized ``datasets.Dataset`` with ``DataCollatorWithPadding`` as the data view's training set.

The same sentences as a plain dict dataset with a hand-written padding collate give the same
scores; the decomposition is complete against the real model output; Captum-style ``influence``
takes a DataLoader of ``BatchEncoding`` batches.
"""

from __future__ import annotations

import pytest
import torch

from captum_explaind import TrainingDataInfluence

import hf_models as hf

pytestmark = pytest.mark.filterwarnings("ignore:vmap .* does not work:RuntimeWarning")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from datasets import Dataset
    from transformers import DataCollatorWithPadding

    tok = hf.make_tokenizer()
    texts = hf.sentences(8, seed=4)
    ds = Dataset.from_dict({"text": texts, "label": [hf.label_of(t) for t in texts]})
    ds = ds.map(lambda r: tok(r["text"]), remove_columns=["text"])
    collate = DataCollatorWithPadding(tok)  # renames label -> labels, pads, returns a BatchEncoding
    model = hf.tiny_bert()
    traj = hf.record(model, ds, collate, hf.classification_loss, tmp_path_factory.mktemp("ds"), steps=3)
    return tok, texts, ds, collate, model, traj


def test_tokenized_dataset_with_the_training_collator(run):
    tok, texts, ds, collate, model, traj = run
    enc = tok(hf.sentences(3, seed=9), padding=True, return_tensors="pt")
    target = [1, 0, 1]
    res = TrainingDataInfluence(model, traj, ds, hf.classification_loss, collate_fn=collate).explain(enc, target=target)
    f0 = hf.outputs_at(model, traj, 0, dict(enc))
    fN = hf.outputs_at(model, traj, traj.num_steps, dict(enc))
    change = (fN - f0).gather(1, torch.tensor(target).view(-1, 1)).squeeze(1)
    assert res.scores.shape == (3, len(ds))
    assert (res.scores.sum(1) + res.regularization + res.residual + res.delta - change).abs().max() <= 1e-9
    assert res.residual.abs().max() <= 1e-10
    # The same rows as plain dicts with another padding collate: the same scores.
    rows = [{"input_ids": r["input_ids"], "labels": r["label"]} for r in ds]
    plain = TrainingDataInfluence(model, traj, hf.DictDataset(rows), hf.classification_loss,
                                  collate_fn=hf.PadCollate(length=9)).attribute(enc, target=target)
    torch.testing.assert_close(plain, res.scores, rtol=0, atol=1e-11)


def test_influence_takes_a_loader_of_batch_encodings(run):
    tok, _, ds, collate, model, traj = run
    test = hf.DictDataset([{"input_ids": tok(t)["input_ids"], "labels": hf.label_of(t)}
                           for t in hf.sentences(5, seed=12)])
    loader = torch.utils.data.DataLoader(test, batch_size=5, collate_fn=hf.PadCollate())
    tdi = TrainingDataInfluence(model, traj, ds, hf.classification_loss, collate_fn=collate)
    batch = next(iter(loader))
    scores = tdi.influence(loader)
    direct = tdi.attribute({k: v for k, v in batch.items() if k != "labels"}, target=batch["labels"].tolist())
    torch.testing.assert_close(scores, direct, rtol=0, atol=0)
    top = tdi.influence(loader, k=2, proponents=False)
    torch.testing.assert_close(top.influence_scores, torch.topk(direct, 2, dim=1, largest=False).values)
