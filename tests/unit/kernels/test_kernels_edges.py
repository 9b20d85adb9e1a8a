"""Edges a kernel review found wrong, each against the reference (interpreted kernels, CPU): strided 1-D targets,
a softcap raised to switch it off, NaN through ReLU^2, a second-order gradient, a non-unit upstream scale in bf16,
an infinite upstream gradient on ignored rows, float64 inputs."""

import pytest
import torch
from kernel_helpers import assert_close, leaf

SOFTCAP = 15.0


def test_strided_one_dimensional_targets_are_read_as_the_targets(K):
    # pairs[:, 0] is a 1-D view with stride 2: reshape(-1) kept it strided and the kernel read pairs' flat
    # buffer (row 1 got row 0's second column): wrong losses and gradients, silently
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen)
    pairs = torch.randint(0, 50, (6, 2), generator=gen)
    pairs[:, 1] = (pairs[:, 0] + 7) % 50  # every second column differs from the first
    targets = pairs[:, 0]
    assert targets.dim() == 1 and targets.stride(0) == 2
    for reduction in ("none", "mean"):
        k = K.softcap_cross_entropy(logits, targets, SOFTCAP, reduction=reduction)
        r = K.softcap_cross_entropy_reference(logits, targets, SOFTCAP, reduction=reduction)
        assert_close(k, r, atol=2e-5, rtol=1e-5, what=f"softcap_ce strided targets {reduction}")
    x, w = torch.randn(6, 16, generator=gen), torch.randn(50, 16, generator=gen)
    xk, xr, wk, wr = leaf(x), leaf(x), leaf(w), leaf(w)
    k = K.linear_softcap_cross_entropy(xk, wk, targets, SOFTCAP, reduction="none")
    r = K.linear_softcap_cross_entropy_reference(xr, wr, targets, SOFTCAP, reduction="none")
    assert_close(k, r, atol=2e-5, rtol=1e-5, what="linear_ce strided targets")
    k.sum().backward()
    r.sum().backward()
    assert_close(xk.grad, xr.grad, atol=1e-5, rtol=1e-4, what="linear_ce strided targets dx")


@pytest.mark.parametrize("softcap", [15.0, 1e3, 1e5, 1e9])
def test_a_large_softcap_is_no_softcap(K, softcap):
    # 1 - 2/(e^2x + 1) has an absolute error of about 1e-7 near 0, times the softcap: at 1e9 every logit came out
    # 0 and every loss log(vocab). The series below |x| < 0.25 keeps float32's relative error. Tolerance: the
    # reference's own tanh(l / c) * c is exact to float32 rounding of logits of order 10 (1e-6), and the online
    # logsumexp adds its order difference (2e-5 on losses of order 10, as in test_kernels_cross_entropy.py).
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 1000, generator=gen) * 8
    targets = torch.randint(0, 1000, (9,), generator=gen)
    lk, lr = leaf(logits), leaf(logits)
    k = K.softcap_cross_entropy(lk, targets, softcap, reduction="none")
    r = K.softcap_cross_entropy_reference(lr, targets, softcap, reduction="none")
    assert_close(k, r, atol=2e-5, rtol=1e-5, what=f"softcap_ce loss at softcap {softcap:g}")
    k.sum().backward()
    r.sum().backward()
    assert_close(lk.grad, lr.grad, atol=1e-6, rtol=1e-5, what=f"softcap_ce grad at softcap {softcap:g}")
    if softcap >= 1e5:  # no softcap at all, to float32
        plain = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        assert_close(k.detach(), plain, atol=2e-5, rtol=1e-5, what="softcap_ce with the cap out of reach")


def test_relu_squared_keeps_nan(K):
    # tl.maximum lowers to maxnum: NaN became 0 (value and gradient), hiding a diverged run from the NaN guard
    x = torch.tensor([1.5, float("nan"), -2.0, 0.0, 3.0])
    xk, xr = leaf(x), leaf(x)
    yk, yr = K.relu_squared(xk), K.relu_squared_reference(xr)
    assert_close(yk, yr, atol=0, rtol=0, what="relu_squared NaN forward")
    yk.sum().backward()
    yr.sum().backward()
    assert_close(xk.grad, xr.grad, atol=0, rtol=0, what="relu_squared NaN backward")
    w = torch.ones(2, 5)
    assert_close(K.relu_squared_linear(x, w), K.relu_squared_linear_reference(x, w), atol=0, rtol=0,
                 what="relu_squared_linear NaN forward")


