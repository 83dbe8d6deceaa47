"""Subnormal floats in the data view's products: flushed explicitly, or read as zero by the FPU."""

from __future__ import annotations

import pytest
import torch

from captum_explaind.epk.train_grads import _fpu_flushes, flush_subnormal, subnormals_flushed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flush_zeroes_exactly_the_subnormals(dtype):
    tiny = torch.finfo(dtype).tiny
    t = torch.tensor([tiny / 4, -tiny / 2, tiny, -2 * tiny, 1.0, 0.0], dtype=dtype)
    assert not _fpu_flushes()
    out = flush_subnormal(t)
    assert torch.equal(out, torch.tensor([0.0, 0.0, tiny, -2 * tiny, 1.0, 0.0], dtype=dtype))
    assert torch.equal(flush_subnormal(torch.arange(3)), torch.arange(3))  # integers untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inside_the_flushed_mode_a_product_equals_the_product_of_the_flushed_tensor(dtype):
    # flush_subnormal skips its pass inside subnormals_flushed() on one thread: that is only right
    # if the FPU then reads subnormal inputs as zero in a matrix product, bit for bit.
    torch.manual_seed(0)
    tiny = torch.finfo(dtype).tiny
    W = torch.randn(64, 300, dtype=dtype)
    W[W.abs() < 0.7] *= tiny  # about half the entries subnormal
    # rows with only subnormal entries: their products are exactly 0 once flushed
    W[:8] = torch.randn(8, 300, dtype=dtype).clamp(-4, 4) * (tiny / 8)
    D = torch.randn(5, 300, dtype=dtype) * 1e20  # ... and far from 0 when subnormals count
    want = D @ W.masked_fill(W.abs() < tiny, 0).T
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with subnormals_flushed():
            assert _fpu_flushes()
            assert flush_subnormal(W) is W  # the pass is skipped ...
            got = D @ flush_subnormal(W).T  # ... and the product is the flushed one
        assert not _fpu_flushes()  # the mode is restored
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got, want)
    assert (want[:, :8] == 0).all() and (D @ W.T)[:, :8].abs().min() > 0  # the check can tell them apart
