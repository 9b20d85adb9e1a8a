"""Rotary embedding kernel vs the rotate-half reference."""

import pytest
import torch
from kernel_helpers import assert_close, run_both


def _tables(T, half, gen, dtype, shape=None):
    inv_freq = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    shape = shape or (1, T, 1, half)
    return cos.reshape(shape), sin.reshape(shape)


def _tol(dtype, x):
    # float32: two products and a sum, same order in both paths: 1e-6.
    # bf16: the reference rounds x1*cos, x2*sin and their sum in bf16 (three roundings, errors relative to
    # the operands, not the result); the kernel rounds once. Bound: 3 ulps of the largest operand.
    if dtype == torch.float32:
        return dict(atol=1e-6, rtol=1e-6)
    return dict(atol=3 * 2**-8 * x.abs().max().item(), rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,H,D", [(2, 8, 4, 32), (1, 7, 3, 20)])  # odd T and H, D/2 = 10 not a power of 2
def test_rotary_matches_reference(K, B, T, H, D, dtype):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(B, T, H, D, generator=gen).to(dtype)
    cos, sin = _tables(T, D // 2, gen, dtype)
    y, y_ref, (dx,), (dx_ref,) = run_both(K.apply_rotary, K.apply_rotary_reference, [x, cos, sin], [0])
    assert "Rotary" in type(y.grad_fn).__name__
    assert_close(y, y_ref, **_tol(dtype, x), what=f"rotary y {dtype}")
    assert_close(dx, dx_ref, **_tol(dtype, x), what=f"rotary dx {dtype}")


def test_rotary_strided_input_and_full_tables(K):
    # q sliced out of a fused qkv projection (non-contiguous), tables given per (B, T, H): strides differ
    # from the usual broadcast ones.
    gen = torch.Generator().manual_seed(12)
    B, T, H, D = 2, 5, 3, 16
    qkv = torch.randn(B, T, 3 * H, D, generator=gen)
    q = qkv[:, :, :H]
    cos, sin = _tables(T, D // 2, gen, torch.float32)
    cos, sin = cos.expand(B, T, H, D // 2).contiguous(), sin.expand(B, T, H, D // 2).contiguous()
    y, y_ref, (dx,), (dx_ref,) = run_both(K.apply_rotary, K.apply_rotary_reference, [q, cos, sin], [0])
    assert_close(y, y_ref, **_tol(torch.float32, q), what="rotary strided y")
    assert_close(dx, dx_ref, **_tol(torch.float32, q), what="rotary strided dx")
