"""The Grokking task module: data as the paper builds it, the App. C.2 model, training to a target."""

from __future__ import annotations

import math

import pytest
import torch

from captum_explaind.grokking import GrokConfig, ModAddTransformer, build_model, make_data, train


def test_paper_split_has_the_paper_counts_and_a_greater_than_b_pairs():
    d = make_data(113, 4000, 2000, seed=0)
    assert (d.n_train, d.n_test) == (4000, 2000)
    for x, y in ((d.train_x, d.train_y), (d.test_x, d.test_y)):
        a, b = x[:, 0], x[:, 2]
        assert (a > b).all() and (a < 113).all() and (b >= 0).all()
        assert (x[:, 1] == 113).all() and (x[:, 3] == 114).all()  # tokens [a][+][b][=]
        assert torch.equal(y, (a + b) % 113)
    pairs = {(int(a), int(b)) for a, b in torch.cat([d.train_x, d.test_x])[:, [0, 2]]}
    assert len(pairs) == 6000  # train and test are disjoint
    full = make_data(113, None, 2000)
    assert full.n_train + full.n_test == 113 * 112 // 2 == 6328


def test_include_equal_gives_the_authors_a_ge_b_pairs():
    d = make_data(7, None, 5, include_equal=True)
    assert d.n_train + d.n_test == 7 * 8 // 2
    both = torch.cat([d.train_x, d.test_x])
    assert (both[:, 0] == both[:, 2]).sum() == 7


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="n_train"):
        make_data(11, 100, 10)
    with pytest.raises(ValueError, match="n_test"):
        make_data(11, None, 55)
    with pytest.raises(ValueError, match="p must be"):
        make_data(2, None, 1)


def test_model_is_the_papers_transformer():
    m = build_model(GrokConfig.paper())
    assert isinstance(m, ModAddTransformer)
    names = [n for n, _ in m.named_parameters()]
    assert names[0] == "input_emb.weight" and names[-1] == "decoder.weight"
    assert m.input_emb.weight.shape == (115, 64) and m.head1_encoder.weight.shape == (16, 64)
    assert m.linear1.weight.shape == (512, 64) and m.decoder.weight.shape == (115, 64)
    assert not any("pos" in n for n in names)  # no positional encoding
    x = make_data(113, 10, 5).test_x
    out = m(x)
    assert out.shape == (5, 115)
    assert torch.allclose(out.exp().sum(-1), torch.ones(5), atol=1e-5)  # log-probabilities
    # no positional encoding: the prediction does not depend on the order of a and b
    swapped = x[:, [2, 1, 0, 3]]
    assert torch.allclose(m(swapped), out, atol=1e-5)


def test_training_stops_at_the_target_and_records_every_step(tmp_path):
    cfg = GrokConfig.tiny(max_steps=12, target_test_acc=2.0)
    run = train(tmp_path / "run", cfg)
    assert run.steps == 12 and run.trajectory.num_steps == 12
    assert len(run.history.test_acc) == 12 and not run.grokked
    assert run.trajectory.optimizer_class.endswith("AdamW")
    # the history's last test accuracy is that of θ_N
    with torch.no_grad():
        acc = float((run.model(run.data.test_x).argmax(-1) == run.data.test_y).double().mean())
    assert math.isclose(acc, run.history.test_acc[-1])
    stopped = train(None, GrokConfig.tiny(max_steps=50, target_test_acc=0.0))
    assert stopped.steps == 1 and stopped.trajectory is None


def _full_sequence_forward(model: ModAddTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """The authors' formulation: attention and MLP at every position, the last one read out."""
    x = model.input_emb(tokens) * math.sqrt(model.d_model)
    attn = sum(dec(torch.nn.functional.scaled_dot_product_attention(enc(x), enc(x), enc(x)))
               for enc, dec in model.heads())
    out = attn + torch.relu(model.linear2(torch.relu(model.linear1(attn))))
    return model.decoder(out)[:, -1, :].log_softmax(dim=-1)


def test_last_position_forward_equals_the_full_sequence_model_and_its_gradients():
    # The model computes attention and the MLP at the read-out position only; the numbers and
    # every parameter's gradient must be those of the full-sequence model (float64, trained a bit
    # so no ReLU is at its initial state).
    torch.manual_seed(1)
    cfg = GrokConfig.tiny()
    model = build_model(cfg).double()
    d = make_data(cfg.p, cfg.n_train, cfg.n_test)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.nll_loss(model(d.train_x), d.train_y).backward()
        opt.step()
    ours = model(d.test_x)
    ref = _full_sequence_forward(model, d.test_x)
    torch.testing.assert_close(ours, ref, rtol=1e-13, atol=1e-13)
    g_ours = torch.autograd.grad(ours[torch.arange(len(d.test_y)), d.test_y].sum(), list(model.parameters()))
    g_ref = torch.autograd.grad(ref[torch.arange(len(d.test_y)), d.test_y].sum(), list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13, msg=name)
