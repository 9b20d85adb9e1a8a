"""A fresh working directory per run: the template's files plus the candidate's editable files.

Refusals happen here, before any candidate code runs: a program pinned to another harness
(programs.template_digest), a candidate that ships a changed non-editable file, or a file name
that tries to leave the workdir.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from farm import templates
from farm.harness import fixed_files, harness_checksum

_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "data", "result.json", ".*")


class Refused(Exception):
    """The run is refused before it starts; the message is the recorded reason."""


def template_dir(name: str = "default") -> Path:
    """The folder of a program's template, resolved exactly as the API and the scheduler resolve it
    (farm.templates: FARM_TEMPLATE_DIR overrides the default one): a program's template_digest was computed from
    that folder. A name this worker does not know refuses the run instead of training on another template."""
    try:
        return templates.template_dir(name or "default")
    except templates.TemplateError as exc:
        raise Refused(str(exc)) from None


@dataclass(frozen=True)
class Workdir:
    path: Path
    harness_sha256: str
    fixed: tuple[str, ...]

    def readonly_paths(self) -> tuple[Path, ...]:
        tops = {PurePosixPath(rel).parts[0] for rel in self.fixed}
        return tuple(self.path / t for t in sorted(tops))


def _safe_name(name: str) -> str:
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name or "\0" in name:
        raise Refused(f"candidate file name {name!r} is not a plain relative path")
    return p.as_posix()


def check_candidate_files(template: Path, files: Mapping[str, Any], editable: Iterable[str]) -> dict[str, str]:
    """The editable files to write. Any other file must be byte-identical to the template's."""
    editable = {_safe_name(e) for e in editable}
    out: dict[str, str] = {}
    for raw_name, text in files.items():
        name = _safe_name(raw_name)
        if not isinstance(text, str):
            raise Refused(f"candidate file {name} is not text")
        if name in editable:
            out[name] = text
            continue
        original = template / name
        if not original.is_file() or original.read_text(encoding="utf-8", errors="replace") != text:
            raise Refused(f"candidate changes {name}, which is not editable (editable: "
                          f"{', '.join(sorted(editable))})")
    return out


def materialise(template: Path, dest: Path, files: Mapping[str, Any], editable: Iterable[str], *,
                expected_digest: str | None = None) -> Workdir:
    """Copy the template to `dest` (which must not exist), overlay the editable files, check digests."""
    if not (template / "prepare.py").is_file():
        raise Refused(f"template {template} has no prepare.py")
    fixed = fixed_files(template)
    digest = harness_checksum(template)
    if expected_digest and expected_digest != digest:
        raise Refused(f"this worker's harness ({digest[:12]}) differs from the program's template_digest "
                      f"({expected_digest[:12]}): update the worker's training_template/")
    to_write = check_candidate_files(template, files, editable)
    shutil.copytree(template, dest, ignore=_SKIP)
    for name, text in to_write.items():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    if harness_checksum(dest) != digest:  # belt and braces: an editable name shadowing a fixed one
        raise Refused("the workdir's harness differs from the template after writing the candidate's files")
    return Workdir(dest, digest, tuple(fixed))
