"""Fused training ops for the template, with exact PyTorch fallbacks.

The dispatch is decided once, here, at import:
    FARM_KERNELS unset/"auto"  Triton kernels when CUDA is available and Triton imports, else references
    FARM_KERNELS=0|off|false   references only (set_enabled(True) can still turn kernels on later)
    FARM_KERNELS=interpret     Triton kernels on CPU tensors through Triton's interpreter (sets
                               TRITON_INTERPRET=1 before any kernel is defined); slow, for tests
    FARM_KERNELS=linear_ce,... as auto, but only for the named ops (OPS lists the names)
`set_enabled(bool)` or `set_ops("all" | "none" | names)` overrides it at run time, for tests and for
experiments that want to compare.
Importing this package compiles nothing and asks the device nothing beyond torch.cuda.is_available().

Public API (stable; train.py depends on it):
    rms_norm(x, eps=1e-6)                              -> x / sqrt(mean(x^2) + eps), no weight
    apply_rotary(x, cos, sin)                          -> rotary embedding, x: (B, T, H, D)
    relu_squared(x)                                    -> relu(x) ** 2
    softcap_cross_entropy(logits, targets, softcap, ignore_index=-1, reduction="mean")
    linear_softcap_cross_entropy(x, weight, targets, softcap, ignore_index=-1, reduction="mean")
Additions (optional, keyword-only where they extend the above):
    softcap_cross_entropy(..., inplace_backward=False)  overwrite logits with their gradient (saves memory)
    linear_softcap_cross_entropy(..., chunk_size=None)  rows per chunk of logits
    relu_squared_linear(x, weight)                      relu(x)**2 @ weight.T, activation recomputed in backward
    enabled(), set_enabled(bool), backend(), OPS, set_ops(ops), limit_ops(ops), ops()
"""

import os

import torch

_OFF = ("0", "false", "off", "no", "reference", "none")
OPS = ("rms_norm", "rotary", "relu_squared", "softcap_ce", "linear_ce")  # relu_squared covers _linear too
_FLAG = os.environ.get("FARM_KERNELS", "").strip().lower()
if _FLAG == "interpret":
    # Triton decides interpreter vs compiler when each @triton.jit decorator runs, i.e. when the kernel
    # modules below are imported, so this has to come first.
    os.environ["TRITON_INTERPRET"] = "1"

from . import cross_entropy as _ce  # noqa: E402
from . import fused_linear_ce as _flce  # noqa: E402
from . import relu_squared as _relu2  # noqa: E402
from . import rms_norm as _rms  # noqa: E402
from . import rotary as _rotary  # noqa: E402
from ._triton import HAVE_TRITON  # noqa: E402

# references, importable by name for tests and experiments
rms_norm_reference = _rms.rms_norm_reference
apply_rotary_reference = _rotary.apply_rotary_reference
relu_squared_reference = _relu2.relu_squared_reference
relu_squared_linear_reference = _relu2.relu_squared_linear_reference
softcap_cross_entropy_reference = _ce.softcap_cross_entropy_reference
linear_softcap_cross_entropy_reference = _flce.linear_softcap_cross_entropy_reference


def _available_backend() -> str | None:
    """Where the kernels could run: "cuda", "interpret" (CPU tensors), or None."""
    if not HAVE_TRITON:
        return None
    if _FLAG == "interpret":
        return "interpret"
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        return None  # every kernel would run in the (CPU, Python) interpreter: slower than the references
    return "cuda" if torch.cuda.is_available() else None


def _parse_ops(spec) -> frozenset[str]:
    """"all" | "none" | an iterable or comma list of names from OPS -> the set of ops that use kernels."""
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("", "all", "auto", "1", "true", "on", "yes", "interpret"):
            return frozenset(OPS)
        if text in _OFF:
            return frozenset()
        spec = [part.strip() for part in text.split(",") if part.strip()]
    names = frozenset(spec)
    unknown = sorted(names - set(OPS))
    if unknown:
        raise ValueError(f"unknown kernel op(s) {', '.join(unknown)}; choose from {', '.join(OPS)}")
    return names


_BACKEND = _available_backend()
try:
    _OPS = _parse_ops(_FLAG)
except ValueError as exc:  # a typo in the environment must not silently train without (or with) kernels
    raise RuntimeError(f"FARM_KERNELS={_FLAG!r}: {exc}") from None
ENABLED = _BACKEND is not None and bool(_OPS)  # read it, or call set_enabled() / set_ops()
_DEVICE_TYPE = "cpu" if _BACKEND == "interpret" else "cuda"


