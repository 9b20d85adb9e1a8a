"""End to end: the scheduler with the mutation proposer and two real Celery workers (`farm worker
--cpu`, Postgres + Redis) runs a cpu-profile program to N experiments. The branch advances only on
keeps, git and the database agree, and the exported results.tsv matches the database.

The training file is a fast stand-in (tests/fake_template's harness, so the worker contract is the
real one): its val_bpb is a smooth function of its UPPER_CASE hyperparameters plus seed noise, so
mutations have true effects. About 40 s here."""

from __future__ import annotations

import shutil
import time
from collections import defaultdict

import pytest
from sqlalchemy import select

from farm.db import session_scope
from farm.lineage import Lineage
from farm.models import Decision, DecisionRecord, Experiment, ExperimentStatus, Program, ProgramStatus
from farm.programs import create_program
from farm.reports import export, results_tsv
from scheduler.loop import Scheduler
from tests.workerkit import FAKE_TEMPLATE, worker_env, workers

TRAIN = '''"""Stand-in train.py: val_bpb is a smooth function of the hyperparameters plus seed noise."""
import random
import time

import prepare

# ---- Hyperparameters ----
MATRIX_LR = 0.01  # learning rate (best near 0.03)
DEPTH = 2  # layers (best at 4)
WARMDOWN_RATIO = 0.9  # share of the budget spent decaying (best near 0.5)

t0 = time.time()
while time.time() - t0 < min(prepare.TIME_BUDGET, 0.3):
    time.sleep(0.05)
noise = random.Random(prepare.SEED).gauss(0.0, 0.002)
val = 1.5 + 40 * (MATRIX_LR - 0.03) ** 2 + 0.01 * abs(DEPTH - 4) + 0.05 * (WARMDOWN_RATIO - 0.5) ** 2 + noise
prepare.finish(val, steps=5)
'''

N = 10


@pytest.mark.slow
def test_mutation_program_runs_to_n_experiments_with_real_workers(pg_env, tmp_path, monkeypatch):
    tpl = tmp_path / "template"
    shutil.copytree(FAKE_TEMPLATE, tpl, ignore=shutil.ignore_patterns("__pycache__"))
    (tpl / "train.py").write_text(TRAIN)
    from farm import templates

    monkeypatch.setitem(templates.TEMPLATES, "default", tpl)
    with session_scope() as s:
        p = create_program(s, name="e2e mutation", instructions="# tune the hyperparameters", profile="cpu",
                           time_budget=1.0, policy={"kind": "confirm", "baseline_runs": 2},
                           stop_rules={"max_experiments": N})
        pid, slug = p.id, p.slug
    env = worker_env(pg_env, FARM_TEMPLATE_DIR=str(tpl))
    sched = Scheduler()
    with workers(env, ["e2e:cpu0", "e2e:cpu1"], tmp_path / "logs", timeout=120):
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            sched.tick()
            with session_scope() as s:
                if s.get(Program, pid).status == ProgramStatus.finished:
                    break
            time.sleep(0.3)
    sched.close()
    with session_scope() as s:
        prog = s.get(Program, pid)
        assert prog.status == ProgramStatus.finished, f"not finished: {prog.status} {prog.status_reason}"
        assert "max_experiments" in (prog.status_reason or "")
        exps = list(s.execute(select(Experiment).where(Experiment.program_id == pid)
                              .order_by(Experiment.id)).scalars())
        decisions = {d.experiment_id: d for d in s.execute(select(DecisionRecord)).scalars()}
        ran = [e for e in exps if e.status not in (ExperimentStatus.proposed, ExperimentStatus.invalid)]
        # the cap bounds new work; confirmations (and replays, which confirm a keep on a moved head) complete a
        # decision and may run past it, as many as there were candidates in flight at the cap (a fixed N + 3 here
        # failed once under the full suite's load with 14 runs)
        new_work = [e for e in ran if e.role.value != "confirmation"]
        assert len(ran) >= N and len(new_work) <= N, [(e.id, e.role.value, e.proposer_kind) for e in ran]
        assert all(e.replicate_of is not None or e.proposer_kind == "replay" for e in ran if e not in new_work)
        assert all(e.status.finished for e in ran)
        assert all(e.decision is not None for e in ran if e.status == ExperimentStatus.succeeded
                   and e.role.value != "baseline")
        kept = [e for e in exps if e.decision == Decision.keep and e.replicate_of is None]
        for e in exps:
            if e.decision is not None:
                assert decisions[e.id].decision == e.decision
        head, root = prog.head_commit, prog.root_commit
        tsv = results_tsv(s, prog)
        out = export(s, prog, tmp_path / "export")
    # git: the branch is the database head, and its first-parent history is root + the keeps
    lin = Lineage(sched.settings.repo_dir)
    assert lin.branch_head(slug) == head
    chain, cur = [], head
    while cur != root:
        chain.append(cur)
        (cur,) = lin.parents(cur)
    assert sorted(chain) == sorted(e.commit_sha for e in kept)
    if kept:
        assert head == kept[-1].commit_sha
    for e in ran:
        if e.role.value == "candidate":
            assert lin.parents(e.commit_sha) == [e.parent_commit]
    # results.tsv matches the database, row for row
    lines = tsv.splitlines()
    assert lines[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    by_commit: dict[str, list[str]] = defaultdict(list)
    for line in lines[1:]:
        commit, val, _mem, status, _desc = line.split("\t")
        by_commit[commit].append(status)
        matches = [e for e in ran if (e.commit_sha or "")[:7] == commit]
        assert matches, line
    with session_scope() as s:
        for e in s.execute(select(Experiment).where(Experiment.program_id == pid)).scalars():
            if e.decision is not None:
                line = [ln for ln in lines[1:] if ln.split("\t")[3] == e.decision.value
                        and ln.split("\t")[0] == e.commit_sha[:7]]
                assert line, f"experiment {e.id} ({e.decision.value}) missing from results.tsv"
                assert f"{e.result.val_bpb:.6f}" in {ln.split(chr(9))[1] for ln in line}
    assert (tmp_path / "export" / "results.tsv").read_text() == tsv and len(out) == 3
