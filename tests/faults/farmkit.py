"""A whole farm for fault tests: real `farm scheduler` and `farm worker --cpu` processes, the test
Postgres, a private Redis, the fault harness (tests/faults/template: no torch, so a run costs its
budget), the mutation proposer. After a fault, `check_invariants` proves nothing was lost or
duplicated and git agrees with the database; `record_recovery` prints and logs the recovery time."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import func, select

from farm.db import db_now, session_scope
from farm.lineage import Lineage
from farm.models import DecisionRecord, Experiment, ExperimentStatus, Program, ProgramStatus, Result
from farm.programs import create_program
from farm.settings import get_settings
from tests.procs import ROOT, kill9, start_scheduler, stop_process
from tests.workerkit import start_worker, wait_registered, worker_env, worker_log

S = ExperimentStatus
TEMPLATE = Path(__file__).resolve().parent / "template"
BUDGET = 3.0
RUN_OUTCOMES = {S.succeeded, S.crashed, S.timed_out, S.refused}
TSV = ROOT / "artifacts" / "fault_recovery.tsv"
T = TypeVar("T")

# 1 s heartbeats (stale after 2 s), half-second scheduler passes, 1 s allowances: wall limit = budget + 2 s
FARM_ENV = {"FARM_TEMPLATE_DIR": str(TEMPLATE), "FARM_HEARTBEAT_INTERVAL": "1", "FARM_SCHEDULER_INTERVAL": "0.5",
            "FARM_STARTUP_ALLOWANCE": "1", "FARM_EVAL_ALLOWANCE": "1", "FARM_LOG_CAP_MB": "1",
            "FARM_LOOKAHEAD": "1", "FARM_MAX_RETRIES": "2"}


@dataclass
class FaultFarm:
    env: dict[str, str]
    logs: Path
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    scheduler: subprocess.Popen[bytes] | None = None
    program_id: int = 0
    slug: str = ""

    # ------------------------------------------------------------------ processes
    def start_workers(self, *names: str, **extra: str) -> None:
        procs = {n: start_worker(worker_env(self.env, **extra), n, self.logs, slot=len(self.workers) + i)
                 for i, n in enumerate(names)}
        self.workers.update(procs)
        for n, p in procs.items():
            wait_registered(n, p, self.logs, timeout=90)

    def start_scheduler(self) -> None:
        self.scheduler = start_scheduler(worker_env(self.env), self.logs)

    def kill_worker(self, name: str) -> None:
        kill9(self.workers.pop(name))

    def kill_scheduler(self) -> None:
        assert self.scheduler is not None
        kill9(self.scheduler)
        self.scheduler = None

    def stop(self) -> None:
        if self.scheduler is not None:
            stop_process(self.scheduler)
            self.scheduler = None
        for p in self.workers.values():
            stop_process(p)
        self.workers.clear()

    def logs_text(self) -> str:
        parts = [f"--- {n}\n{worker_log(self.logs, n)[-2500:]}" for n in self.workers]
        sched = self.logs / "scheduler.log"
        if sched.exists():
            parts.append("--- scheduler\n" + sched.read_text(errors="replace")[-2500:])
        return "\n".join(parts)

    # ------------------------------------------------------------------ the program
    def create_program(self, max_experiments: int, budget: float = BUDGET) -> None:
        with session_scope() as s:
            p = create_program(s, name="faults", instructions="# tune the hyperparameters",
                               time_budget=budget, proposer={"kind": "mutation"},
                               policy={"baseline_runs": 2}, stop_rules={"max_experiments": max_experiments})
            self.program_id, self.slug = p.id, p.slug

    def program(self) -> Program:
        with session_scope() as s:
            p = s.get(Program, self.program_id)
            assert p is not None
            s.expunge(p)
            return p

    def experiments(self) -> list[Experiment]:
        with session_scope() as s:
            out = list(s.execute(select(Experiment).where(Experiment.program_id == self.program_id)
                                 .order_by(Experiment.id)).scalars())
            for e in out:
                s.expunge(e)
            return out

    def now(self) -> datetime:
        with session_scope() as s:
            return db_now(s)

    def results(self) -> int:
        with session_scope() as s:
            return int(s.scalar(select(func.count()).select_from(Result).join(Experiment)
                                .where(Experiment.program_id == self.program_id)) or 0)

    def wait(self, what: str, probe: Callable[[], T | None], timeout: float = 60.0) -> T:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = probe()
            if value is not None and value is not False:
                return value
            time.sleep(0.2)
        states = [(e.id, e.status.value, e.worker_id) for e in self.experiments()]
        raise AssertionError(f"timed out after {timeout}s waiting for {what}: {states}\n{self.logs_text()}")

    def wait_results(self, n: int, timeout: float = 60.0) -> None:
        self.wait(f"{n} results", lambda: self.results() >= n or None, timeout)

    def wait_finished(self, timeout: float = 120.0) -> Program:
        def done() -> Program | None:
            p = self.program()
            return p if p.status == ProgramStatus.finished else None
        return self.wait("the program to finish", done, timeout)

    def first_after(self, t: datetime, *, column: str = "started_at", **where: Any) -> datetime | None:
        """The earliest `column` timestamp after t among this program's experiments."""
        col = getattr(Experiment, column)
        with session_scope() as s:
            q = select(func.min(col)).where(Experiment.program_id == self.program_id, col > t)
            for k, v in where.items():
                q = q.where(getattr(Experiment, k) == v)
            return s.scalar(q)

    # ------------------------------------------------------------------ the checks
    def check_invariants(self) -> dict[str, Any]:
        """Zero lost, zero duplicate results, every candidate run decided, git branch == database head."""
        exps = self.experiments()
        lost = [e.id for e in exps if e.status == S.lost]
        stuck = [e.id for e in exps if e.status in (S.queued, S.running)]
        assert not lost and not stuck, f"lost {lost}, still queued/running {stuck}"
        with session_scope() as s:
            per_exp = dict(s.execute(select(Result.experiment_id, func.count()).join(Experiment)
                                     .where(Experiment.program_id == self.program_id)
                                     .group_by(Result.experiment_id)).all())
            res = {r.experiment_id: r for r in s.execute(select(Result).join(Experiment).where(
                Experiment.program_id == self.program_id)).scalars()}
            decisions = list(s.execute(select(DecisionRecord).where(DecisionRecord.program_id == self.program_id)
                                       .order_by(DecisionRecord.id)).scalars())
            for d in decisions:
                s.expunge(d)
        ran = [e for e in exps if e.status in RUN_OUTCOMES]
        assert all(per_exp.get(e.id) == 1 for e in ran), f"results per experiment: {per_exp}"
        assert set(per_exp) == {e.id for e in ran}, "a result for an experiment that did not finish a run"
        assert all(res[e.id].worker_id == e.worker_id for e in ran), "a result from a worker that lost its claim"
        # baselines are measurements of the head, never judged
        undecided = [e.id for e in exps if e.status == S.succeeded and e.decision is None
                     and e.role.value != "baseline"]
        assert not undecided, f"succeeded but undecided: {undecided}"
        hashes = [e.content_hash for e in exps if e.content_hash and e.replicate_of is None
                  and e.role.value != "baseline"]
        assert len(hashes) == len(set(hashes)), "the same candidate ran twice"
        # the branch head: database, git and the decision log agree
        p = self.program()
        lineage = Lineage(get_settings().repo_dir)
        assert p.head_commit and lineage.branch_head(self.slug) == p.head_commit, (
            f"git {lineage.branch_head(self.slug)} != database {p.head_commit}")
        keeps = [d for d in decisions if d.head_after and d.head_after != d.head_before]
        assert p.head_commit == (keeps[-1].head_after if keeps else p.root_commit)
        for e in exps:
            if e.commit_sha:
                assert lineage.has_commit(e.commit_sha), f"experiment {e.id}: commit {e.commit_sha} missing"
        return {"experiments": len(exps), "runs": len(ran), "keeps": len(keeps),
                "retries": sum(e.retry_count for e in exps)}


def record_recovery(test: str, seconds: float, measured: str, details: str = "") -> None:
    """Print the recovery time and append it to artifacts/fault_recovery.tsv."""
    print(f"\nRECOVERY {test}: {seconds:.2f}s ({measured}) {details}")
    TSV.parent.mkdir(parents=True, exist_ok=True)
    new = not TSV.exists()
    with TSV.open("a") as f:
        if new:
            f.write("when\ttest\trecovery_seconds\tmeasured_from_to\tdetails\n")
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\t{test}\t{seconds:.2f}\t{measured}\t{details}\n")
