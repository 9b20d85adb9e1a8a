"""Softcapped cross-entropy: logits -> softcap * tanh(logits / softcap) -> cross-entropy, in Triton.

One program per row walks the vocabulary in blocks twice: an online logsumexp (pass 1), then, when a
gradient is needed, the gradient of the loss with respect to the *raw* logits (pass 2):
    z = c * tanh(l / c),  dloss/dl = (softmax(z) - onehot(target)) * (1 - tanh(l / c)^2) * scale
Loss and gradient come out of the forward, so the backward is a rescale by grad_output and no float32
copy of the (rows x vocab) logits ever exists: the reference path materialises three of them (the
.float() copy, the tanh output and the softmax gradient). Everything inside the kernel is float32;
per-row losses are returned in float32 in every mode, so evaluation sums exactly what the reference sums.
"""

import torch
import torch.nn.functional as F

from ._triton import first_order_only, next_pow2, tl, triton

REDUCTIONS = ("mean", "sum", "none")


def softcap_cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, softcap: float,
                                    ignore_index: int = -1, reduction: str = "mean") -> torch.Tensor:
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up to float32; float64 stays
    logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)


@triton.jit
def _tanh(x):
    # tanh from exp: no tanh in tl.math across Triton 3.x versions. exp overflow gives exactly +-1.
    # 1 - 2/(e^2x + 1) cancels near 0 (absolute error about 1e-7 whatever x): times a softcap of 15 that is
    # about 1e-6 in a logit, but a softcap raised to switch it off (1e9) made every logit 0 and every loss
    # log(vocab) (found by review). Below 0.25 the Taylor series instead: its first left-out term is under
    # 1e-8 of tanh there, so the relative error is float32's own.
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    return tl.where(tl.abs(x) < 0.25, series, 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))


