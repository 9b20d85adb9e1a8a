"""A tiny stand-in training template for scheduler tests (the real one lives on the template branch)."""

from __future__ import annotations

from pathlib import Path

import pytest

TRAIN = '''"""toy train.py: prints a fake summary."""
from prepare import pick

# ---- Hyperparameters ----
DEPTH = pick(h100=8, cpu=2)  # number of layers
MATRIX_LR = pick(h100=0.04, cpu=0.02)  # Muon learning rate
EMBEDDING_LR = 0.6  # AdamW lr for embeddings
TOTAL_BATCH_SIZE = pick(h100=2**19, cpu=2**13)  # tokens per step
WARMDOWN_RATIO = 0.5  # share of the budget spent decaying


def model():
    return DEPTH * 2


def schedule(step):
    return MATRIX_LR * step


def main():
    print("---")
    print("val_bpb: 1.0")


if __name__ == "__main__":
    main()
'''

PREPARE = '''"""toy harness"""


def pick(**values):
    return values["cpu"]
'''


def install(monkeypatch: pytest.MonkeyPatch, root: Path) -> Path:
    tpl = root / "toy_template"
    tpl.mkdir(parents=True, exist_ok=True)
    (tpl / "train.py").write_text(TRAIN)
    (tpl / "prepare.py").write_text(PREPARE)
    from farm import templates

    monkeypatch.setitem(templates.TEMPLATES, "default", tpl)
    return tpl
