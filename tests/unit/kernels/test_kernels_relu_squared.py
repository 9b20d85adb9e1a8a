"""ReLU-squared kernels (plain and fused with the following projection) vs the references."""

import pytest
import torch
from kernel_helpers import assert_close, run_both

# Forward: relu(x)^2 is one float32 product rounded once in both paths (bf16 squares round once too).
# Backward: the reference rounds 2*x and then *dy separately in bf16, the kernel once: up to 2 bf16 ulps
# (2^-7 relative). float32: exact math, 1e-6.
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4099,), (3, 7, 129)])  # not a multiple of the 4096 block
def test_relu_squared_matches_reference(K, shape, dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=gen).to(dtype)
    y, y_ref, (dx,), (dx_ref,) = run_both(K.relu_squared, K.relu_squared_reference, [x], [0])
    assert "ReluSquared" in type(y.grad_fn).__name__
    assert_close(y, y_ref, **TOL[dtype], what=f"relu_squared y {dtype}")
    assert_close(dx, dx_ref, **TOL[dtype], what=f"relu_squared dx {dtype}")


# Fused with the projection: the matmuls are the same torch calls in both paths, so float32 differs only by
# accumulation order (1e-5). bf16: dW is a bf16 matmul of the recomputed activation; the activation and the
# upstream gradient are each rounded at a slightly different point than in the reference: 2e-2 relative,
# atol scaled to the size of the result (sums over 64 products of O(1) values).
FUSED_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=5e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_squared_linear_matches_reference(K, dtype):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 9, 64, generator=gen).to(dtype)
    w = (torch.randn(24, 64, generator=gen) / 8).to(dtype)
    y, y_ref, (dx, dw), (dx_ref, dw_ref) = run_both(K.relu_squared_linear, K.relu_squared_linear_reference,
                                                    [x, w], [0, 1])
    assert "ReluSquaredLinear" in type(y.grad_fn).__name__
    assert_close(y, y_ref, **FUSED_TOL[dtype], what=f"relu_squared_linear y {dtype}")
    assert_close(dx, dx_ref, **FUSED_TOL[dtype], what=f"relu_squared_linear dx {dtype}")
    assert_close(dw, dw_ref, **FUSED_TOL[dtype], what=f"relu_squared_linear dw {dtype}")
