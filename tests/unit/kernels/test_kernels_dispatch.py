"""The dispatcher: decided once at import, overridable, importable without Triton or a GPU."""

import json
import sys

import pytest
import torch
from kernel_helpers import run_python

KERNEL_MODULES = ("rms_norm", "cross_entropy", "rotary", "relu_squared")


def test_interpreted_copy_runs_interpreted_kernels(K):
    assert K.backend() == "interpret" and K.enabled()
    for name in KERNEL_MODULES:
        module = sys.modules[f"{K.__name__}.{name}"]  # K.rms_norm is the public function
        kernels = [v for k, v in vars(module).items() if k.startswith("_") and k.endswith("_kernel")]
        assert kernels, name
        for kernel in kernels:
            assert type(kernel).__name__ == "InterpretedFunction", (name, type(kernel))


def test_set_enabled_switches_every_op_to_the_reference(K):
    x = torch.randn(4, 16, requires_grad=True)
    assert "RMSNorm" in type(K.rms_norm(x).grad_fn).__name__
    K.set_enabled(False)
    assert K.backend() == "reference" and not K.enabled()
    assert "RMSNorm" not in type(K.rms_norm(x).grad_fn).__name__
    logits = torch.randn(3, 10, requires_grad=True)
    loss = K.softcap_cross_entropy(logits, torch.tensor([1, 2, -1]), 15.0)
    assert "SoftcapCrossEntropy" not in type(loss.grad_fn).__name__
    K.set_enabled(True)
    assert "RMSNorm" in type(K.rms_norm(x).grad_fn).__name__


def test_set_ops_and_limit_ops_choose_kernels_per_op(K):
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(10, 16, requires_grad=True)
    t = torch.tensor([1, 2, -1, 3])

    def uses_kernel(op):
        if op == "rms_norm":
            return "RMSNorm" in type(K.rms_norm(x).grad_fn).__name__
        return "LinearSoftcap" in type(K.linear_softcap_cross_entropy(x, w, t, 15.0).grad_fn).__name__

    K.set_ops("linear_ce")
    assert K.ops() == ("linear_ce",) and K.enabled() and K.backend() == "interpret"
    assert uses_kernel("linear_ce") and not uses_kernel("rms_norm")
    K.limit_ops("rms_norm, linear_ce")  # can only narrow: rms_norm stays off
    assert K.ops() == ("linear_ce",)
    K.set_ops(["rms_norm", "rotary"])
    assert uses_kernel("rms_norm") and not uses_kernel("linear_ce")
    K.set_ops("all")
    K.limit_ops("none")
    assert K.ops() == () and not K.enabled() and K.backend() == "reference"
    with pytest.raises(ValueError, match="rmsnorm"):
        K.set_ops("rmsnorm")
    assert K.ops() == ()  # a bad name changes nothing
    K.set_ops("all")
    assert K.ops() == K.OPS


_OPS_PROBE = """
import json, kernels
kernels.limit_ops("linear_ce")  # what train.py does: never raises where kernels cannot run
print(json.dumps(dict(ops=list(kernels.ops()), enabled=kernels.enabled())))
"""


@pytest.mark.any_process
def test_farm_kernels_names_ops_and_rejects_typos():
    ok = run_python(_OPS_PROBE, {"FARM_KERNELS": "interpret", "TRITON_INTERPRET": None})
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert json.loads(ok.stdout.strip().splitlines()[-1]) == {"ops": ["linear_ce"], "enabled": True}
    off = run_python(_OPS_PROBE, {"FARM_KERNELS": "off", "TRITON_INTERPRET": None})
    assert json.loads(off.stdout.strip().splitlines()[-1]) == {"ops": [], "enabled": False}
    bad = run_python(_OPS_PROBE, {"FARM_KERNELS": "rms_norm,softmax", "TRITON_INTERPRET": None})
    assert bad.returncode != 0 and "unknown kernel op(s) softmax" in bad.stderr


_PROBE = """
import importlib.abc, json, sys, torch

def probe():
    import kernels
    x = torch.randn(2, 3, 8)
    out = dict(enabled=kernels.enabled(), backend=kernels.backend(),
               cuda_initialized=torch.cuda.is_initialized(),
               rms_ok=bool(torch.allclose(kernels.rms_norm(x), kernels.rms_norm_reference(x))),
               triton_loaded="triton" in sys.modules)
    try:
        kernels.set_enabled(True)
        out["set_enabled_true"] = "ok"
    except RuntimeError as exc:
        out["set_enabled_true"] = str(exc)
    return out

class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton blocked for this test")

default = probe()
# the same process again, as if triton were not installed: forget both packages, block triton
for name in [m for m in sys.modules if m.split(".")[0] in ("kernels", "triton")]:
    del sys.modules[name]
sys.meta_path.insert(0, NoTriton())
print(json.dumps(dict(default=default, no_triton=probe())))
"""


@pytest.mark.any_process
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only default")
def test_import_on_cpu_picks_references_and_works_without_triton():
    proc = run_python(_PROBE, {"FARM_KERNELS": None, "TRITON_INTERPRET": None})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    default, no_triton = out["default"], out["no_triton"]
    # CPU without FARM_KERNELS: references, and importing touched no device
    assert default["enabled"] is False and default["backend"] == "reference" and default["rms_ok"]
    assert default["cuda_initialized"] is False
    assert "CUDA is not available" in default["set_enabled_true"]
    # without triton: still importable and working, pure torch
    assert no_triton["triton_loaded"] is False
    assert no_triton["enabled"] is False and no_triton["backend"] == "reference" and no_triton["rms_ok"]
    assert "triton is not installed" in no_triton["set_enabled_true"]


@pytest.mark.any_process
def test_interpreter_active_in_this_process():
    """The root tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton, so every
    kernel test in this folder runs its Triton kernels in-process; fail loudly if that ever breaks."""
    tl = sys.modules.get("triton.language")
    assert tl is not None and type(tl.sum).__name__ == "InterpretedFunction"
