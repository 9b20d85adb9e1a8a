"""ReLU-squared MLP activation, forward and backward in Triton.

y = relu(x)^2, dx = 2 * relu(x) * dy, in float32 and rounded once to the input dtype.

`relu_squared_linear(x, weight)` fuses the activation with the projection that follows it in the MLP
(y = relu(x)^2 @ weight^T) to save memory, not time: the stock graph keeps both x (for the activation's
backward) and relu(x)^2 (for the projection's weight gradient) alive until backward; this one keeps
only x and recomputes the activation in backward (one extra elementwise pass). At the baseline shape
that is 262,144 x 2,048 bf16 = 1.07 GB per layer, 8.6 GB over 8 layers. Whether that pays off next to
torch.compile has not been measured yet (bench/kernels.py does it).
"""

import torch
import torch.nn.functional as F

from ._triton import first_order_only, tl, triton

BLOCK = 4096  # elements per program; untuned on a GPU


def relu_squared_reference(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


def relu_squared_linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(relu_squared_reference(x), weight)


@triton.jit
def _relu_squared_fwd_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # not tl.maximum: it lowers to maxnum, which turns NaN into 0 and would hide a diverged run from the NaN guard
    r = tl.where(x < 0.0, 0.0, x)
    tl.store(y_ptr + offs, (r * r).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _relu_squared_bwd_kernel(dy_ptr, x_ptr, dx_ptr, y_ptr, n, STORE_Y: tl.constexpr, BLOCK: tl.constexpr):
    # With STORE_Y it also rewrites the activation (for the fused linear's weight gradient) from the same
    # read of x.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.where(x < 0.0, 0.0, x)  # NaN stays NaN (above)
    tl.store(dx_ptr + offs, (2.0 * r * dy).to(dx_ptr.dtype.element_ty), mask=mask)
    if STORE_Y:
        tl.store(y_ptr + offs, (r * r).to(y_ptr.dtype.element_ty), mask=mask)


def relu_squared_fwd(x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    xc = x.contiguous()
    y = torch.empty(xc.shape, dtype=out_dtype or x.dtype, device=x.device)
    n = xc.numel()
    if n:
        _relu_squared_fwd_kernel[(triton.cdiv(n, BLOCK),)](xc, y, n, BLOCK=BLOCK, num_warps=8)
    return y


def relu_squared_bwd(dy: torch.Tensor, x: torch.Tensor,
                     y_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    dyc, xc = dy.contiguous(), x.contiguous()
    dx = torch.empty_like(xc)
    y = torch.empty(xc.shape, dtype=y_dtype, device=x.device) if y_dtype is not None else None
    n = xc.numel()
    if n:
        _relu_squared_bwd_kernel[(triton.cdiv(n, BLOCK),)](dyc, xc, dx, y if y is not None else dx, n,
                                                            STORE_Y=y is not None, BLOCK=BLOCK, num_warps=8)
    return dx, y


class ReluSquaredFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return relu_squared_fwd(x)

    @staticmethod
    @first_order_only("relu_squared")
    def backward(ctx, dy: torch.Tensor):
        (x,) = ctx.saved_tensors
        return relu_squared_bwd(dy, x)[0]


class ReluSquaredLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            h = relu_squared_fwd(x, out_dtype=cdt)
            y = h @ weight.to(cdt).t()
        ctx.save_for_backward(x, weight)  # not h: recomputed in backward
        ctx.cdt = cdt
        return y

    @staticmethod
    @first_order_only("relu_squared")
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        cdt = ctx.cdt
        with torch.autocast(dy.device.type, enabled=False):
            dy = dy.to(cdt)
            dh = dy @ weight.to(cdt)
            dx, h = relu_squared_bwd(dh, x, y_dtype=cdt if ctx.needs_input_grad[1] else None)
            dw = (dy.reshape(-1, dy.shape[-1]).t() @ h.reshape(-1, h.shape[-1])).to(weight.dtype) if h is not None else None
        return dx.view(x.shape), dw


def relu_squared_triton(x: torch.Tensor) -> torch.Tensor:
    return ReluSquaredFunction.apply(x)


def relu_squared_linear_triton(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return ReluSquaredLinearFunction.apply(x, weight)


def supported(x: torch.Tensor) -> bool:
    return x.is_floating_point() and x.dtype != torch.float64  # float64 to the reference: the kernel is float32
