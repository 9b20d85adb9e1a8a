"""Softcapped cross-entropy kernel vs the reference (float32 softcap + F.cross_entropy)."""

import pytest
import torch
from kernel_helpers import assert_close, leaf, run_both

SOFTCAP = 15.0
IGNORE = -1

# Losses are float32 in both paths, computed from the same logits (bf16 logits are upcast exactly).
# Differences come from the logsumexp order (online, in blocks, vs torch's) and the exp-based tanh
# (absolute error about 1e-6 in a softcapped logit): 2e-5 on losses of order 10 (per token), relative 1e-5
# for sums. Gradients: float32 the same 1e-6-level. bf16: the reference rounds the float32 gradient once;
# the kernel rounds it when stored in the forward and again after the backward multiplies by grad_output
# (exact when grad_output is 1, as in training with reduction="mean"): up to two bf16 ulps, and one ulp is
# up to 2^-7 relative, so rtol 1.6e-2; atol scaled to the largest gradient entry.
LOSS_TOL = dict(atol=2e-5, rtol=1e-5)


def _grad_tol(dtype, ref):
    scale = ref.abs().max().item()
    if dtype == torch.float32:
        return dict(atol=1e-6 * scale, rtol=1e-5)
    return dict(atol=1e-3 * scale, rtol=1.6e-2)


def _inputs(shape, vocab, dtype, seed, ignored_rows=3):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=gen) * 8).to(dtype)  # many softcap-saturated logits
    targets = torch.randint(0, vocab, shape, generator=gen)
    targets.view(-1)[:ignored_rows] = IGNORE
    return logits, targets


CASES = [
    # (row shape, vocab, block_v): vocab not a multiple of the block forces the masked tail; block_v=256
    # walks the row in several blocks (online logsumexp across blocks), None = one block per row.
    ((2, 5), 1000, 256),
    ((13,), 1000, None),
    ((3,), 8192, None),   # the baseline vocabulary, two 4096-wide blocks
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,vocab,block_v", CASES)
def test_softcap_ce_matches_reference(K, shape, vocab, block_v, dtype, reduction):
    logits, targets = _inputs(shape, vocab, dtype, seed=vocab + len(shape))
    ce = K.cross_entropy

    def kernel(lg):
        return ce.softcap_cross_entropy_triton(lg, targets, SOFTCAP, IGNORE, reduction, block_v=block_v)

    def reference(lg):
        return K.softcap_cross_entropy_reference(lg, targets, SOFTCAP, IGNORE, reduction)

    loss, loss_ref, (g,), (g_ref,) = run_both(kernel, reference, [logits], [0])
    assert "SoftcapCrossEntropy" in type(loss.grad_fn).__name__
    assert_close(loss, loss_ref, **LOSS_TOL, what=f"ce loss {reduction} {dtype}")
    assert_close(g, g_ref, **_grad_tol(dtype, g_ref), what=f"ce grad {reduction} {dtype}")
    assert torch.all(g.view(-1, vocab)[:3] == 0), "ignored rows must get a zero gradient"


def test_softcap_ce_public_api_and_inplace_backward(K):
    logits, targets = _inputs((5, 7), 300, torch.float32, seed=3)
    loss_ref = K.softcap_cross_entropy_reference(leaf(logits), targets, SOFTCAP)
    ref_leaf = leaf(logits)
    K.softcap_cross_entropy_reference(ref_leaf * 1.0, targets, SOFTCAP).backward()

    # inplace_backward writes the gradient over the logits it was given (here a non-leaf copy)
    x = leaf(logits)
    work = x * 1.0
    loss = K.softcap_cross_entropy(work, targets, SOFTCAP, inplace_backward=True)
    loss.backward()
    assert_close(loss, loss_ref, **LOSS_TOL, what="ce inplace loss")
    assert_close(x.grad, ref_leaf.grad, **_grad_tol(torch.float32, ref_leaf.grad), what="ce inplace grad")
    assert_close(work.detach(), ref_leaf.grad, **_grad_tol(torch.float32, ref_leaf.grad),
                 what="ce inplace buffer holds the gradient")


def test_softcap_ce_eval_per_token_no_grad(K):
    # Evaluation path: no_grad, reduction="none", bf16 logits as autocast produces them. The per-token
    # losses feed val_bpb, so they must match the reference to float32 tolerance and come out float32.
    logits, targets = _inputs((3, 11), 1000, torch.bfloat16, seed=21)
    with torch.no_grad():
        per_tok = K.softcap_cross_entropy(logits, targets, SOFTCAP, reduction="none")
        per_tok_ref = K.softcap_cross_entropy_reference(logits, targets, SOFTCAP, reduction="none")
    assert per_tok.dtype == torch.float32 and per_tok.shape == (33,)
    assert_close(per_tok, per_tok_ref, **LOSS_TOL, what="ce eval per-token")
    assert torch.all(per_tok[:3] == 0)


def test_softcap_ce_all_targets_ignored_is_nan_like_torch(K):
    logits, targets = _inputs((4,), 50, torch.float32, seed=2, ignored_rows=4)
    loss = K.softcap_cross_entropy(logits, targets, SOFTCAP)
    assert torch.isnan(loss) and torch.isnan(K.softcap_cross_entropy_reference(logits, targets, SOFTCAP))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bad,ignore_index", [(1000 + 5, IGNORE), (1000, IGNORE), (-1, -100)])
def test_softcap_ce_target_out_of_range_is_nan_not_a_read_elsewhere(K, bad, ignore_index, reduction):
    """A target outside the vocabulary (a head narrower than the data's vocabulary, -100 padding with
    ignore_index=-1 left as it is) read another row's logit, or memory past the buffer on the last row, and
    trained on it (found by review). The reference raises; the kernel makes that row's loss and gradient NaN,
    which the harness fails at once."""
    logits, targets = _inputs((6,), 1000, torch.float32, seed=5, ignored_rows=0)
    targets[-1] = bad
    with pytest.raises(IndexError):
        K.softcap_cross_entropy_reference(logits, targets, SOFTCAP, ignore_index, reduction)
    x = leaf(logits)
    loss = K.cross_entropy.softcap_cross_entropy_triton(x, targets, SOFTCAP, ignore_index, reduction, block_v=256)
    if reduction == "none":
        assert torch.isnan(loss[-1]) and torch.isfinite(loss[:-1]).all()
    else:
        assert torch.isnan(loss)
    loss.sum().backward()
    assert torch.isnan(x.grad[-1]).all()
    if reduction == "none":
        assert torch.isfinite(x.grad[:-1]).all()


def test_softcap_ce_non_contiguous_targets_on_both_paths(K):
    """`y[:, 1:]` as targets: the reference viewed them (an error on the CPU path) where the kernel reshaped."""
    logits, rows = _inputs((4, 9), 300, torch.float32, seed=8, ignored_rows=0)
    targets = rows[:, 1:]
    logits = logits[:, 1:]
    assert not targets.is_contiguous()
    loss = K.softcap_cross_entropy(logits, targets, SOFTCAP)
    loss_ref = K.softcap_cross_entropy_reference(logits, targets, SOFTCAP)
    assert_close(loss, loss_ref, **LOSS_TOL, what="ce non-contiguous targets")


def test_softcap_ce_second_backward_is_a_clear_error(K):
    logits, targets = _inputs((5,), 300, torch.float32, seed=9)
    x = leaf(logits)
    loss = K.cross_entropy.softcap_cross_entropy_triton(x, targets, SOFTCAP)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="a second time"):
        loss.backward()
