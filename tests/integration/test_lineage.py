"""Git lineage on a real repository: fast-forward only, replay onto a moved head, conflicts, and a
crash between the database and git writes repaired by the next scheduler start."""

from __future__ import annotations

import pytest

from farm.lineage import Lineage, LineageError, LockHeld, branch_ref, candidate_ref, format_message

FILES = {"train.py": "A = 1\nB = 2\nC = 3\n", "prepare.py": "fixed\n"}


def _root(lin: Lineage) -> str:
    return lin.create_root("p", FILES, message=format_message("template", trailers={"Farm-Program": "p"}))


def test_root_candidate_and_fast_forward_only(tmp_path):
    lin = Lineage(tmp_path / "repo")
    root = _root(lin)
    assert _root(lin) == root  # idempotent
    assert lin.branch_head("p") == root and lin.parents(root) == []
    c1 = lin.commit_candidate("p", 1, {"train.py": "A = 10\nB = 2\nC = 3\n"}, parent=root,
                              message=format_message("A up", rationale="why", trailers={"Farm-Experiment": "1"}))
    # the same change again (a crash between git and the database): the ref is reused
    assert lin.commit_candidate("p", 1, {"train.py": "A = 10\nB = 2\nC = 3\n"}, parent=root, message="x") == c1
    assert lin.resolve(candidate_ref("p", 1)) == c1 and lin.parents(c1) == [root]
    assert lin.files_at(c1) == {"train.py": "A = 10\nB = 2\nC = 3\n", "prepare.py": "fixed\n"}
    msg = lin.message(c1)
    assert msg.startswith("A up\n\nwhy\n") and "Farm-Experiment: 1" in msg
    c2 = lin.commit_candidate("p", 2, {"train.py": "A = 1\nB = 20\nC = 3\n"}, parent=root, message="B up\n")
    lin.advance("p", c1, expected=root)
    assert lin.branch_head("p") == c1
    with pytest.raises(LineageError):  # a sibling is not a fast-forward: history is never rewritten
        lin.sync_branch("p", c2)
    with pytest.raises(LineageError):  # rewinding is refused too
        lin.sync_branch("p", root)
    with pytest.raises(LineageError):
        lin.advance("p", c2, expected=root)  # stale expectation: compare-and-set fails
    assert lin.branch_head("p") == c1
    with pytest.raises(LineageError):
        lin.commit_candidate("p", 3, {"train.py": "x"}, parent="f" * 40, message="x")
    lin.add_note(c1, "Val-Bpb: 0.99\nDecision: keep")
    assert "Val-Bpb: 0.99" in lin.note(c1)


def test_replay_onto_moved_head_and_conflict(tmp_path):
    lin = Lineage(tmp_path / "repo")
    root = _root(lin)
    keep = lin.commit_candidate("p", 1, {"train.py": "A = 10\nB = 2\nC = 3\n"}, parent=root, message="A\n")
    lin.advance("p", keep, expected=root)
    other = lin.commit_candidate("p", 2, {"train.py": "A = 1\nB = 2\nC = 30\n"}, parent=root, message="C\n")
    res = lin.replay(base=root, change=other, onto=keep, names=["train.py"])
    assert res.conflicts == [] and res.files == {"train.py": "A = 10\nB = 2\nC = 30\n"}
    clash = lin.commit_candidate("p", 3, {"train.py": "A = 5\nB = 2\nC = 3\n"}, parent=root, message="A'\n")
    res = lin.replay(base=root, change=clash, onto=keep, names=["train.py"])
    assert res.conflicts == ["train.py"] and res.files == {}


def test_single_writer_lock(tmp_path):
    a, b = Lineage(tmp_path / "repo"), Lineage(tmp_path / "repo")
    with a.lock():
        with pytest.raises(LockHeld):
            b.acquire()
    b.acquire()
    b.release()


def _run_all(val: float) -> None:
    """Every queued run claimed by w1 and succeeded: baselines at 1.0, the rest at `val`."""
    from sqlalchemy import select

    from farm.db import session_scope
    from farm.models import Experiment, ExperimentStatus
    from farm.states import claim, record_result

    with session_scope() as s:
        for e in s.execute(select(Experiment).where(Experiment.status == ExperimentStatus.queued)).scalars():
            assert claim(s, e.id, "w1")
            v = val if e.role.value != "baseline" else 1.0
            assert record_result(s, e.id, "w1", ExperimentStatus.succeeded, val_bpb=v, hw_class="cpu")


