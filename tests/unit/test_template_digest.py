"""Regression: a program's template_digest must be what a worker computes for the same template.

farm.programs used farm.templates.fixed_digest (every text file that is not editable) while the
worker checks farm.harness.harness_checksum (prepare.py and kernels/*.py). They agreed until the
template gained a README.md; from then on every run was refused ("this worker's harness differs
from the program's template_digest"), which `farm demo` showed on the merged branches."""

from __future__ import annotations

from sqlalchemy.orm import Session

from farm.harness import harness_checksum
from farm.programs import create_program
from farm.templates import template_dir, template_files


def test_program_digest_is_the_workers_harness_checksum(sqlite_url: str) -> None:
    from farm.db import make_engine

    engine = make_engine(sqlite_url)
    try:
        with Session(engine) as session:
            program = create_program(session, name="digest", instructions="x", profile="cpu")
            assert program.template_digest == harness_checksum(template_dir("default"))
    finally:
        engine.dispose()


def test_the_template_has_files_outside_the_harness() -> None:
    # the situation the bug needed: documentation next to the harness must not be part of it
    names = set(template_files("default"))
    assert any(not (n == "prepare.py" or n.startswith("kernels/") or n == "train.py") for n in names), names


def test_the_worker_resolves_a_programs_template_as_the_api_does(tmp_path, monkeypatch) -> None:
    """Regression: the worker looked for a template named X in a sibling folder of FARM_TEMPLATE_DIR and fell back
    to the default template for any name it did not find, so a run could train on files other than those its
    program's digest came from. Both sides now share farm.templates, and an unknown name refuses the run."""
    import pytest

    from farm import templates
    from worker.workdir import Refused
    from worker.workdir import template_dir as worker_template_dir

    (tmp_path / "other").mkdir()
    monkeypatch.setenv("FARM_TEMPLATE_DIR", str(tmp_path / "tpl"))
    assert worker_template_dir("default") == template_dir("default") == tmp_path / "tpl"
    assert worker_template_dir("") == tmp_path / "tpl"
    with pytest.raises(Refused, match="unknown template 'other'"):
        worker_template_dir("other")
    monkeypatch.delenv("FARM_TEMPLATE_DIR")
    monkeypatch.setitem(templates.TEMPLATES, "default", tmp_path / "patched")
    assert worker_template_dir("default") == template_dir("default") == tmp_path / "patched"
