"""The template's Triton kernels on CUDA at the baseline's shapes, against the PyTorch references.

Skipped without CUDA, and skipped *before* importing the kernels: importing triton here on a CPU machine
would stop tests/unit/kernels from running the interpreter in the same pytest process (see the
conftest.py there). Tolerances are those of the interpreter tests (justified there) unless noted; the
GPU's exp/log are approximate instructions (a few float32 ulps), far below the bf16 tolerances.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "training_template"))
import kernels as K  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = "cuda"
SOFTCAP = 15.0


@pytest.fixture(autouse=True)
def _compiled_kernels(monkeypatch):
    # tests/unit/kernels sets TRITON_INTERPRET=1 for the rest of a shared pytest process; Triton also reads
    # it at launch, so keep it away from these compiled launches.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert K.backend() == "cuda", "kernels must be on for CUDA tests (FARM_KERNELS=0 set?)"


def _close(actual, expected, atol, rtol, what):
    diff = (actual.detach().double() - expected.detach().double()).abs()
    bad = diff > atol + rtol * expected.detach().double().abs()
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())}/{bad.numel()} off, max abs diff "
                                 f"{diff.max().item():.3e}, mean {diff.mean().item():.3e}")


def _both(fn_k, fn_r, inputs, grad_idx):
    k_in = [x.detach().clone().requires_grad_(i in grad_idx) for i, x in enumerate(inputs)]
    r_in = [x.detach().clone().requires_grad_(i in grad_idx) for i, x in enumerate(inputs)]
    out_k, out_r = fn_k(*k_in), fn_r(*r_in)
    g = torch.randn(out_r.shape, device=DEV, generator=torch.Generator(DEV).manual_seed(1)).to(out_r.dtype)
    out_k.backward(g)
    out_r.backward(g)
    return out_k, out_r, [k_in[i].grad for i in grad_idx], [r_in[i].grad for i in grad_idx]


@pytest.mark.parametrize("shape", [(16, 2048, 512), (16, 2048, 4, 128), (1000, 1000)])
def test_rms_norm_cuda(shape):
    x = torch.randn(shape, device=DEV, generator=torch.Generator(DEV).manual_seed(0)).bfloat16()
    y, y_r, (dx,), (dx_r,) = _both(K.rms_norm, K.rms_norm_reference, [x], [0])
    _close(y, y_r, 1e-2, 8e-3, "rms y")
    _close(dx, dx_r, 1e-2, 8e-3, "rms dx")


def test_rotary_cuda():
    B, T, H, D = 16, 2048, 4, 128
    x = torch.randn(B, T, H, D, device=DEV).bfloat16()
    ang = torch.arange(T, device=DEV)[:, None] / (10000 ** (torch.arange(D // 2, device=DEV) / (D // 2)))
    cos, sin = ang.cos().bfloat16()[None, :, None], ang.sin().bfloat16()[None, :, None]
    y, y_r, (dx,), (dx_r,) = _both(K.apply_rotary, K.apply_rotary_reference, [x, cos, sin], [0])
    atol = 3 * 2**-8 * x.abs().max().item()
    _close(y, y_r, atol, 2e-2, "rotary y")
    _close(dx, dx_r, atol, 2e-2, "rotary dx")


def test_relu_squared_cuda():
    x = torch.randn(16 * 2048, 2048, device=DEV).bfloat16()
    y, y_r, (dx,), (dx_r,) = _both(K.relu_squared, K.relu_squared_reference, [x], [0])
    _close(y, y_r, 1e-2, 1.6e-2, "relu2 y")
    _close(dx, dx_r, 1e-2, 1.6e-2, "relu2 dx")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_softcap_ce_cuda(reduction):
    rows, vocab = 2 * 2048, 8192
    logits = (torch.randn(rows, vocab, device=DEV) * 8).bfloat16()
    targets = torch.randint(0, vocab, (rows,), device=DEV)
    targets[::17] = -1
    fk = lambda lg: K.softcap_cross_entropy(lg, targets, SOFTCAP, reduction=reduction)  # noqa: E731
    fr = lambda lg: K.softcap_cross_entropy_reference(lg, targets, SOFTCAP, reduction=reduction)  # noqa: E731
    loss, loss_r, (g,), (g_r,) = _both(fk, fr, [logits], [0])
    _close(loss, loss_r, 2e-5 if reduction == "none" else 1e-5, 1e-5, "ce loss")
    _close(g, g_r, 1e-3 * g_r.abs().max().item(), 1.6e-2, "ce grad")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_ce_cuda_autocast(reduction):
    rows, dim, vocab = 8 * 2048, 512, 8192
    x = torch.randn(rows, dim, device=DEV)
    w = torch.randn(vocab, dim, device=DEV) * dim**-0.5
    targets = torch.randint(0, vocab, (rows,), device=DEV)
    targets[::13] = -1

    def run(fn):
        def inner(x_, w_):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return fn(x_, w_, targets, SOFTCAP, reduction=reduction)
        return inner

    loss, loss_r, (dx, dw), (dx_r, dw_r) = _both(run(K.linear_softcap_cross_entropy),
                                                 run(K.linear_softcap_cross_entropy_reference), [x, w], [0, 1])
    # chunked vs whole-batch cuBLAS may round a few bf16 logits differently: 1e-3 per token, 1e-4 mean
    _close(loss, loss_r, 1e-3 if reduction == "none" else 1e-4, 1e-4, "linear ce loss")
    _close(dx, dx_r, 1e-2 * dx_r.abs().max().item(), 2e-2, "linear ce dx")
    _close(dw, dw_r, 1e-2 * dw_r.abs().max().item(), 2e-2, "linear ce dW")


def test_linear_ce_eval_val_bpb_unchanged():
    # val_bpb sums per-token losses; with and without kernels the sum must agree to float tolerance.
    rows, dim, vocab = 16 * 2048, 512, 8192
    x = torch.randn(rows, dim, device=DEV)
    w = torch.randn(vocab, dim, device=DEV) * dim**-0.5
    targets = torch.randint(0, vocab, (rows,), device=DEV)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        k = K.linear_softcap_cross_entropy(x, w, targets, SOFTCAP, reduction="none")
        r = K.linear_softcap_cross_entropy_reference(x, w, targets, SOFTCAP, reduction="none")
    assert k.dtype == torch.float32
    _close(k, r, 1e-3, 1e-4, "eval per-token")
    assert abs(k.double().sum().item() - r.double().sum().item()) <= 1e-5 * r.double().sum().abs().item()


def test_linear_ce_peak_memory_at_least_halved():
    rows, dim, vocab = 32 * 2048, 512, 8192
    x = torch.randn(rows, dim, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, dim, device=DEV) * dim**-0.5).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), device=DEV)

    def peak(fn):
        x.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fn(x, w, targets, SOFTCAP).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    p_k, p_r = peak(K.linear_softcap_cross_entropy), peak(K.linear_softcap_cross_entropy_reference)
    print(f"lm_head+loss peak: kernel {p_k / 2**20:.0f} MiB, reference {p_r / 2**20:.0f} MiB")
    assert p_k <= 0.5 * p_r


def test_kernels_under_torch_compile():
    x = torch.randn(4, 256, 512, device=DEV, requires_grad=True)
    w = (torch.randn(8192, 512, device=DEV) * 0.05).requires_grad_()
    t = torch.randint(0, 8192, (4 * 256,), device=DEV)

    def f(x_, w_):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = K.relu_squared(K.rms_norm(x_)) * 0.5
            return K.linear_softcap_cross_entropy(h.reshape(-1, 512), w_, t, SOFTCAP)

    eager = f(x, w)
    eager.backward()
    eager_dx, eager_dw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    compiled = torch.compile(f)(x, w)
    _close(compiled, eager, 1e-4, 1e-4, "compiled loss")
    compiled.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # the same kernels on the same bf16 inputs: the gradients of the compiled and the eager run agree to bf16
    # rounding of the parts Inductor fuses differently (the * 0.5 and the casts around the kernels)
    _close(x.grad, eager_dx, 2e-2 * eager_dx.abs().max().item(), 2e-2, "compiled dx")
    _close(w.grad, eager_dw, 2e-2 * eager_dw.abs().max().item(), 2e-2, "compiled dW")
    assert os.environ.get("TRITON_INTERPRET") != "1"
