"""lm_head projection + softcap + cross-entropy in row chunks, so (rows x vocab) logits never exist.

For each chunk of C rows: logits_c = x_c @ W^T (C x V, in the matmul dtype), then the cross-entropy
kernel of cross_entropy.py writes the per-row loss and, in place over logits_c, the gradient with
respect to the logits; the chunk's contributions dx_c = g_c @ W and dW += g_c^T @ x_c are taken at once
and logits_c is reused for the next chunk. Peak extra memory is one chunk of logits plus dx and a
float32 dW, instead of several (rows x vocab) float32 tensors (arithmetic in docs/kernels.md).

Precision: the matmul runs in the dtype the reference `x @ weight.t()` would use (the autocast dtype
when autocast is on, else x's dtype), and the cross-entropy in float32, so per-token losses match the
reference path to float tolerance in evaluation (no bf16 -> fp32 switch that would shift val_bpb).

Gradients for reduction "mean"/"sum" are computed in the forward (grad_output is a scalar, applied in
backward); for "none" the backward recomputes each chunk, because a per-row grad_output must be applied
before the rows are contracted into dW.
"""

import torch

from ._triton import first_order_only, next_pow2
from .cross_entropy import (
    REDUCTIONS,
    reduce_losses,
    softcap_ce_rows,
    softcap_cross_entropy_reference,
    valid_count_scale,
)


def linear_softcap_cross_entropy_reference(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                           softcap: float, ignore_index: int = -1,
                                           reduction: str = "mean") -> torch.Tensor:
    logits = x @ weight.t()
    return softcap_cross_entropy_reference(logits, targets, softcap, ignore_index, reduction)


def _matmul_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(x.dtype, weight.dtype)