def test_crash_between_database_and_git_is_repaired_on_restart(pg_env, tmp_path, monkeypatch):
    """A keep commits the new head to the database, then the process dies before moving the ref."""
    from sqlalchemy import select

    from farm.db import session_scope
    from farm.models import Program
    from farm.programs import create_program
    from scheduler.loop import Scheduler
    from tests.factories import make_worker
    from tests.toy_template import install

    install(monkeypatch, tmp_path)
    published: list[int] = []
    with session_scope() as s:
        create_program(s, name="crash", instructions="# go", policy={"kind": "greedy", "baseline_runs": 1})
        make_worker(s, "w1")

    sched = Scheduler(publish=lambda i, hw, **kw: published.append(i))
    sched.tick()  # branch + baseline queued
    _run_all(1.0)
    sched.tick()  # baseline decided, a mutation candidate queued
    _run_all(0.9)

    def die(slug: str, new: str) -> None:
        raise SystemExit("killed between the database and git writes")

    monkeypatch.setattr(sched, "_move_branch", die)
    with pytest.raises(SystemExit):
        sched.tick()
    sched.close()
    with session_scope() as s:
        p = s.execute(select(Program)).scalar_one()
        db_head, root = p.head_commit, p.root_commit
    assert db_head != root  # the keep is in the database
    lin = Lineage(sched.settings.repo_dir)
    assert lin.branch_head(p.slug) == root  # ... but not in git
    Scheduler(publish=lambda i, hw, **kw: None).start()  # restart
    assert lin.branch_head(p.slug) == db_head
    assert lin.is_ancestor(root, db_head) and lin.resolve(branch_ref(p.slug)) == db_head


def test_in_process_objects_are_the_ones_git_writes(tmp_path):
    """Commits are written without a git process: the trees must be byte-for-byte what git's own
    plumbing makes of the same files (git's entry order, nested folders, modes), and fsck clean."""
    import subprocess

    files = {"train.py": "x = 1\n", "a-b.py": "dash\n", "a/b.py": "nested\n", "a.py": "dot\n",
             "kernels/__init__.py": "", "kernels/sub/k.py": "deep é\n"}
    lin = Lineage(tmp_path / "repo")
    root = lin.create_root("p", files, message="template\n")
    c1 = lin.commit_candidate("p", 1, {"kernels/sub/k.py": "changed\n", "train.py": "x = 2\n"}, parent=root,
                              message="edit\n")
    assert lin.files_at(c1) == {**files, "kernels/sub/k.py": "changed\n", "train.py": "x = 2\n"}

    def git(*args: str, **kw) -> str:
        return subprocess.run(["git", *args], check=True, capture_output=True, text=True, **kw).stdout.strip()

    work = tmp_path / "work"
    for name, text in {**files, "kernels/sub/k.py": "changed\n", "train.py": "x = 2\n"}.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text, encoding="utf-8")
    git("init", "-q", str(work))
    git("-C", str(work), "add", "-A")
    expected_tree = git("-C", str(work), "write-tree")
    assert git("--git-dir", str(tmp_path / "repo"), "rev-parse", f"{c1}^{{tree}}") == expected_tree
    assert git("--git-dir", str(tmp_path / "repo"), "fsck", "--strict", "--no-dangling") == ""
    with pytest.raises(LineageError, match="bad file path"):
        lin.commit_candidate("p", 2, {"../x": "y"}, parent=root, message="x\n")


def test_commit_candidates_in_parallel_match_one_by_one(tmp_path):
    lin = Lineage(tmp_path / "repo")
    root = _root(lin)
    items = [("p", i, {"train.py": f"A = {i}\n"}, root, f"c{i}\n") for i in range(1, 13)]
    items.append(("p", 99, {"train.py": "x\n"}, "e" * 40, "orphan\n"))
    made = lin.commit_candidates(items)
    assert isinstance(made[-1], LineageError) and "not in the farm repository" in str(made[-1])
    for (_, i, files, _, msg), sha in zip(items[:-1], made[:-1], strict=True):
        assert isinstance(sha, str) and lin.resolve(candidate_ref("p", i)) == sha
        assert lin.files_at(sha)["train.py"] == files["train.py"] and lin.message(sha).strip() == msg.strip()
    assert lin.commit_candidates(items[:3]) == made[:3]  # idempotent by ref
    assert lin.resolve(candidate_ref("p", 99)) is None


