"""training_template/train.py's definitions (model, optimizer, hyperparameters) without running the script: the
file is executed up to its Setup banner, which must not touch a device, the data or the compiler."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

TEMPLATE = Path(__file__).resolve().parents[1] / "training_template"


def load_train_defs() -> dict:
    if str(TEMPLATE) not in sys.path:
        sys.path.insert(0, str(TEMPLATE))
    # both ask torch.cuda.is_available() once when imported, by design (the profile, the kernel dispatch)
    import kernels  # noqa: F401
    import prepare  # noqa: F401

    source = (TEMPLATE / "train.py").read_text()
    head = source.split("# Setup\n")[0]
    namespace: dict = {"__name__": "train_defs"}
    real_compile, real_cuda = torch.compile, torch.cuda.is_available

    def forbidden(*args, **kwargs):
        raise AssertionError("train.py queried the device or compiled at import")

    torch.compile, torch.cuda.is_available = forbidden, forbidden  # type: ignore[assignment]
    try:
        exec(compile(head, str(TEMPLATE / "train.py"), "exec"), namespace)
    finally:
        torch.compile, torch.cuda.is_available = real_compile, real_cuda  # type: ignore[assignment]
    return namespace


def run_muon(defs: dict, params: list, grads: list[list[torch.Tensor]], *, lr: float, weight_decay: float,
             ortho_dtype: torch.dtype, compile: bool = False) -> None:
    """train.py's Muon over `params`, one step per entry of `grads`, with a schedule that moves every step as
    train.py's does (lr decaying linearly, momentum rising from 0.85 by 0.02 a step)."""
    muon = defs["Muon"](params, lr=lr, momentum=0.85, weight_decay=weight_decay, beta2=0.95,
                        ortho_dtype=ortho_dtype, compile=compile)
    for i, step_grads in enumerate(grads):
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g
        for group in muon.param_groups:
            group["lr"], group["momentum"] = lr * (1 - i / len(grads)), 0.85 + 0.02 * i
        muon.step()
