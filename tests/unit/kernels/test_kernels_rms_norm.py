"""RMSNorm kernel vs F.rms_norm under Triton's interpreter."""

import pytest
import torch
from kernel_helpers import assert_close, run_both

# float32: same float32 math, only the reduction order differs (rows of at most a few hundred): 1e-5.
# bfloat16: both paths compute in float32 and round once to bf16 (F.rms_norm upcasts internally), so they
# differ by at most one bf16 ulp (2^-8 = 3.9e-3 relative) where a value sits on a rounding boundary;
# 8e-3 allows two.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=8e-3)}

SHAPES = [
    (64, 128),      # QK-norm row width (head_dim 128), several rows per program
    (37, 200),      # odd row count, row width not a power of two
    (3, 5, 96),     # 3-D input, flattened by the launcher
    (1, 1000),      # single wide row
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(K, shape, dtype):
    gen = torch.Generator().manual_seed(1234)
    x = (torch.randn(shape, generator=gen) * 3 + 0.5).to(dtype)
    y, y_ref, (dx,), (dx_ref,) = run_both(lambda t: K.rms_norm(t, 1e-6), lambda t: K.rms_norm_reference(t, 1e-6),
                                          [x], [0])
    assert "RMSNorm" in type(y.grad_fn).__name__  # the kernel path really ran
    assert_close(y, y_ref, **TOL[dtype], what=f"rms_norm y {shape} {dtype}")
    assert_close(dx, dx_ref, **TOL[dtype], what=f"rms_norm dx {shape} {dtype}")


def test_rms_norm_non_contiguous_input(K):
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(48, 24, generator=gen)
    x = base.t()  # (24, 48), last-dim stride 24: the launcher must copy to rows
    y, y_ref, (dx,), (dx_ref,) = run_both(K.rms_norm, K.rms_norm_reference, [x], [0])
    assert_close(y, y_ref, **TOL[torch.float32], what="rms_norm y transposed")
    assert_close(dx, dx_ref, **TOL[torch.float32], what="rms_norm dx transposed")
