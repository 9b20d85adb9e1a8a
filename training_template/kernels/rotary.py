"""Rotary position embedding (rotate-half convention), forward and backward in Triton.

With x = [x1, x2] split at D/2:  y1 = x1*cos + x2*sin,  y2 = x2*cos - x1*sin.
The backward is the inverse rotation (sin -> -sin) applied to dy. cos/sin are read through their
broadcast strides, so the usual (1, T, 1, D/2) tables are never expanded in memory. cos/sin get no
gradient here (they are buffers); the dispatcher uses the reference when they require one.
"""

import torch

from ._triton import first_order_only, next_pow2, tl, triton


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, H, D); cos/sin broadcastable to (B, T, H, D/2)
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], dim=-1).type_as(x)


@triton.jit
def _rotary_block(in_ptr, cos_ptr, sin_ptr, out_ptr, T, H, HALF,
                  si_b, si_t, si_h, si_d, sc_b, sc_t, sc_h, sc_d, ss_b, ss_t, ss_h, ss_d,
                  so_b, so_t, so_h, so_d, INVERSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask = (h < H)[:, None] & (d < HALF)[None, :]
    x_off = b * si_b + t * si_t + h[:, None] * si_h + d[None, :] * si_d
    x1 = tl.load(in_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(in_ptr + x_off + HALF * si_d, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + b * sc_b + t * sc_t + h[:, None] * sc_h + d[None, :] * sc_d,
                mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + b * ss_b + t * ss_t + h[:, None] * ss_h + d[None, :] * ss_d,
                mask=mask, other=0.0).to(tl.float32)
    if INVERSE:
        s = -s
    y1 = x1 * c + x2 * s
    y2 = x2 * c - x1 * s
    o_off = b * so_b + t * so_t + h[:, None] * so_h + d[None, :] * so_d
    tl.store(out_ptr + o_off, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + o_off + HALF * so_d, y2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_fwd_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, T, H, HALF,
                       sx_b, sx_t, sx_h, sx_d, sc_b, sc_t, sc_h, sc_d, ss_b, ss_t, ss_h, ss_d,
                       sy_b, sy_t, sy_h, sy_d, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    _rotary_block(x_ptr, cos_ptr, sin_ptr, y_ptr, T, H, HALF, sx_b, sx_t, sx_h, sx_d, sc_b, sc_t, sc_h, sc_d,
                  ss_b, ss_t, ss_h, ss_d, sy_b, sy_t, sy_h, sy_d, False, BLOCK_H, BLOCK_D)


@triton.jit
def _rotary_bwd_kernel(dy_ptr, cos_ptr, sin_ptr, dx_ptr, T, H, HALF,
                       sy_b, sy_t, sy_h, sy_d, sc_b, sc_t, sc_h, sc_d, ss_b, ss_t, ss_h, ss_d,
                       sx_b, sx_t, sx_h, sx_d, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    _rotary_block(dy_ptr, cos_ptr, sin_ptr, dx_ptr, T, H, HALF, sy_b, sy_t, sy_h, sy_d, sc_b, sc_t, sc_h, sc_d,
                  ss_b, ss_t, ss_h, ss_d, sx_b, sx_t, sx_h, sx_d, True, BLOCK_H, BLOCK_D)


def _launch(kernel, src: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    B, T, H, D = src.shape
    half = D // 2
    table_shape = (B, T, H, half)
    cos_e, sin_e = cos.expand(table_shape), sin.expand(table_shape)  # strides only, no copy
    out = torch.empty(src.shape, dtype=src.dtype, device=src.device)
    block_d = next_pow2(half)
    # Whole heads per program, about 2K elements; untuned on a GPU.
    block_h = max(1, min(next_pow2(H), 2048 // block_d))
    grid = (B * T, triton.cdiv(H, block_h))
    if B * T == 0 or H == 0:
        return out
    kernel[grid](src, cos_e, sin_e, out, T, H, half, *src.stride(), *cos_e.stride(), *sin_e.stride(),
                 *out.stride(), BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4)
    return out


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _launch(_rotary_fwd_kernel, x, cos, sin)

    @staticmethod
    @first_order_only("rotary")
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _launch(_rotary_bwd_kernel, dy, cos, sin), None, None


def apply_rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return RotaryFunction.apply(x, cos, sin)


def supported(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    if x.dim() != 4 or x.shape[-1] % 2 or not x.is_floating_point() or x.dtype == torch.float64:  # float32 kernel
        return False
    if cos.requires_grad or sin.requires_grad:
        return False
    table_shape = (*x.shape[:3], x.shape[-1] // 2)
    try:
        return (torch.broadcast_shapes(cos.shape, table_shape) == table_shape
                and torch.broadcast_shapes(sin.shape, table_shape) == table_shape)
    except RuntimeError:
        return False