def set_ops(spec) -> None:
    """Use kernels for these ops only ("all", "none", or names from OPS), references for the rest.
    Raises RuntimeError when kernels cannot run here and some op is asked for, ValueError on a bad name."""
    global ENABLED, _OPS
    names = _parse_ops(spec)
    if names and _BACKEND is None:
        why = "triton is not installed" if not HAVE_TRITON else "CUDA is not available"
        raise RuntimeError(f"Triton kernels cannot run here: {why} (FARM_KERNELS=interpret runs them on CPU)")
    _OPS, ENABLED = names, bool(names)


def limit_ops(spec) -> None:
    """Keep kernels for at most these ops: an op that the environment (FARM_KERNELS) or the machine turned
    off stays off, so train.py can state its choice without overriding a comparison run's. Never raises
    for lack of CUDA; ValueError on a bad name."""
    set_ops([op for op in ops() if op in _parse_ops(spec)])


def set_enabled(value: bool) -> None:
    """Switch between kernels and references for every op; True raises when kernels cannot run here."""
    set_ops("all" if value else "none")


def enabled() -> bool:
    return ENABLED


def ops() -> tuple[str, ...]:
    """The ops that currently use their kernels (empty when disabled or when kernels cannot run here)."""
    return tuple(op for op in OPS if op in _OPS) if ENABLED else ()


def backend() -> str:
    """"cuda", "interpret" or "reference": what the next call would use for tensors on its device."""
    return _BACKEND if ENABLED and _BACKEND else "reference"


def _on_kernel_device(op: str, *tensors: torch.Tensor) -> bool:
    return ENABLED and op in _OPS and all(t.device.type == _DEVICE_TYPE for t in tensors)


# torch.compile treats each kernel call as an opaque eager region (one graph break per call) rather
# than tracing the autograd.Function and its launches; always correct, possibly slower for rms_norm,
# which sits between fusible ops. FARM_KERNELS_TRACE=1 lets Dynamo trace them instead (untested on GPU:
# bench/kernels.py --step measures both).
_TRACE = os.environ.get("FARM_KERNELS_TRACE", "0") == "1"


def _opaque(fn):
    return fn if _TRACE else torch.compiler.disable(fn, recursive=True)


_rms_norm_k = _opaque(_rms.rms_norm_triton)
_apply_rotary_k = _opaque(_rotary.apply_rotary_triton)
_relu_squared_k = _opaque(_relu2.relu_squared_triton)
_relu_squared_linear_k = _opaque(_relu2.relu_squared_linear_triton)
_softcap_ce_k = _opaque(_ce.softcap_cross_entropy_triton)
_linear_softcap_ce_k = _opaque(_flce.linear_softcap_cross_entropy_triton)


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    if _on_kernel_device("rms_norm", x) and _rms.supported(x):
        return _rms_norm_k(x, eps)
    return _rms.rms_norm_reference(x, eps)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if _on_kernel_device("rotary", x, cos, sin) and _rotary.supported(x, cos, sin):
        return _apply_rotary_k(x, cos, sin)
    return _rotary.apply_rotary_reference(x, cos, sin)


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    if _on_kernel_device("relu_squared", x) and _relu2.supported(x):
        return _relu_squared_k(x)
    return _relu2.relu_squared_reference(x)


def relu_squared_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if _on_kernel_device("relu_squared", x, weight) and _relu2.supported(x) and weight.dim() == 2:
        return _relu_squared_linear_k(x, weight)
    return _relu2.relu_squared_linear_reference(x, weight)


def softcap_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, softcap: float,
                          ignore_index: int = -1, reduction: str = "mean", *,
                          inplace_backward: bool = False) -> torch.Tensor:
    if _on_kernel_device("softcap_ce", logits, targets) and _ce.supported(logits, targets):
        return _softcap_ce_k(logits, targets, softcap, ignore_index, reduction, inplace_backward)
    return _ce.softcap_cross_entropy_reference(logits, targets, softcap, ignore_index, reduction)


def linear_softcap_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 softcap: float, ignore_index: int = -1, reduction: str = "mean", *,
                                 chunk_size: int | None = None) -> torch.Tensor:
    if _on_kernel_device("linear_ce", x, weight, targets) and _flce.supported(x, weight, targets):
        return _linear_softcap_ce_k(x, weight, targets, softcap, ignore_index, reduction, chunk_size)
    return _flce.linear_softcap_cross_entropy_reference(x, weight, targets, softcap, ignore_index, reduction)


__all__ = [
    "ENABLED", "OPS", "enabled", "set_enabled", "set_ops", "limit_ops", "ops", "backend",
    "rms_norm", "apply_rotary", "relu_squared", "relu_squared_linear",
    "softcap_cross_entropy", "linear_softcap_cross_entropy",
    "rms_norm_reference", "apply_rotary_reference", "relu_squared_reference",
    "relu_squared_linear_reference", "softcap_cross_entropy_reference",
    "linear_softcap_cross_entropy_reference",
]
