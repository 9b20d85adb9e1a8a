"""RMSNorm without a learnable weight (the baseline's norm), forward and backward in Triton.

y = x * rstd, rstd = 1 / sqrt(mean(x^2) + eps), reduced over the last dimension in float32.
The forward saves x and one float32 rstd per row; the backward needs nothing else:
    dx = rstd * (dy - x * rstd^2 * mean(dy * x))
"""

import torch
import torch.nn.functional as F

from ._triton import first_order_only, next_pow2, tl, triton

# Rows wider than this fall back to the reference: one program holds a whole row in registers.
MAX_COLS = 65536


def rms_norm_reference(x: torch.Tensor, eps: float | None = 1e-6) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=eps)


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, y_ptr, rstd_ptr, n_rows, n_cols, x_stride, y_stride, eps,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols[None, :] < n_cols)
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    y = x * rstd[:, None]
    tl.store(y_ptr + rows64[:, None] * y_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, rstd_ptr, dx_ptr, n_rows, n_cols, dy_stride, x_stride, dx_stride,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols[None, :] < n_cols)
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + rows64[:, None] * dy_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
    dot = tl.sum(dy * x, axis=1) / n_cols
    dx = rstd[:, None] * (dy - x * (rstd * rstd * dot)[:, None])
    tl.store(dx_ptr + rows64[:, None] * dx_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _blocks(n_cols: int) -> tuple[int, int, int]:
    # Several rows per program when rows are short (QK-norm rows are head_dim=128 wide): about 4K
    # elements per program keeps every lane busy. Not tuned on a GPU yet; bench/kernels.py measures it.
    block_n = next_pow2(n_cols)
    block_m = max(1, min(64, 4096 // block_n))
    num_warps = 4 if block_m * block_n <= 4096 else (8 if block_m * block_n <= 16384 else 16)
    return block_m, block_n, num_warps


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm_fwd(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward on x viewed as (rows, cols); returns (y, x_rows, rstd)."""
    x2 = _as_rows(x)
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block_m, block_n, num_warps = _blocks(n_cols)
    grid = (triton.cdiv(n_rows, block_m),)
    _rms_norm_fwd_kernel[grid](x2, y, rstd, n_rows, n_cols, x2.stride(0), y.stride(0), eps,
                               BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return y.view(x.shape), x2, rstd


def rms_norm_bwd(dy: torch.Tensor, x2: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    dy2 = _as_rows(dy)
    n_rows, n_cols = x2.shape
    dx = torch.empty_like(x2)
    block_m, block_n, num_warps = _blocks(n_cols)
    grid = (triton.cdiv(n_rows, block_m),)
    _rms_norm_bwd_kernel[grid](dy2, x2, rstd, dx, n_rows, n_cols, dy2.stride(0), x2.stride(0), dx.stride(0),
                               BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return dx


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        y, x2, rstd = rms_norm_fwd(x, eps)
        ctx.save_for_backward(x2, rstd)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    @first_order_only("rms_norm")
    def backward(ctx, dy: torch.Tensor):
        x2, rstd = ctx.saved_tensors
        return rms_norm_bwd(dy, x2, rstd).view(ctx.x_shape), None


def rms_norm_triton(x: torch.Tensor, eps: float | None = 1e-6) -> torch.Tensor:
    if eps is None:  # same default as F.rms_norm
        eps = torch.finfo(x.dtype).eps
    return RMSNormFunction.apply(x, float(eps))


def supported(x: torch.Tensor) -> bool:
    # float64 goes to the reference: the kernel computes in float32 (gradcheck needs float64 throughout)
    return (x.dim() >= 1 and 0 < x.shape[-1] <= MAX_COLS and x.numel() > 0 and x.is_floating_point()
            and x.dtype != torch.float64)
