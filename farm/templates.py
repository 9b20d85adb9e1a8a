"""Training templates: the files a program starts from, split into editable and fixed.

The default template is the repository's `training_template/`. Fixed files (the harness,
kernels) are never taken from the database: every worker materialises them from its own copy,
and `fixed_digest` lets it prove that copy is the one the program was created with.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = {"default": ROOT / "training_template"}
SKIP_PARTS = {"__pycache__", ".pytest_cache", "data", "cache", ".mypy_cache"}
TEXT_SUFFIXES = {".py", ".md", ".txt", ".json", ".toml", ".cfg"}


class TemplateError(ValueError):
    pass


def template_dir(name: str = "default") -> Path:
    # the same override the worker honours (worker/workdir.py): scheduler, API and workers must
    # agree on one template, or every candidate is refused for a template_digest mismatch
    override = os.environ.get("FARM_TEMPLATE_DIR")
    if override and name == "default":
        return Path(override)
    try:
        return TEMPLATES[name]
    except KeyError:
        raise TemplateError(f"unknown template {name!r}; known: {', '.join(sorted(TEMPLATES))}") from None


def template_files(name: str = "default") -> dict[str, str]:
    """Every text file of the template, by path relative to its root (posix separators)."""
    root = template_dir(name)
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or SKIP_PARTS & set(rel.parts) or path.suffix not in TEXT_SUFFIXES:
            continue
        out[rel.as_posix()] = path.read_text(encoding="utf-8")
    return out


def files_digest(files: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode())
        h.update(b"\0")
        h.update(files[name].encode())
        h.update(b"\0")
    return h.hexdigest()


def fixed_files(name: str, editable: list[str]) -> dict[str, str]:
    return {k: v for k, v in template_files(name).items() if k not in set(editable)}


def fixed_digest(name: str, editable: list[str]) -> str:
    return files_digest(fixed_files(name, editable))


def editable_files(name: str, editable: list[str]) -> dict[str, str]:
    files = template_files(name)
    missing = [f for f in editable if f not in files]
    if missing:
        raise TemplateError(f"editable file(s) not in template {name!r}: {', '.join(missing)}")
    return {f: files[f] for f in editable}
