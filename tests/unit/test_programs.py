"""Program slugs (farm/programs.py)."""

from __future__ import annotations

import pytest

from farm.programs import ProgramError, slugify


def test_a_slug_cut_at_80_characters_does_not_end_in_a_dash():
    slug = slugify("a" * 79 + " b" * 10)  # the cut falls right after a separator
    assert slug == "a" * 79


def test_slugs_are_lowercase_words_and_never_all_digits():
    assert slugify("  Faster Muon: v2!  ") == "faster-muon-v2"
    assert slugify("2026") == "p-2026"
    # found by review: the dashboard's /ui/programs/new and /live come first, so these slugs were unreachable there
    assert slugify("New") == "p-new" and slugify("live") == "p-live" and slugify("new live") == "new-live"
    with pytest.raises(ProgramError, match="letter or digit"):
        slugify("!!!")


@pytest.fixture
def session(sqlite_url: str):  # type: ignore[no-untyped-def]
    from sqlalchemy.orm import Session

    from farm.db import make_engine

    engine = make_engine(sqlite_url)
    with Session(engine) as s:
        yield s
    engine.dispose()


@pytest.mark.parametrize("fixed", ["prepare.py", "kernels/__init__.py"])
def test_the_fixed_harness_cannot_be_made_editable(session, fixed: str) -> None:  # type: ignore[no-untyped-def]
    # every candidate that touched prepare.py was refused by the worker, so the program could never advance
    from farm.programs import create_program

    with pytest.raises(ProgramError, match="fixed harness"):
        create_program(session, name="cheat", instructions="x", editable=["train.py", fixed])


def test_editable_files_must_be_files_of_the_template(session) -> None:  # type: ignore[no-untyped-def]
    from farm.programs import create_program

    with pytest.raises(ValueError, match="not in template"):
        create_program(session, name="missing", instructions="x", editable=["nope.py"])
    assert create_program(session, name="fine", instructions="x", editable=["train.py"]).editable_files == [
        "train.py"]


def test_post_programs_with_the_harness_editable_is_422(farm_env) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from api.app import create_app
    from farm import migrate
    from farm.db import session_scope
    from farm.settings import get_settings
    from farm.tokens import create_token

    settings = get_settings()
    migrate.upgrade(settings.db_url)
    with session_scope() as s:
        plain = create_token(s, name="t").plain
    body = {"name": "cheat", "instructions": "x", "editable_files": ["train.py", "prepare.py"]}
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {plain}"}) as c:
        r = c.post("/programs", json=body)
        assert r.status_code == 422 and "prepare.py" in r.json()["detail"] and "harness" in r.json()["detail"], r.text
        assert c.post("/programs", json={**body, "editable_files": ["train.py"]}).status_code == 201
