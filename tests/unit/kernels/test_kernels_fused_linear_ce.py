"""Chunked lm_head + softcap + cross-entropy vs the reference (x @ W.T, then the softcapped CE)."""

import pytest
import torch
from kernel_helpers import assert_close, leaf, run_both

SOFTCAP = 15.0
IGNORE = -1
ROWS, DIM, VOCAB = (3, 7), 32, 300  # 21 rows in chunks of 8: two full chunks and a ragged one


def _inputs(dtype, seed, ignored=(0, 9, 20)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*ROWS, DIM, generator=gen).to(dtype)
    w = (torch.randn(VOCAB, DIM, generator=gen) * 0.5).to(dtype)  # logits of a few units, some saturated
    targets = torch.randint(0, VOCAB, ROWS, generator=gen)
    targets.view(-1)[list(ignored)] = IGNORE  # an ignored row in each chunk
    return x, w, targets


def _tol(dtype, ref, what):
    # float32: the same matmuls on row chunks (same reduction over DIM per row) and the CE kernel's
    # float32 math: losses 2e-5 absolute, gradients 1e-5 relative to their largest entry.
    # bfloat16: logits are rounded to bf16 in both paths; the kernel writes the logits gradient in bf16
    # (the reference keeps it in float32 until the x/W matmuls) and sums dW over chunks in float32 (the
    # reference rounds one bf16 product): a couple of bf16 ulps of the largest entry, rtol 2e-2.
    scale = ref.abs().max().item() if ref.numel() else 1.0
    if what == "loss":
        return dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-4, rtol=1e-4)
    if dtype == torch.float32:
        return dict(atol=1e-5 * scale, rtol=1e-5)
    return dict(atol=1e-2 * scale, rtol=2e-2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_ce_matches_reference(K, dtype, reduction):
    x, w, targets = _inputs(dtype, seed=31)

    def kernel(x_, w_):
        return K.linear_softcap_cross_entropy(x_, w_, targets, SOFTCAP, IGNORE, reduction, chunk_size=8)

    def reference(x_, w_):
        return K.linear_softcap_cross_entropy_reference(x_, w_, targets, SOFTCAP, IGNORE, reduction)

    loss, loss_ref, (dx, dw), (dx_ref, dw_ref) = run_both(kernel, reference, [x, w], [0, 1])
    assert "LinearSoftcapCrossEntropy" in type(loss.grad_fn).__name__
    assert_close(loss, loss_ref, **_tol(dtype, loss_ref, "loss"), what=f"linear ce loss {reduction} {dtype}")
    assert_close(dx, dx_ref, **_tol(dtype, dx_ref, "grad"), what=f"linear ce dx {reduction} {dtype}")
    assert_close(dw, dw_ref, **_tol(dtype, dw_ref, "grad"), what=f"linear ce dW {reduction} {dtype}")
    assert torch.all(dx.view(-1, DIM)[[0, 9, 20]] == 0), "ignored rows must get a zero dx"


def test_linear_ce_frozen_weight_and_default_chunking(K):
    x, w, targets = _inputs(torch.float32, seed=32)
    xk, xr = leaf(x), leaf(x)
    loss = K.linear_softcap_cross_entropy(xk, w, targets, SOFTCAP)  # default chunk size: one chunk here
    loss_ref = K.linear_softcap_cross_entropy_reference(xr, w, targets, SOFTCAP)
    loss.backward()
    loss_ref.backward()
    assert_close(loss, loss_ref, **_tol(torch.float32, loss_ref, "loss"), what="frozen-weight loss")
    assert_close(xk.grad, xr.grad, **_tol(torch.float32, xr.grad, "grad"), what="frozen-weight dx")


def test_linear_ce_eval_per_token_losses_match_under_autocast(K):
    # The evaluation path as train.py runs it: float32 activations and weights, bf16 autocast, no_grad,
    # reduction="none"; the per-token losses are summed into val_bpb. The fused path must do the matmul in
    # the same dtype as the reference (bf16 under autocast) and the CE in float32, so the two agree to
    # float32 tolerance rather than drifting by bf16 rounding.
    x, w, targets = _inputs(torch.float32, seed=33)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        per_tok = K.linear_softcap_cross_entropy(x, w, targets, SOFTCAP, reduction="none", chunk_size=8)
        per_tok_ref = K.linear_softcap_cross_entropy_reference(x, w, targets, SOFTCAP, reduction="none")
    assert per_tok.dtype == torch.float32 and per_tok_ref.dtype == torch.float32
    assert_close(per_tok, per_tok_ref, atol=2e-5, rtol=1e-5, what="eval per-token losses (autocast)")
    total, total_ref = per_tok.double().sum().item(), per_tok_ref.double().sum().item()
    assert abs(total - total_ref) <= 1e-5 * abs(total_ref), (total, total_ref)


def test_linear_ce_training_under_autocast(K):
    x, w, targets = _inputs(torch.float32, seed=34)

    def kernel(x_, w_):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return K.linear_softcap_cross_entropy(x_, w_, targets, SOFTCAP, chunk_size=8)

    def reference(x_, w_):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return K.linear_softcap_cross_entropy_reference(x_, w_, targets, SOFTCAP)

    loss, loss_ref, (dx, dw), (dx_ref, dw_ref) = run_both(kernel, reference, [x, w], [0, 1])
    assert dx.dtype == torch.float32 and dw.dtype == torch.float32  # gradients in the parameters' dtype
    assert_close(loss, loss_ref, atol=2e-5, rtol=1e-5, what="autocast loss")
    assert_close(dx, dx_ref, **_tol(torch.bfloat16, dx_ref, "grad"), what="autocast dx")
    assert_close(dw, dw_ref, **_tol(torch.bfloat16, dw_ref, "grad"), what="autocast dW")