@triton.jit
def _softcap_ce_fwd_kernel(logits_ptr, logits_stride, grad_ptr, grad_stride, targets_ptr, loss_ptr,
                           scale_ptr, scale_stride, n_cols, softcap, ignore_index,
                           COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != ignore_index
    # A target outside [0, n_cols) that is not ignored would read another row's logit (or past the buffer):
    # its loss and gradient are NaN instead, which the harness fails at once (F.cross_entropy raises there).
    in_range = (target >= 0) & (target < n_cols)
    cols = tl.arange(0, BLOCK_V)
    # the target's logit, read before pass 1: its reductions order this load of every warp before any store of
    # pass 2, which may overwrite the logits with the gradient (grad_ptr aliasing logits_ptr). Read after pass 1,
    # a warp that reached pass 2 first could have replaced it for a slower one (found by review, from reading)
    raw_t = tl.load(row_ptr + tl.where(valid & in_range, target, 0)).to(tl.float32)

    # pass 1: online logsumexp of the softcapped logits
    m = float("-inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        raw = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.where(mask, softcap * _tanh(raw / softcap), float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    loss = tl.where(valid, tl.where(in_range, lse - softcap * _tanh(raw_t / softcap), float("nan")), 0.0)
    tl.store(loss_ptr + row, loss)

    if COMPUTE_GRAD:
        # pass 2: gradient with respect to the raw logits; grad_ptr may alias logits_ptr (each block is
        # read before it is written). Ignored rows get a zero gradient through scale = 0.
        scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
        scale = tl.where(valid, tl.where(in_range, scale, float("nan")), 0.0)
        grad_row_ptr = grad_ptr + row * grad_stride
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            mask = offs < n_cols
            raw = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            t = _tanh(raw / softcap)
            p = tl.exp(softcap * t - lse)
            p = tl.where(offs == target, p - 1.0, p)
            g = p * (1.0 - t * t) * scale
            tl.store(grad_row_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softcap_ce_bwd_kernel(grad_ptr, grad_stride, gout_ptr, gout_stride, targets_ptr, n_cols, ignore_index,
                           BLOCK_V: tl.constexpr):
    # Chain rule with the upstream gradient: scales the stored gradient in place, one block per program. An
    # ignored row's gradient is zero whatever the upstream one (0 x inf would be NaN; F.cross_entropy gives 0).
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < n_cols
    gout = tl.load(gout_ptr + row * gout_stride).to(tl.float32)
    gout = tl.where(tl.load(targets_ptr + row) == ignore_index, 0.0, gout)
    ptrs = grad_ptr + row * grad_stride + offs
    g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (g * gout).to(grad_ptr.dtype.element_ty), mask=mask)


def _block_v(n_cols: int, block_v: int | None) -> tuple[int, int]:
    # 4096 float32 lanes per block: 16 KB of registers per program spread over 8 warps. Untuned (no GPU
    # was available when this was written); bench/kernels.py is where a GPU session should revisit it.
    bv = block_v or min(next_pow2(n_cols), 4096)
    return bv, (8 if bv >= 4096 else 4)


def softcap_ce_rows(logits: torch.Tensor, targets: torch.Tensor, softcap: float, ignore_index: int,
                    grad: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                    block_v: int | None = None) -> torch.Tensor:
    """Per-row float32 losses of 2-D `logits` (rows, vocab); with `grad` (same shape, may be `logits`
    itself) also writes d(loss_row * scale_row)/d(logits). `scale` holds one value or one per row."""
    n_rows, n_cols = logits.shape
    # targets are read as a dense vector: a strided view (pairs[:, 0]) would give other rows' targets
    assert logits.stride(-1) == 1 and targets.dim() == 1 and targets.shape[0] == n_rows
    assert targets.stride(0) == 1 or n_rows <= 1
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return loss
    compute_grad = grad is not None
    if compute_grad:
        assert grad.shape == logits.shape and grad.stride(-1) == 1 and scale is not None
        scale_stride = scale.stride(0) if scale.dim() == 1 and scale.numel() > 1 else 0
    else:
        grad, scale, scale_stride = logits, loss, 0  # unused placeholders
    bv, num_warps = _block_v(n_cols, block_v)
    _softcap_ce_fwd_kernel[(n_rows,)](logits, logits.stride(0), grad, grad.stride(0), targets, loss,
                                      scale, scale_stride, n_cols, float(softcap), int(ignore_index),
                                      COMPUTE_GRAD=compute_grad, BLOCK_V=bv, num_warps=num_warps)
    return loss


def softcap_ce_scale_grad(grad: torch.Tensor, grad_output: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                          block_v: int | None = None) -> torch.Tensor:
    n_rows, n_cols = grad.shape
    if n_rows == 0:
        return grad
    assert targets.dim() == 1 and targets.shape[0] == n_rows and (targets.stride(0) == 1 or n_rows <= 1)
    gout_stride = grad_output.stride(0) if grad_output.dim() == 1 else 0
    bv, num_warps = _block_v(n_cols, block_v)
    grid = (n_rows, triton.cdiv(n_cols, bv))
    _softcap_ce_bwd_kernel[grid](grad, grad.stride(0), grad_output, gout_stride, targets, n_cols, int(ignore_index),
                                 BLOCK_V=bv, num_warps=num_warps)
    return grad


def valid_count_scale(targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(number of non-ignored targets as float32, 1/max(that, 1)), both on device: no host sync."""
    n_valid = (targets != ignore_index).sum().float()
    return n_valid, (1.0 / n_valid.clamp(min=1.0)).reshape(1)


def reduce_losses(loss_rows: torch.Tensor, n_valid: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / n_valid  # 0/0 = nan when every target is ignored, as in F.cross_entropy


class SoftcapCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, softcap: float, ignore_index: int,
                reduction: str, inplace_backward: bool, block_v: int | None, grad_enabled: bool) -> torch.Tensor:
        l2 = logits.reshape(-1, logits.shape[-1])
        if l2.stride(-1) != 1:
            l2 = l2.contiguous()
        t = targets.reshape(-1).contiguous()  # reshape keeps a strided 1-D view strided; the kernel reads it dense
        n_valid, inv = valid_count_scale(t, ignore_index) if reduction == "mean" else (None, None)
        grad = None
        # needs_input_grad is True even under torch.no_grad(), hence grad_enabled from the caller
        if ctx.needs_input_grad[0] and grad_enabled:
            grad = l2 if inplace_backward else torch.empty_like(l2)
            # mean folds 1/n_valid in now; sum and none are rescaled by grad_output in backward
            scale = inv if reduction == "mean" else torch.ones(1, dtype=torch.float32, device=l2.device)
            loss_rows = softcap_ce_rows(l2, t, softcap, ignore_index, grad=grad, scale=scale, block_v=block_v)
            if inplace_backward and l2.data_ptr() == logits.data_ptr():
                # The caller's logits now hold the gradient: bump their version so autograd refuses
                # any other node that saved them, instead of silently reading the gradient. The buffer
                # is kept as a plain attribute: saving a view of a dirtied input is refused by autograd.
                torch.autograd.graph.increment_version(logits)
            ctx.grad, ctx.targets = grad, t
        else:
            loss_rows = softcap_ce_rows(l2, t, softcap, ignore_index, block_v=block_v)
        ctx.logits_shape = logits.shape
        ctx.block_v, ctx.ignore_index = block_v, ignore_index
        return reduce_losses(loss_rows, n_valid, reduction)

    @staticmethod
    @first_order_only("softcap_ce")
    def backward(ctx, grad_output: torch.Tensor):
        grad, ctx.grad = ctx.grad, None
        if grad is None:  # scaled in place by the first backward: a second one cannot be answered
            raise RuntimeError("softcap_cross_entropy: backward through the same loss a second time (retain_graph) "
                               "is not supported by the kernel, which scales its stored gradient in place; use "
                               "kernels.set_ops without softcap_ce/linear_ce for that")
        grad = softcap_ce_scale_grad(grad, grad_output.float(), ctx.targets, ctx.ignore_index, ctx.block_v)
        return grad.view(ctx.logits_shape), None, None, None, None, None, None, None


def softcap_cross_entropy_triton(logits: torch.Tensor, targets: torch.Tensor, softcap: float,
                                 ignore_index: int = -1, reduction: str = "mean",
                                 inplace_backward: bool = False, block_v: int | None = None) -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return SoftcapCrossEntropyFunction.apply(logits, targets, softcap, ignore_index, reduction,
                                             inplace_backward, block_v, torch.is_grad_enabled())


def supported(logits: torch.Tensor, targets: torch.Tensor) -> bool:
    # float64 goes to the reference: the kernel computes in float32 (gradcheck needs float64 throughout)
    return (logits.dim() >= 1 and logits.is_floating_point() and logits.dtype != torch.float64 and logits.shape[-1] > 0
            and targets.numel() * logits.shape[-1] == logits.numel() and not targets.is_floating_point())