def _second_order(K):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 2, 3, 8, generator=gen)
    cos, sin = torch.randn(1, 2, 1, 4, generator=gen), torch.randn(1, 2, 1, 4, generator=gen)
    w = torch.randn(8, 8, generator=gen)
    t = torch.randint(0, 8, (24,), generator=gen)
    return {
        "rms_norm": (lambda v: K.rms_norm(v), x),
        "apply_rotary": (lambda v: K.apply_rotary(v, cos, sin), x),
        "relu_squared": (lambda v: K.relu_squared(v), x),
        "relu_squared_linear": (lambda v: K.relu_squared_linear(v, w), x),
        "softcap_ce": (lambda v: K.softcap_cross_entropy(v.reshape(-1, 8), t, SOFTCAP), x),
        "linear_ce": (lambda v: K.linear_softcap_cross_entropy(v.reshape(-1, 8), w, t, SOFTCAP), x),
    }


@pytest.mark.parametrize("op,switch", [("rms_norm", "rms_norm"), ("apply_rotary", "rotary"),
                                       ("relu_squared", "relu_squared"), ("relu_squared_linear", "relu_squared"),
                                       ("softcap_ce", "softcap_ce"), ("linear_ce", "linear_ce")])
def test_a_second_order_gradient_is_refused_not_silently_zero(K, op, switch):
    # the kernels' backwards build no graph: with create_graph=True the gradient penalty of a kernel op added
    # nothing (a gradient norm of 5.5 where the reference gave 239) and no error said so. The error names the
    # switch in kernels.OPS that leaves the op out
    assert switch in K.OPS
    fn, x = _second_order(K)[op]
    v = leaf(x)
    with pytest.raises(RuntimeError, match=f"^{switch}: a second-order gradient"):
        torch.autograd.grad(fn(v).sum(), v, create_graph=True)
    (g,) = torch.autograd.grad(fn(v).sum(), v)  # a first-order gradient is what it was
    assert torch.isfinite(g).all()


def test_linear_ce_applies_a_non_unit_upstream_gradient_in_float32(K):
    # loss / 3 in bf16: 1/3 was rounded to bf16 (0.333984) before it scaled dx and dW, +0.2 % on every entry
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 32, generator=gen).bfloat16()
    w = (torch.randn(300, 32, generator=gen) * 0.3).bfloat16()
    t = torch.randint(0, 300, (64,), generator=gen)

    def grads(scale):
        xx, ww = leaf(x), leaf(w)
        (K.linear_softcap_cross_entropy(xx, ww, t, SOFTCAP) * scale).backward()
        return xx.grad, ww.grad

    third, one = grads(1.0 / 3.0), grads(1.0)
    for a, b, name in zip(third, one, ("dx", "dW"), strict=True):
        ratio = (a.double() * b.double()).sum() / (b.double() ** 2).sum()
        # unbiased: only bf16 rounding noise of the entries (the bias was +5e-4 relative)
        assert abs(ratio.item() * 3 - 1) < 2e-4, f"{name}: <g(1/3), g(1)>/|g(1)|^2 x 3 = {ratio.item() * 3:.6f}"


def test_an_infinite_upstream_gradient_leaves_ignored_rows_at_zero(K):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 40, generator=gen)
    targets = torch.tensor([-1, 3, 5, -1])
    gout = torch.tensor([float("inf"), 1.0, 2.0, float("nan")])
    lk, lr = leaf(logits), leaf(logits)
    K.softcap_cross_entropy(lk, targets, SOFTCAP, reduction="none").backward(gout)
    K.softcap_cross_entropy_reference(lr, targets, SOFTCAP, reduction="none").backward(gout)
    assert torch.all(lk.grad[[0, 3]] == 0)
    assert_close(lk.grad, lr.grad, atol=1e-6, rtol=1e-5, what="softcap_ce grad with inf/nan upstream on ignored rows")


def test_float64_inputs_go_to_the_reference_and_pass_gradcheck(K):
    # the kernels compute in float32: float64 was accepted and gradcheck failed
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    cos = torch.randn(1, 2, 1, 2, generator=gen, dtype=torch.float64)
    sin = torch.randn(1, 2, 1, 2, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (12,), generator=gen)
    checks = {
        "rms_norm": lambda v: K.rms_norm(v),
        "apply_rotary": lambda v: K.apply_rotary(v, cos, sin),
        "relu_squared": lambda v: K.relu_squared(v + 0.05),  # away from the kink at 0
        "relu_squared_linear": lambda v: K.relu_squared_linear(v + 0.05, w[:, :4]),
        "softcap_ce": lambda v: K.softcap_cross_entropy(v.reshape(-1, 4), t % 4, SOFTCAP),
        "linear_ce": lambda v: K.linear_softcap_cross_entropy(v.reshape(-1, 4), w, t, SOFTCAP),
    }
    for name, fn in checks.items():
        assert "Function" not in type(fn(x).grad_fn).__name__, f"{name}: float64 went to the kernel"
        assert torch.autograd.gradcheck(fn, (x,), raise_exception=False), name