def test_a_repository_another_database_left_is_set_aside_not_reused(tmp_path):
    """Found by review: with a fresh database next to an old farm repository, experiment ids and slugs start again
    and the refs were reused by name: experiment 2 trained its own change and recorded the old database's commit,
    and the new program's branch had the old one's history (every keep then failed to fast-forward it)."""
    old, new = Lineage(tmp_path / "repo"), Lineage(tmp_path / "repo")
    old_root = _root(old)
    old_c = old.commit_candidate("p", 2, {"train.py": "A = 5\n"}, parent=old_root, message="old database\n")
    old.advance("p", old_c, expected=old_root)
    files = {**FILES, "train.py": "A = 1\nB = 2\nC = 3\n# template v2\n"}
    root = new.create_root("p", files, message="template\n")
    assert root != old_root and new.branch_head("p") == root and new.files_at(root) == files
    c = new.commit_candidate("p", 2, {"train.py": "A = 9\n"}, parent=root, message="new database\n")
    assert c != old_c and new.files_at(c, ["train.py"]) == {"train.py": "A = 9\n"} and new.parents(c) == [root]
    assert new.resolve(candidate_ref("p", 2)) == c
    # the old commits stay reachable, under refs/superseded
    assert new.resolve(f"refs/superseded/heads/research/p/{old_c[:12]}") == old_c
    assert new.resolve(f"refs/superseded/candidates/p/2/{old_c[:12]}") == old_c
    # a branch that is the same template commit alone (this database made it, then crashed) is reused
    assert new.create_root("p", files, message="template\n") == root


def test_a_repository_that_cannot_be_used_for_a_moment_is_not_a_refusal(tmp_path):
    """Found by review: the repository moved away for one pass, or a ref lock left by a killed scheduler, stored
    the candidate invalid for good."""
    from farm.lineage import LineageUnavailable

    lin = Lineage(tmp_path / "repo")
    root = _root(lin)
    with lin.lock():
        stale = tmp_path / "repo" / candidate_ref("p", 7)
        stale = stale.with_name(stale.name + ".lock")
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_text("")
        c7 = lin.commit_candidate("p", 7, {"train.py": "A = 7\n"}, parent=root, message="x\n")
        assert lin.resolve(candidate_ref("p", 7)) == c7 and not stale.exists()
    (tmp_path / "repo").rename(tmp_path / "away")
    with pytest.raises(LineageUnavailable):
        lin.commit_candidate("p", 8, {"train.py": "A = 8\n"}, parent=root, message="x\n")
    (tmp_path / "away").rename(tmp_path / "repo")
    assert lin.parents(lin.commit_candidate("p", 8, {"train.py": "A = 8\n"}, parent=root, message="x\n")) == [root]
    with pytest.raises(LineageError) as refused:  # a parent the healthy repository does not have: refused
        lin.commit_candidate("p", 9, {"train.py": "x"}, parent="f" * 40, message="x")
    assert not isinstance(refused.value, LineageUnavailable)


def test_files_are_read_back_byte_for_byte(tmp_path):
    """Found by review: text-mode git output turned CRLF into LF, and ls-tree's quoting of a non-ASCII name made
    files_at() raise (all files) or find nothing (that name)."""
    lin = Lineage(tmp_path / "repo")
    files = {"train.py": "A = 1\r\nB = 2\r\nC = 3\r\nD = 4\r\n", "café.py": "x = 'é'\n", "sub/d é.py": "y = 1\n"}
    root = lin.create_root("p", files, message="t\n")
    assert lin.files_at(root) == files
    assert lin.files_at(root, ["café.py"]) == {"café.py": "x = 'é'\n"}
    change = lin.commit_candidate("p", 1, {"train.py": "A = 1\r\nB = 2\r\nC = 3\r\nD = 5\r\n"}, parent=root,
                                  message="c\n")
    onto = lin.commit_candidate("p", 2, {"train.py": "A = 0\r\nB = 2\r\nC = 3\r\nD = 4\r\n"}, parent=root,
                                message="o\n")
    res = lin.replay(base=root, change=change, onto=onto, names=["train.py"])
    assert res.conflicts == [] and res.files == {"train.py": "A = 0\r\nB = 2\r\nC = 3\r\nD = 5\r\n"}


