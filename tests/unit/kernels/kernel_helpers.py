"""Comparison helpers for the kernel tests (a plain module: test files import it by name)."""

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, what: str) -> None:
    """torch.testing-style check that reports max/mean absolute difference on failure."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().double(), expected.detach().double()
    diff = (a - e).abs()
    bad = diff > atol + rtol * e.abs()
    if bool(bad.any()) or bool(torch.isnan(a).ne(torch.isnan(e)).any()):
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements off; max abs diff {diff.max().item():.3e}, "
            f"mean abs diff {diff.mean().item():.3e}, atol {atol:.1e}, rtol {rtol:.1e}")


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def run_both(kernel_fn, reference_fn, inputs, grad_inputs, seed: int = 0):
    """Forward both paths on copies of `inputs`, backward the same random upstream gradient through
    both; returns (out_k, out_r, grads_k, grads_r) for the positions listed in grad_inputs."""
    k_in = [leaf(x) if i in grad_inputs else x for i, x in enumerate(inputs)]
    r_in = [leaf(x) if i in grad_inputs else x for i, x in enumerate(inputs)]
    out_k = kernel_fn(*k_in)
    out_r = reference_fn(*r_in)
    gen = torch.Generator().manual_seed(seed + 1)
    g = torch.randn(out_r.shape, generator=gen, dtype=torch.float32).to(out_r.dtype)
    out_k.backward(g)
    out_r.backward(g)
    return out_k, out_r, [k_in[i].grad for i in grad_inputs], [r_in[i].grad for i in grad_inputs]


def run_python(code: str, env_overrides: dict[str, str | None], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with training_template on sys.path (how train.py imports kernels)."""
    env = dict(os.environ)
    for key, value in env_overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, "-c", code], cwd=REPO / "training_template", env=env,
                          capture_output=True, text=True, timeout=timeout)
