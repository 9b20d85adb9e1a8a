"""Fused training ops for the template, with exact PyTorch fallbacks.

The dispatch is decided once, here, at import: Triton kernels when CUDA and Triton are both
present, the pure-PyTorch references otherwise. `set_enabled(False)` (or FARM_KERNELS=0 in the
environment) forces the references, for tests and for experiments that want to compare.

Public API (stable; train.py depends on it):
    rms_norm(x, eps=1e-6)                              -> x / sqrt(mean(x^2) + eps), no weight
    apply_rotary(x, cos, sin)                          -> rotary embedding, x: (B, T, H, D)
    relu_squared(x)                                    -> relu(x) ** 2
    softcap_cross_entropy(logits, targets, softcap, ignore_index=-1, reduction="mean")
    linear_softcap_cross_entropy(x, weight, targets, softcap, ignore_index=-1, reduction="mean")
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

ENABLED = False  # filled in by _decide() below; read it, or call set_enabled() to override


def _decide() -> bool:
    flag = os.environ.get("FARM_KERNELS", "").strip().lower()
    if flag in ("0", "false", "off", "no"):
        return False
    return False  # Triton kernels not wired yet: references everywhere


def set_enabled(value: bool) -> None:
    global ENABLED
    ENABLED = bool(value)


def enabled() -> bool:
    return ENABLED


ENABLED = _decide()


# ----- references (also the CPU path) -----

def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, H, D); cos/sin broadcastable to (B, T, H, D/2)
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], dim=-1).type_as(x)


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


def softcap_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, softcap: float,
                          ignore_index: int = -1, reduction: str = "mean") -> torch.Tensor:
    logits = logits.float()
    logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                           ignore_index=ignore_index, reduction=reduction)


def linear_softcap_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 softcap: float, ignore_index: int = -1,
                                 reduction: str = "mean") -> torch.Tensor:
    logits = x @ weight.t()
    return softcap_cross_entropy(logits, targets, softcap, ignore_index, reduction)
