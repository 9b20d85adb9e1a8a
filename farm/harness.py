"""What the farm knows about the training template's fixed harness, without importing it.

The template (training_template/prepare.py) computes these same two functions; the farm keeps its
own copies so no service ever imports template code (which imports torch and reads the environment
at import time). `harness_checksum` is also what a program's `template_digest` is compared with.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

FIXED_FILE = "prepare.py"
FIXED_DIR = "kernels"


def fixed_files(directory: str | os.PathLike[str]) -> list[str]:
    """Relative POSIX paths of the harness files: prepare.py and kernels/**/*.py (no __pycache__)."""
    root = Path(directory)
    files = [root / FIXED_FILE]
    kernels = root / FIXED_DIR
    if kernels.is_dir():
        files += [p for p in kernels.rglob("*.py") if "__pycache__" not in p.parts]
    return sorted(p.relative_to(root).as_posix() for p in files if p.is_file())


ISOLATED_MARKER = "ISOLATED_EVALUATION = 1"  # prepare.py's declaration that it exports and scores (--evaluate)


def supports_isolated_evaluation(directory: str | os.PathLike[str]) -> bool:
    """Does this template's harness export the model for a second process to score (prepare.py --evaluate)?"""
    try:
        text = (Path(directory) / FIXED_FILE).read_text(encoding="utf-8")
    except OSError:
        return False
    return any(line.startswith(ISOLATED_MARKER) for line in text.splitlines())


def harness_checksum(directory: str | os.PathLike[str]) -> str:
    """sha256 over the fixed files sorted by relative path; each contributes path, NUL, bytes, NUL."""
    root = Path(directory)
    h = hashlib.sha256()
    for rel in fixed_files(root):
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest()


def canonical_json(payload: dict[str, Any]) -> str:
    body = {k: v for k, v in payload.items() if k != "digest"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def result_digest(payload: dict[str, Any], nonce: str) -> str:
    """Hex HMAC-SHA256 keyed by the nonce's text over the canonical JSON of payload minus "digest"."""
    return hmac.new(nonce.encode("utf-8"), canonical_json(payload).encode("utf-8"), hashlib.sha256).hexdigest()


def digest_ok(payload: dict[str, Any], nonce: str) -> bool:
    digest = payload.get("digest")
    return isinstance(digest, str) and hmac.compare_digest(digest, result_digest(payload, nonce))