def default_chunk_rows(n_rows: int, dim: int, vocab: int) -> int:
    # Chunk logits about the size of x itself (rows*dim elements), as Liger-Kernel does: at the reference
    # recipe's shape (262,144 rows, dim 512, vocab 8192) that is 16 chunks of 16,384 rows, 268 MB of bf16 logits
    # each; at train.py's default device batch of 64, 16 chunks of 8,192 rows, 134 MB each. Fewer, larger chunks
    # cost memory; many small ones starve the matmuls. Untuned on a GPU.
    rows = next_pow2(max(1, -(-n_rows * dim // vocab)))
    return max(256, min(rows, n_rows))


def _chunks(n_rows: int, chunk: int):
    for start in range(0, n_rows, chunk):
        yield start, min(start + chunk, n_rows)


def _loss_and_grads(x2, w_c, t, softcap, ignore_index, scale, need_dx, need_dw, chunk, block_v, cdt,
                    weight_dtype):
    """One sweep over the chunks: per-row losses, and (when asked) dx and a float32 dW for the loss
    weighted by `scale` (one value or one per row)."""
    n_rows = x2.shape[0]
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    dx = torch.empty_like(x2) if need_dx else None
    dw = torch.zeros(w_c.shape, dtype=torch.float32, device=x2.device) if need_dw else None
    per_row = scale is not None and scale.numel() > 1
    for s, e in _chunks(n_rows, chunk):
        x_c = x2[s:e].to(cdt)
        logits = x_c @ w_c.t()
        if need_dx or need_dw:
            sc = scale[s:e] if per_row else scale
            loss_rows[s:e] = softcap_ce_rows(logits, t[s:e], softcap, ignore_index, grad=logits, scale=sc,
                                             block_v=block_v)
            if need_dx:
                dx[s:e] = logits @ w_c
            if need_dw:
                if cdt == torch.float32:
                    dw.addmm_(logits.t(), x_c)
                else:  # bf16 product per chunk (fp32 accumulate inside), summed in float32 across chunks
                    dw += logits.t() @ x_c
        else:
            loss_rows[s:e] = softcap_ce_rows(logits, t[s:e], softcap, ignore_index, block_v=block_v)
    return loss_rows, dx, (dw.to(weight_dtype) if dw is not None else None)


class LinearSoftcapCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
                ignore_index: int, reduction: str, chunk_size: int | None, block_v: int | None, grad_enabled: bool) -> torch.Tensor:
        cdt = _matmul_dtype(x, weight)
        x2 = x.reshape(-1, x.shape[-1])
        t = targets.reshape(-1).contiguous()  # reshape keeps a strided 1-D view strided; the kernel reads it dense
        n_rows = x2.shape[0]
        chunk = chunk_size or default_chunk_rows(n_rows, x2.shape[1], weight.shape[0])
        # needs_input_grad is True even under torch.no_grad() (eval), hence grad_enabled from the caller
        need_dx = ctx.needs_input_grad[0] and grad_enabled
        need_dw = ctx.needs_input_grad[1] and grad_enabled
        n_valid, inv = valid_count_scale(t, ignore_index) if reduction == "mean" else (None, None)
        ctx.meta = (x.shape, cdt, softcap, ignore_index, reduction, chunk, block_v, weight.dtype)
        with torch.autocast(x.device.type, enabled=False):
            w_c = weight.to(cdt)
            if (need_dx or need_dw) and reduction != "none":
                scale = inv if reduction == "mean" else torch.ones(1, dtype=torch.float32, device=x.device)
                # dW stays float32 until backward applies grad_output (rounded to bf16 once, not twice)
                loss_rows, dx, dw = _loss_and_grads(x2, w_c, t, softcap, ignore_index, scale, need_dx, need_dw,
                                                    chunk, block_v, cdt, torch.float32)
                ctx.save_for_backward(dx, dw)
            else:
                loss_rows, _, _ = _loss_and_grads(x2, w_c, t, softcap, ignore_index, None, False, False,
                                                  chunk, block_v, cdt, weight.dtype)
                if need_dx or need_dw:  # reduction "none": recomputed in backward
                    ctx.save_for_backward(x2, weight, t)
        return reduce_losses(loss_rows, n_valid, reduction)

    @staticmethod
    @first_order_only("linear_ce")
    def backward(ctx, grad_output: torch.Tensor):
        x_shape, cdt, softcap, ignore_index, reduction, chunk, block_v, weight_dtype = ctx.meta
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(grad_output.device.type, enabled=False):
            if reduction != "none":
                dx, dw = ctx.saved_tensors
                # grad_output (loss / grad_accum, say) applied in float32: rounded to bf16 first, 1/3 became
                # 0.333984, a bias of +0.2 % on every entry (found by review)
                g = grad_output.float()
                dx = (dx.float() * g).to(dx.dtype) if need_dx else None
                dw = (dw * g).to(weight_dtype) if need_dw else None
            else:
                x2, weight, t = ctx.saved_tensors
                _, dx, dw = _loss_and_grads(x2, weight.to(cdt), t, softcap, ignore_index, grad_output.float(),
                                            need_dx, need_dw, chunk, block_v, cdt, weight.dtype)
        if dx is not None:
            dx = dx.view(x_shape)
        return dx, dw, None, None, None, None, None, None, None


def linear_softcap_cross_entropy_triton(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                        softcap: float, ignore_index: int = -1, reduction: str = "mean",
                                        chunk_size: int | None = None,
                                        block_v: int | None = None) -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return LinearSoftcapCrossEntropyFunction.apply(x, weight, targets, softcap, ignore_index, reduction,
                                                   chunk_size, block_v, torch.is_grad_enabled())


def supported(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> bool:
    # float64 goes to the reference: the kernel computes in float32 (gradcheck needs float64 throughout)
    return (x.dtype != torch.float64 and weight.dtype != torch.float64 and x.dim() >= 1 and weight.dim() == 2 and x.shape[-1] == weight.shape[1]
            and x.numel() // max(1, x.shape[-1]) == targets.numel() and not targets.is_floating_point())