def test_a_keep_whose_branch_cannot_move_still_notes_and_the_pass_goes_on(pg_env, tmp_path, monkeypatch):
    """Found by review: a branch someone committed on made sync_branch raise inside the keep's after-commit step:
    the pass ended there, the note was never written and later programs were not judged. And notes still to
    write when a scheduler stopped were lost for good: the next start writes them."""
    from sqlalchemy import select

    from farm.db import session_scope
    from farm.models import DecisionRecord, Experiment, ExperimentStatus, Program
    from farm.programs import create_program
    from scheduler.loop import Scheduler
    from tests.factories import make_worker
    from tests.toy_template import install

    install(monkeypatch, tmp_path)
    with session_scope() as s:
        create_program(s, name="diverged", instructions="# go", policy={"kind": "greedy", "baseline_runs": 1})
        make_worker(s, "w1")

    sched = Scheduler(publish=lambda i, hw, **kw: None)
    sched.tick()
    _run_all(1.0)
    sched.tick()
    _run_all(0.9)
    with session_scope() as s:
        p = s.execute(select(Program)).scalar_one()
        slug, root = p.slug, p.root_commit
    lin = Lineage(sched.settings.repo_dir)
    someone = lin.commit({"train.py": "by hand\n"}, parent=root, message="a person's commit\n")
    lin.advance(slug, someone, expected=root)
    stats = sched.tick()  # the keep: the branch cannot be fast-forwarded to it
    assert stats["keeps"] == 1 and "ms_fill" in stats  # the pass went on to its last phase
    sched.flush_notes()
    with session_scope() as s:
        kept = s.execute(select(Experiment).join(DecisionRecord, DecisionRecord.experiment_id == Experiment.id)
                         .where(DecisionRecord.decision == "keep")).scalar_one()
        sha = str(kept.commit_sha)
    assert lin.branch_head(slug) == someone and "Decision: keep" in lin.note(sha)
    sched.close()
    # a note lost with a stopped scheduler is written at the next start, the judged run's (a confirmation shares
    # the commit and has a decision record of its own, written after it)
    from farm.models import Decision

    with session_scope() as s:
        conf = Experiment(program_id=kept.program_id, role="confirmation", parent_commit=kept.parent_commit,
                          commit_sha=sha, files={}, proposer_kind=kept.proposer_kind, description="confirmation",
                          replicate_of=kept.id, hw_class="cpu", status=ExperimentStatus.succeeded,
                          decision=Decision.keep)
        s.add(conf)
        s.flush()
        s.add(DecisionRecord(program_id=kept.program_id, experiment_id=conf.id, decision=Decision.keep,
                             policy="greedy", reason="confirmation", statistics={"mean": 0.5}))
    lin._git("notes", "remove", sha)
    assert lin.note(sha) == ""
    again = Scheduler(publish=lambda i, hw, **kw: None)
    again.start()
    assert "Decision: keep" in lin.note(sha) and f"Experiment: {kept.id}" in lin.note(sha)
    again.close()


