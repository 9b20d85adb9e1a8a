"""Recording proposals against a real database: valid, invalid with reason, duplicates."""

from __future__ import annotations

from farm.candidates import Edit, record_proposal
from farm.db import make_engine, session_scope
from farm.models import ExperimentStatus
from farm.programs import create_program, head_files


def test_record_valid_invalid_and_duplicate(pg_url):
    engine = make_engine(pg_url)
    with session_scope(engine) as s:
        prog = create_program(s, name="Tiny LR sweep", instructions="# go", profile="cpu")
        assert prog.slug == "tiny-lr-sweep" and prog.branch == "research/tiny-lr-sweep"
        assert prog.template_digest and prog.time_budget > 0
        base = head_files(s, prog)
        assert "train.py" in base
        new = base["train.py"] + "\n# a comment that changes the content\n"
        e1 = record_proposal(s, prog, parent_commit="a" * 40, base_files=base,
                             edit=Edit(files={"train.py": new}), proposer_kind="manual", description="comment")
        assert e1.status == ExperimentStatus.proposed and e1.content_hash and "+# a comment" in e1.diff
        e2 = record_proposal(s, prog, parent_commit="a" * 40, base_files=base,
                             edit=Edit(files={"train.py": new}), proposer_kind="llm", description="same again")
        assert e2.status == ExperimentStatus.invalid and e2.status_reason == f"duplicate of experiment {e1.id}"
        e3 = record_proposal(s, prog, parent_commit="a" * 40, base_files=base,
                             edit=Edit(search_replace="train.py\n<<<<<<< SEARCH\nnot there\n=======\nx\n"
                                                      ">>>>>>> REPLACE"),
                             proposer_kind="llm", description="bad")
        assert e3.status == ExperimentStatus.invalid and "not found" in (e3.status_reason or "")
        e4 = record_proposal(s, prog, parent_commit="a" * 40, base_files=base,
                             edit=Edit(files={"prepare.py": "x = 1\n"}), proposer_kind="manual", description="x")
        assert e4.status == ExperimentStatus.invalid and "non-editable" in (e4.status_reason or "")
    engine.dispose()


def test_an_edit_checked_ahead_is_used_only_against_the_same_files(pg_url):
    """The scheduler checks an LLM's edit in the proposer thread (check_edit); storing it uses that
    check when the base files are the ones it was made against, and checks again otherwise."""
    from farm.candidates import check_edit

    engine = make_engine(pg_url)
    with session_scope(engine) as s:
        prog = create_program(s, name="Ahead", instructions="# go", profile="cpu")
        base = head_files(s, prog)
        bad = Edit(files={"train.py": base["train.py"] + "\ndef broken(:\n"})
        checked = check_edit(base, bad, list(prog.editable_files))
        assert checked.reason and "does not compile" in checked.reason and checked.files == {}
        e1 = record_proposal(s, prog, parent_commit="a" * 40, base_files=base, edit=bad, proposer_kind="llm",
                             description="broken", checked=checked)
        assert e1.status == ExperimentStatus.invalid and e1.status_reason == checked.reason
        # a check made against other files (the head moved) is not trusted: the edit is checked again
        good = Edit(files={"train.py": base["train.py"] + "\n# fine\n"})
        stale = check_edit({**base, "train.py": "x = (\n"}, bad, list(prog.editable_files))
        e2 = record_proposal(s, prog, parent_commit="a" * 40, base_files=base, edit=good, proposer_kind="llm",
                             description="fine", checked=stale)
        assert e2.status == ExperimentStatus.proposed and "+# fine" in e2.diff
    engine.dispose()