def test_a_candidate_the_repository_could_not_take_stays_proposed_and_is_queued_later(pg_env, tmp_path, monkeypatch):
    from sqlalchemy import select

    from farm.db import session_scope
    from farm.lineage import LineageUnavailable
    from farm.models import Experiment, ExperimentRole, ExperimentStatus
    from farm.programs import create_program
    from scheduler.loop import Scheduler
    from tests.factories import make_worker
    from tests.toy_template import install

    install(monkeypatch, tmp_path)
    with session_scope() as s:
        create_program(s, name="away", instructions="# go", policy={"baseline_runs": 1})
        make_worker(s, "w1")
    published: list[int] = []
    sched = Scheduler(publish=lambda i, hw, **kw: published.append(i))
    real = sched.lineage.commit_candidates
    monkeypatch.setattr(sched.lineage, "commit_candidates",
                        lambda items: [LineageUnavailable("the farm repository cannot be read") for _ in items])
    sched.tick()  # the baseline runs the root commit; a candidate needs a commit of its own

    def candidates() -> list[tuple[int, ExperimentStatus, str | None]]:
        with session_scope() as s:
            return [tuple(r) for r in s.execute(select(Experiment.id, Experiment.status, Experiment.commit_sha)
                                                .where(Experiment.role == ExperimentRole.candidate))]

    waiting = candidates()
    assert waiting and all(st == ExperimentStatus.proposed and sha is None for _, st, sha in waiting), waiting
    assert not {i for i, _, _ in waiting} & set(published)
    monkeypatch.setattr(sched.lineage, "commit_candidates", real)
    maintained: list[int] = []
    monkeypatch.setattr("scheduler.loop.GC_EVERY", 1)
    monkeypatch.setattr(sched.lineage, "maintain", lambda: maintained.append(1))
    sched.tick()
    sched.flush_notes()
    assert maintained  # the repository is offered `git gc --auto` once GC_EVERY commits are made
    done = {i: (st, sha) for i, st, sha in candidates()}
    for i, _, _ in waiting:
        assert done[i][0] == ExperimentStatus.queued and done[i][1] and i in published
    sched.close()


def test_maintain_packs_the_loose_objects(tmp_path):
    """Three or more loose objects per candidate and nothing packed them; the scheduler offers `git gc --auto`
    every GC_EVERY commits (here git's threshold is lowered so a few hundred commits reach it: git estimates the
    loose objects from one of its 256 folders)."""
    lin = Lineage(tmp_path / "repo")
    lin._git("config", "gc.auto", "1")
    root = _root(lin)
    shas = [lin.commit_candidate("p", i, {"train.py": f"A = {i}\n"}, parent=root, message=f"c{i}\n")
            for i in range(1, 400)]

    def loose() -> int:
        return sum(1 for d in (tmp_path / "repo" / "objects").iterdir() if len(d.name) == 2 for _ in d.iterdir())

    before = loose()
    assert before > 20
    lin.maintain()
    assert loose() < before // 2
    assert [lin.files_at(s, ["train.py"]) for s in shas[:3]] == [{"train.py": f"A = {i}\n"} for i in (1, 2, 3)]
    assert lin.commit_candidate("p", 400, {"train.py": "A = 400\n"}, parent=shas[-1], message="after\n")


def test_a_candidates_objects_and_ref_are_on_disk_before_it_is_returned(tmp_path, monkeypatch):
    """The database records a candidate's commit as soon as commit_candidate returns: its objects (and the ref
    that keeps them from gc) must be fsynced by then, or a power cut leaves a queued experiment whose commit is
    gone. gitdb writes loose objects with a rename and no fsync."""
    import os

    lin = Lineage(tmp_path / "repo")
    root = _root(lin)
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    sha = lin.commit_candidate("p", 7, {"train.py": "A = 7\nB = 2\nC = 3\n"}, parent=root, message="A = 7\n")
    monkeypatch.setattr(os, "fsync", real_fsync)
    objects = lin._git("rev-list", "--objects", "--no-object-names", sha, f"^{root}").stdout.split()
    assert len(objects) == 3  # the commit, its tree, the new train.py blob
    for obj in objects:
        path = str((tmp_path / "repo" / "objects" / obj[:2] / obj[2:]).resolve())
        assert path in synced and os.path.dirname(path) in synced, obj
    ref = str((tmp_path / "repo" / candidate_ref("p", 7)).resolve())
    assert ref in synced and os.path.dirname(ref) in synced
    # the folders made for them are found through their parents' entries: those are synced too
    assert str((tmp_path / "repo" / "objects").resolve()) in synced
    assert str((tmp_path / "repo" / "refs" / "candidates").resolve()) in synced
    assert synced.index(ref) > max(synced.index(str((tmp_path / "repo" / "objects" / o[:2] / o[2:]).resolve()))
                                   for o in objects)  # the ref only after what it points at
