"""The research loop, made parallel and restartable: `Scheduler.tick()` is one pass, `run_forever()` loops.

Each tick, under the repository lock (one scheduler at a time):
  1. recovery (farm.recovery): stale running experiments are re-queued and re-published, and queued
     experiments with no live broker message are re-published;
  2. lineage: a new program gets its branch (template commit); every branch ref is set to the
     database head (a fast-forward or a no-op: this is what repairs a crash between the writes);
  3. finished LLM calls become proposals through farm.candidates.record_proposal;
  4. decisions: every finished, undecided run is judged by scheduler.policy against its own parent
     (confirmation, replay onto a moved head, keep, discard), crashes get repair proposals;
  5. stop rules finish programs;
  6. feeding: per hardware class, queued + running is topped up to live workers' slots + lookahead, shared
     among active programs by weight (baselines first, then confirmations, pending proposals, then
     new proposals); a proposal is committed to git, marked queued, committed, then published.

All state lives in the database, every write is a compare-and-set or idempotent (candidate refs
are reused, confirmations and replays are created in the transaction that records why), so a
scheduler killed at any point and restarted neither duplicates work nor decisions. The only thing
lost in a crash is an LLM answer still in flight (its call is already in llm_calls).
"""

from __future__ import annotations

import logging
import signal
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, or_, select, union, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, defer

from farm import states
from farm.broker import publish_experiment
from farm.candidates import (
    Edit,
    apply_edit,
    check_edit,
    content_hash,
    known_duplicates,
    record_proposal,
)
from farm.db import SchedulerLock, as_utc, db_now, get_engine, session_scope
from farm.lineage import Lineage, LineageError, LineageUnavailable, format_message
from farm.models import (
    Decision,
    DecisionRecord,
    Experiment,
    ExperimentRole,
    ExperimentStatus,
    LLMCall,
    Program,
    ProgramStatus,
    Result,
    Worker,
    utcnow,
)
from farm.recovery import job_time_limit, note_database_failure
from farm.settings import Settings, get_settings
from farm.templates import template_files
from scheduler.llm import CallRecord, LLMConfig, LLMProposer
from scheduler.mutation import MutationProposer
from scheduler.policy import PolicyConfig, Verdict, judge, mean, noise_sigma, parent_consensus
from scheduler.proposers import (
    HistoryItem,
    Proposal,
    ProposalContext,
    Proposer,
    ProposerError,
    ProposerRefused,
)
from scheduler.repair import looks_fixable, repair_depth

log = logging.getLogger("farm.scheduler")

S = ExperimentStatus
OUTSTANDING = (S.proposed, S.queued, S.running)
PARENT_REMEASURES = 2  # more runs a parent whose runs disagree may get before changes are judged on their median
ACTIVE_RUN = (S.queued, S.running)
NOT_RUN = (S.proposed, S.invalid, S.cancelled)
REFUSALS_TO_PAUSE = 3  # calls in a row the LLM provider refuses (401, 403, 404) before the program is paused
GC_EVERY = 1000  # candidate commits between two `git gc --auto` (cheap when there is nothing to pack)  # what max_experiments does not count
Publish = Callable[..., None]
RECONCILE_EVERY = 30.0
DECISION_LIST_MAX = 1000  # runs to judge named in the load's IN lists; a longer backlog is selected by subqueries


@dataclass
class Job:
    program_id: int
    ctx: ProposalContext
    repair_of: int | None = None


def _past_deadline(rules: dict[str, Any], now: datetime) -> str | None:
    deadline = rules.get("deadline")
    if not deadline:
        return None
    when = datetime.fromisoformat(str(deadline))
    try:
        when = as_utc(when)
    except OverflowError:  # within hours of datetime's range: its year says which end (found by review)
        if when.year == 1:
            return f"deadline {deadline} passed"
        when = datetime.max.replace(tzinfo=UTC)
    return f"deadline {when.isoformat()} passed" if now >= when else None


def run_value(status: ExperimentStatus, val_bpb: float | None, result_hw: str | None, exp_hw: str,
              program_hw: str) -> float | None:
    """The val_bpb a run counts with: succeeded, measured, and on the program's hardware class (runs are
    compared within one class only)."""
    if status != S.succeeded or val_bpb is None or (result_hw or exp_hw) != program_hw:
        return None
    return float(val_bpb)


@dataclass
class ProgramView:
    """One program's experiments and results, loaded once per pass."""

    program: Program
    exps: list[Experiment]
    results: dict[int, Result]
    by_id: dict[int, Experiment] = field(default_factory=dict)
    locked: set[int] = field(default_factory=set)  # rows this transaction holds FOR UPDATE (decisions)
    remeasured: set[str] = field(default_factory=set)  # parent commits given one more run in this pass
    # the groups the noise estimate pools, when the view holds only part of the program (read on first use)
    pooled: Callable[[], list[list[float]]] | None = None

    def __post_init__(self) -> None:
        self.by_id = {e.id: e for e in self.exps}
        self._by_commit: dict[str, list[Experiment]] = defaultdict(list)
        for e in self.exps:
            if e.commit_sha:
                self._by_commit[e.commit_sha].append(e)
        self._sigma: dict[float | None, float] = {}

    # A view is read within one transaction: statuses and results do not change under it (decisions
    # do, and nothing below reads them), so the per-commit index and sigma are computed once.
    def value(self, e: Experiment) -> float | None:
        r = self.results.get(e.id)
        if r is None or e.set_aside:  # set aside by its change's decision: not a measurement of its commit
            return None
        return run_value(e.status, r.val_bpb, r.hw_class, e.hw_class, self.program.hw_class)

    def runs_of(self, commit: str | None) -> list[float]:
        vals = [self.value(e) for e in self._by_commit.get(commit, [])] if commit else []
        return [v for v in vals if v is not None]

    def pending_runs_of(self, commit: str | None) -> bool:
        if commit is None:
            return any(e.commit_sha is None and e.status in OUTSTANDING for e in self.exps)
        return any(e.status in OUTSTANDING for e in self._by_commit.get(commit, []))

    def groups(self) -> list[list[float]]:
        return [g for g in (self.runs_of(c) for c in self._by_commit) if g]

    def sigma(self, cfg: PolicyConfig) -> float:
        if cfg.prior_sigma not in self._sigma:
            groups = self.pooled() if self.pooled is not None else self.groups()
            self._sigma[cfg.prior_sigma] = noise_sigma(groups, prior=cfg.prior_sigma, floor=cfg.min_val_bpb,
                                                       max_spread=cfg.max_jump)[0]
        return self._sigma[cfg.prior_sigma]


class Scheduler:
    def __init__(self, settings: Settings | None = None, *, engine: Engine | None = None,
                 lineage: Lineage | None = None, publish: Publish | None = None,
                 proposer_factory: Callable[[Program], Proposer] | None = None) -> None:
        self.settings = settings or get_settings()
        self.engine = engine or get_engine(self.settings)
        self.lineage = lineage or Lineage(self.settings.repo_dir)
        self.db_lock = SchedulerLock(self.engine)
        self.publish: Publish = publish or publish_experiment
        self.proposer_factory = proposer_factory or self._default_proposer
        self.pool = ThreadPoolExecutor(max_workers=self.settings.llm_concurrency, thread_name_prefix="llm")
        self._note_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="git-notes")  # in order
        self._notes: list[Future[None]] = []
        self._pass_ctx: dict[int, ProposalContext] = {}  # per _fill pass: program -> context sent
        self._pass_pending: dict[int, list[tuple[int, ExperimentRole]]] = {}  # per _fill pass: proposed rows to queue
        self._pass_room: dict[int, int] = {}  # per _fill pass: program -> runs max_experiments still allows
        self._pass_batch: list[int] = []  # per _fill pass: ids picked for queueing, queued in one transaction
        self.inflight: dict[Future[Proposal], Job] = {}
        self._unstored: list[tuple[Job, Proposal]] = []  # answers a database outage kept from being stored
        self.cooldown: dict[int, float] = {}
        self.refusals: dict[int, int] = defaultdict(int)  # calls in a row the provider refused, per program
        self.failures: dict[int, int] = defaultdict(int)
        self.repairs_tried: set[int] = set()
        # crashed experiment -> (repair depth, worth a repair): what a crash offers a repair never changes (crashed
        # is final, its result is written with it, only this scheduler adds repairs), so it is read once
        self._crashes: dict[int, tuple[int, bool]] = {}
        self._to_pause: dict[int, str] = {}
        self._bad_rules: set[tuple[int, str]] = set()  # (program, stop rule) that could not be read (warned once)
        self._since_gc = 0  # candidate commits since the repository was last offered `git gc --auto`  # programs whose proposer cannot be made: paused at the end of the pass
        self.stop_event = threading.Event()
        self._started = False
        self._next_reconcile = 0.0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._started:
            return
        self.lineage.acquire()
        try:
            self.db_lock.acquire()  # one scheduler per database, not only per repository folder
        except BaseException:
            self.lineage.release()
            raise
        self._started = True
        self._crashes = {}  # another scheduler may have added repairs while the lock was not ours
        self._init_programs()
        self._sync_branches()
        self._repair_notes()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._note_writer.shutdown(wait=True)  # notes already decided are written before the lock goes
        self._notes = []
        self._note_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="git-notes")
        self.db_lock.release()
        self.lineage.release()
        self._started = False

    def run_forever(self) -> None:
        self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, lambda *_: self.stop_event.set())
            except ValueError:  # not the main thread
                pass
        log.info("scheduler started (repo %s)", self.lineage.path)
        try:
            while not self.stop_event.is_set():
                try:
                    self.tick()
                except Exception:
                    log.exception("scheduler pass failed; retrying")
                self.stop_event.wait(self.settings.scheduler_interval)
        finally:
            self.close()

    def tick(self) -> dict[str, int]:
        """One pass; returns counters for logs and tests."""
        self.start()
        try:
            retaken = self.db_lock.check()
        except DBAPIError:
            note_database_failure()  # an outage seen here, before the reaper: it reaps nothing for its grace after it
            raise
        if retaken:  # taken back after losing it: another scheduler may have repaired crashes
            self._crashes = {}
            # the lock's session was lost (a network cut, a failover: not always a restart the reaper can see), and
            # the workers' heartbeats may have failed all that time: the reaper's grace runs from now (found by review:
            # the first pass after a long outage re-queued every run in flight)
            note_database_failure()
        stats: dict[str, int] = defaultdict(int)
        phases: list[tuple[str, Callable[[], None]]] = [
            ("recover", lambda: self._recover(stats)), ("init", self._init_programs),
            ("sync", self._sync_branches), ("collect", lambda: self._collect(stats)),
            ("decide", lambda: self._decide(stats)), ("stop", lambda: self._stop_rules(stats)),
            ("fill", lambda: self._fill(stats))]
        try:
            for name, phase in phases:
                t0 = time.perf_counter()
                phase()
                stats[f"ms_{name}"] = int((time.perf_counter() - t0) * 1000)  # where a slow pass goes
        finally:
            self._pause_unproposable()
        return dict(stats)

    def drain(self, timeout: float | None = None) -> dict[str, int]:
        """Wait for the proposer calls in flight (until `timeout`, None: as long as they take; each LLM call has its
        own timeout) and store their answers. A one-pass run (`farm scheduler --once`) calls it before close(),
        which cancels what is still in flight: the calls are paid for, so their answers must not be dropped."""
        stats: dict[str, int] = defaultdict(int)
        if self.inflight:
            wait(list(self.inflight), timeout=timeout)
            self._collect(stats)
        if self.inflight:
            stats["llm_calls_unanswered"] = len(self.inflight)
        return dict(stats)

    def wait_for_proposals(self, timeout: float = 30.0) -> None:
        """Block until the LLM calls in flight have answered (tests)."""
        deadline = time.monotonic() + timeout
        for fut in list(self.inflight):
            fut.exception(timeout=max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ recovery
    def _recover(self, stats: dict[str, int]) -> None:
        """The worker branch's recoveries: the reaper every pass, the broker reconciler every 30 s."""
        from farm.recovery import reap_and_requeue, reconcile_broker

        try:
            stats["reaped"] += len(reap_and_requeue(settings=self.settings))
            if time.monotonic() >= self._next_reconcile:
                self._next_reconcile = time.monotonic() + RECONCILE_EVERY
                stats["republished"] += len(reconcile_broker(settings=self.settings).republished)
        except Exception:  # a broker outage must not stop decisions and git bookkeeping
            log.exception("recovery pass failed")

    # ------------------------------------------------------------------ lineage
    def _init_programs(self) -> None:
        with session_scope(self.engine) as s:
            todo = s.execute(select(Program).where(Program.root_commit.is_(None))).scalars().all()
            for p in todo:
                files = template_files(p.template)
                msg = format_message(f"{p.name}: template {p.template}", rationale=p.instructions[:2000],
                                     trailers={"Farm-Program": p.slug, "Farm-Template": p.template})
                root = self.lineage.create_root(p.slug, files, message=msg)
                locked = s.execute(select(Program).where(Program.id == p.id).with_for_update()
                                   .execution_options(populate_existing=True)).scalar_one()
                if locked.root_commit is None:
                    locked.root_commit = root
                    locked.head_commit = locked.head_commit or root
                    log.info("program %s: branch %s at template commit %s", p.slug, p.branch, root[:12])

    def _sync_branches(self) -> None:
        with session_scope(self.engine) as s:
            heads = s.execute(select(Program.slug, Program.head_commit)
                              .where(Program.head_commit.is_not(None))).all()
        for slug, head in heads:
            if head is None:
                continue
            try:
                if self.lineage.sync_branch(slug, head):
                    log.warning("program %s: branch moved to the database head %s", slug, head[:12])
            except LineageError as exc:
                log.error("program %s: %s", slug, exc)

    # ------------------------------------------------------------------ proposals
    def _default_proposer(self, program: Program) -> Proposer:
        conf = dict(program.proposer or {})
        kind = conf.get("kind") or ("llm" if (conf.get("model") or self.settings.llm_model) else "mutation")
        if kind == "llm":
            if not (conf.get("model") or self.settings.llm_model):
                raise ProposerError("its proposer is an LLM but no model is set: give proposer.model in the program, "
                                    "or set FARM_LLM_MODEL for the scheduler, then resume it")
            pid = program.id
            return LLMProposer(LLMConfig.resolve(conf, self.settings),
                               record_call=lambda rec: self._record_call(pid, rec))
        if kind == "mutation":
            return MutationProposer(target=str(conf.get("target", "train.py")))
        raise ProposerError(f"unknown proposer kind {kind!r}")

    def _record_call(self, program_id: int, rec: CallRecord) -> int:
        with session_scope(self.engine) as s:
            row = LLMCall(program_id=program_id, model=rec.model, purpose=rec.purpose,
                          prompt_tokens=rec.prompt_tokens, completion_tokens=rec.completion_tokens,
                          cost_usd=rec.cost_usd, latency_s=rec.latency_s, error=rec.error)
            s.add(row)
            s.flush()
            return row.id

    def _context(self, s: Session, p: Program, *, seed: int | None = None) -> ProposalContext:
        """What a proposer sees of the program: history, noise, head, known contents. Read as plain columns in
        one query (no ORM objects: at thousands of experiments a pass would spend its time building them);
        `seed` defaults to the number of experiments."""
        assert p.head_commit is not None
        cfg = PolicyConfig.from_dict(p.policy or {})
        E, R, D = Experiment, Result, DecisionRecord
        rows = s.execute(
            select(E.id, E.role, E.proposer_kind, E.description, E.status, E.decision, E.replicate_of,
                   E.parent_commit, E.commit_sha, E.content_hash, E.status_reason, E.hw_class, E.set_aside,
                   R.id.label("result_id"), R.val_bpb, R.hw_class.label("result_hw"), R.reason.label("result_reason"),
                   D.id.label("decision_id"), D.reason.label("decision_reason"))
            .outerjoin(R, R.experiment_id == E.id).outerjoin(D, D.experiment_id == E.id)
            .where(E.program_id == p.id).order_by(E.id)).all()
        values: dict[int, float] = {}
        by_commit: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            v = run_value(r.status, r.val_bpb, r.result_hw, r.hw_class, p.hw_class)
            if v is not None:
                values[r.id] = v
            if r.commit_sha:  # a run set aside is its own line's value, but no measurement of its commit (found by review)
                by_commit[r.commit_sha] += [v] if v is not None and not r.set_aside else []
        listed = [r for r in rows if r.role != ExperimentRole.baseline and r.replicate_of is None]
        # the log tail is read only where it is the reason shown (no decision, status or result reason)
        need_tail = [r.id for r in listed if r.decision_id is None and not r.status_reason
                     and r.result_id is not None and not r.result_reason]
        tails = dict(s.execute(select(R.experiment_id, R.log_tail).where(R.experiment_id.in_(need_tail))).all()
                     ) if need_tail else {}
        history: list[HistoryItem] = []
        for r in listed:
            val = values.get(r.id)
            parent = by_commit.get(r.parent_commit or "", [])
            delta = (mean(parent) - val) if (val is not None and parent) else None
            status = r.decision.value if r.decision else r.status.value
            if r.decision_id is not None:
                reason = r.decision_reason
            elif r.status_reason:
                reason = r.status_reason
            elif r.result_id is not None:
                reason = r.result_reason or (tails.get(r.id) or "")[-300:] or None
            else:
                reason = None
            history.append(HistoryItem(r.id, r.role.value, r.proposer_kind, r.description, status, val, delta,
                                       reason))
        head_runs = by_commit.get(p.head_commit, [])
        return ProposalContext(
            program_id=p.id, slug=p.slug, profile=p.profile, instructions=p.instructions,
            head_commit=p.head_commit, head_files=self.lineage.files_at(p.head_commit, list(p.editable_files)),
            editable=list(p.editable_files), history=history,
            sigma=noise_sigma([g for g in by_commit.values() if g], prior=cfg.prior_sigma, floor=cfg.min_val_bpb,
                              max_spread=cfg.max_jump)[0],
            head_val_bpb=mean(head_runs) if head_runs else None,
            known_hashes=frozenset(r.content_hash for r in rows if r.content_hash),
            seed=len(rows) if seed is None else seed)

    def _collect(self, stats: dict[str, int]) -> None:
        answered: list[tuple[Job, Proposal]] = []
        for fut in [f for f in self.inflight if f.done()]:
            job = self.inflight.pop(fut)
            try:
                proposal = fut.result()
            except Exception as exc:
                self.failures[job.program_id] += 1
                wait = min(300.0, 5.0 * 2 ** min(self.failures[job.program_id], 6))
                self.cooldown[job.program_id] = time.monotonic() + wait
                log.warning("program %d: proposer failed (%s); pausing its proposals %.0fs", job.program_id, exc,
                            wait)
                stats["proposer_errors"] += 1
                self.refusals[job.program_id] = self.refusals[job.program_id] + 1 if isinstance(
                    exc, ProposerRefused) else 0
                if self.refusals[job.program_id] >= REFUSALS_TO_PAUSE:
                    # a bad key or a model the provider lacks: the program stayed active, failing every few minutes
                    # for ever with nothing on its page (found by review); paused with why, resumed once fixed
                    self.refusals[job.program_id] = 0
                    self._to_pause[job.program_id] = (f"the LLM provider refused {REFUSALS_TO_PAUSE} calls in a row "
                                                      f"({exc}); fix the proposer's model or key, then resume it")
                continue
            self.failures[job.program_id] = 0
            self.refusals[job.program_id] = 0
            answered.append((job, proposal))
        answered, self._unstored = self._unstored + answered, []
        if not answered:
            return
        # One transaction for the pass's answers (64 workers bring dozens a pass) and one INSERT for them all.
        # If that fails for anything but the database being away, they are stored again one by one, a
        # savepoint each, so a proposal that cannot be stored is logged and skipped, never taking the others
        # with it. When the database itself is away, the whole batch is kept and stored by a later pass
        # (answers cost LLM money).
        try:
            try:
                self._store_batch(answered, stats)
            except (OperationalError, InterfaceError):
                raise
            except Exception as exc:  # noqa: BLE001 - retried one by one below, each failure logged there
                log.warning("storing %d proposals at once failed (%s); storing them one by one", len(answered),
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                self._store_each(answered, stats)
        except (OperationalError, InterfaceError):
            self._unstored = answered
            raise

    def _store_batch(self, answered: list[tuple[Job, Proposal]], stats: dict[str, int]) -> None:
        stored: list[Experiment] = []
        with session_scope(self.engine) as s:
            digests: dict[int, list[str | None]] = defaultdict(list)
            for job, proposal in answered:
                digests[job.program_id].append(proposal.checked.digest if proposal.checked else None)
            known = {pid: known_duplicates(s, pid, ds) for pid, ds in digests.items()}
            links: list[dict[str, int]] = []
            for job, proposal in answered:
                exp = self._record_in(s, job, proposal, known=known[job.program_id])
                if exp is not None:
                    stored.append(exp)
                    links += [{"call": cid, "exp": id(exp)} for cid in proposal.llm_call_ids]
            s.flush()  # every row in one INSERT
            ids = {id(e): e.id for e in stored}
            if links:
                s.execute(update(LLMCall), [{"id": link["call"], "experiment_id": ids[link["exp"]]} for link in links])
        for exp in stored:
            self._count(exp, stats)

    def _store_each(self, answered: list[tuple[Job, Proposal]], stats: dict[str, int]) -> None:
        with session_scope(self.engine) as s:
            for job, proposal in answered:
                try:
                    with s.begin_nested():
                        self._record_one(s, job, proposal, stats)
                except (OperationalError, InterfaceError):
                    raise
                except Exception:
                    log.exception("program %d: could not store a proposal", job.program_id)
                    stats["record_errors"] += 1

    def _record(self, job: Job, proposal: Proposal, stats: dict[str, int]) -> int:
        with session_scope(self.engine) as s:
            return self._record_one(s, job, proposal, stats)

    def _record_one(self, s: Session, job: Job, proposal: Proposal, stats: dict[str, int]) -> int:
        """Store one answer now (its own savepoint inside record_proposal), link its LLM calls, count it."""
        exp = self._record_in(s, job, proposal)
        if exp is None:
            return 0
        if proposal.llm_call_ids:
            s.execute(update(LLMCall).where(LLMCall.id.in_(proposal.llm_call_ids)).values(experiment_id=exp.id))
        self._count(exp, stats)
        return exp.id

    def _count(self, exp: Experiment, stats: dict[str, int]) -> None:
        stats["invalid" if exp.status == S.invalid else "proposed"] += 1
        if exp.status == S.invalid:
            log.info("program %d: proposal #%d invalid: %s", exp.program_id, exp.id, exp.status_reason)

    def _record_in(self, s: Session, job: Job, proposal: Proposal, *,
                   known: dict[str, int | None] | None = None) -> Experiment | None:
        """The answer's Experiment row: flushed at once, or (`known` given: part of a batch) only added."""
        program = s.get(Program, job.program_id)
        if program is None:
            return None
        ctx = job.ctx
        base, edit, parent = ctx.head_files, proposal.edit, ctx.head_commit
        if job.repair_of is not None:
            # the repair edits the crashed files; store it as a change of the crashed one's parent
            crashed = s.get(Experiment, job.repair_of)
            assert crashed is not None
            parent = crashed.parent_commit
            try:
                fixed: dict[str, str] | None = apply_edit(ctx.head_files, edit, default_file=ctx.editable[0])
            except Exception:  # noqa: BLE001 - an EditError, or a parser bug that must not lose the answer:
                fixed = None  # record_proposal against the crashed files gives the reason (check_edit catches both)
            if fixed is not None and any(fixed.get(n) != ctx.head_files.get(n)
                                         for n in set(fixed) | set(ctx.head_files) if n not in ctx.editable):
                fixed = None  # it edits the harness too: refused as a proposal is, not stored without that part
            if fixed is not None:
                base = self.lineage.files_at(parent, ctx.editable)
                edit = Edit(files={n: fixed[n] for n in ctx.editable if n in fixed})
        return record_proposal(s, program, parent_commit=parent, base_files=base, edit=edit,
                               proposer_kind="repair" if job.repair_of else self._kind(program),
                               description=proposal.description, rationale=proposal.rationale,
                               repair_of=job.repair_of, checked=proposal.checked, known=known,
                               batch=known is not None, defect=proposal.defect)

    def _kind(self, program: Program) -> str:
        conf = program.proposer or {}
        return str(conf.get("kind") or ("llm" if (conf.get("model") or self.settings.llm_model) else "mutation"))

    # ------------------------------------------------------------------ decisions
    def _load(self, s: Session, program: Program, *where: ColumnElement[bool]) -> ProgramView:
        """The program's experiments (those matching `where`, else all) and their results."""
        # the file texts, diffs and log tails are most of a program's bytes and few decisions read
        # them: load them on access only
        exps = list(s.execute(select(Experiment).where(Experiment.program_id == program.id, *where)
                              .options(defer(Experiment.files), defer(Experiment.diff))
                              .order_by(Experiment.id)).scalars())
        results = {r.experiment_id: r for r in s.execute(
            select(Result).join(Experiment).where(Experiment.program_id == program.id, *where)
            .options(defer(Result.log_tail))).scalars()}
        return ProgramView(program, exps, results)

    @staticmethod
    def _judgeable() -> ColumnElement[bool]:
        """The runs waiting for a verdict (a baseline measures the head, a confirmation is decided with its run)."""
        E = Experiment
        return and_(E.status == S.succeeded, E.decision.is_(None), E.role != ExperimentRole.baseline,
                    E.replicate_of.is_(None))

    @classmethod
    def _decision_rows(cls, s: Session, pid: int) -> ColumnElement[bool] | None:
        """The experiments judging needs, not the whole program (None: no run to judge): the runs to judge; every
        run of their commits (confirmations, and the seeds taken) and of their parents' commits (the comparison,
        and whether the parent is still running); rows not committed yet that are still to run (a parent without a
        commit). The noise estimate pools the whole history: `_pooled_groups` reads it when a verdict needs it."""
        E = Experiment
        todo = s.execute(select(E.id, E.commit_sha, E.parent_commit).where(E.program_id == pid, cls._judgeable())
                         ).all()
        if not todo:
            return None
        uncommitted = select(E.id).where(E.program_id == pid, E.status.in_(OUTSTANDING), E.commit_sha.is_(None))
        if len(todo) > DECISION_LIST_MAX:  # a backlog (a scheduler long down): the same rows, found by subqueries
            mine = and_(E.program_id == pid, cls._judgeable())
            ids: Any = select(E.id).where(mine)
            commits: Any = union(select(E.commit_sha).where(mine), select(E.parent_commit).where(mine))
        else:
            ids = [t.id for t in todo]
            commits = sorted({c for t in todo for c in (t.commit_sha, t.parent_commit) if c is not None})
        # a union of id lists, each read through its own index: as one OR, SQLite walks the whole program
        # (70 ms at 100k experiments, 0.4 ms so)
        return E.id.in_(union(select(E.id).where(E.id.in_(ids)), select(E.id).where(E.replicate_of.in_(ids)),
                              select(E.id).where(E.commit_sha.in_(commits)), uncommitted))

    @staticmethod
    def _pooled_groups(s: Session, p: Program) -> list[list[float]]:
        """The runs of every commit run more than once (the groups noise_sigma pools), as plain columns, in the order
        a load of the whole program gives them (commits by their first experiment, runs by id): the sum is the same
        to the last bit."""
        E, R = Experiment, Result
        shared = (select(E.commit_sha).where(E.program_id == p.id, E.commit_sha.is_not(None))
                  .group_by(E.commit_sha).having(func.count() >= 2).scalar_subquery())
        groups: dict[str, list[float]] = {}
        for sha, status, hw, val, result_hw, aside in s.execute(  # their rows through the commit index (230 -> 100 ms)
                select(E.commit_sha, E.status, E.hw_class, R.val_bpb, R.hw_class, E.set_aside)
                .outerjoin(R, R.experiment_id == E.id)
                .where(E.id.in_(select(E.id).where(E.commit_sha.in_(shared))), E.program_id == p.id)
                .order_by(E.id)):
            v = None if aside else run_value(status, val, result_hw, hw, p.hw_class)
            group = groups.setdefault(sha or "", [])  # never None here: selected by commit
            if v is not None:
                group.append(v)
        return [g for g in groups.values() if g]

    def _decide(self, stats: dict[str, int]) -> None:
        # Only programs with work here: a run to judge, or (an active LLM program) crashes to look at for repairs.
        # A stopped program's history is not read, nor the decided part of an active one's.
        with session_scope(self.engine) as s:
            programs = [(p.id, self._kind(p) == "llm" and p.status == ProgramStatus.active) for p in s.execute(
                select(Program).where(Program.root_commit.is_not(None)).order_by(Program.id)).scalars()]
        for pid, repairs in programs:
            # Every pending verdict of the program in one transaction, against one load of it; a keep
            # ends the transaction (committed before its git write) and the rest is judged again
            # against the new head. Git notes go to a background thread, off the pass.
            while True:
                steps: list[Callable[[], None]] = []
                with session_scope(self.engine) as s:
                    rows = self._decision_rows(s, pid)
                    if rows is None and not repairs:
                        break
                    program = s.get(Program, pid)
                    assert program is not None
                    view = ProgramView(program, [], {}) if rows is None else self._load(s, program, rows)
                    view.pooled = partial(self._pooled_groups, s, program)
                    head_moved = self._decisions(s, view, stats, steps)
                for step in steps:
                    step()
                if not head_moved:
                    break

    def _decisions(self, s: Session, view: ProgramView, stats: dict[str, int],
                   steps: list[Callable[[], None]]) -> bool:
        """Make the pending decisions of one program in this transaction, collecting the git steps to
        run after commit; stops early and returns True when a keep moved the head."""
        p = view.program
        head = p.head_commit
        cfg = PolicyConfig.from_dict(p.policy or {})
        # every row a decision may be written to, locked (and re-read) in one statement instead of one each
        undecided = [e.id for e in view.exps if e.status == S.succeeded and e.decision is None
                     and e.role != ExperimentRole.baseline]
        if undecided:
            view.locked = {e.id for e in states.locked_many(s, undecided)}
        for e in view.exps:
            if e.status != S.succeeded or e.decision is not None or e.replicate_of is not None:
                continue
            if e.role == ExperimentRole.baseline:
                continue  # a measurement of the head, not a verdict: no decision
            step = self._judge(s, view, e, cfg, stats)
            if step is not None:
                steps.append(step)
            if p.head_commit != head:
                return True
        if self._kind(p) == "llm" and p.status == ProgramStatus.active:
            self._repairs(s, view.program, cfg, stats)
        return False

    @staticmethod
    def _noop() -> None:
        return None

    def _judge(self, s: Session, view: ProgramView, e: Experiment, cfg: PolicyConfig,
               stats: dict[str, int]) -> Callable[[], None] | None:
        p = view.program
        # a confirmation its program's stop cancelled never ran: no evidence, and no count against the limit
        reps = [r for r in view.exps if r.replicate_of == e.id and r.status != S.cancelled]
        if any(r.status in OUTSTANDING for r in reps):
            return None  # confirmation still running
        own = view.value(e)
        if own is None:  # another hardware class: never compared
            self._write_decision(s, view, e, Decision.discard, cfg.kind,
                                 "result from another hardware class than the program's", {})
            return self._noop
        runs = [own] + [v for v in (view.value(r) for r in reps) if v is not None]
        if view.pending_runs_of(e.parent_commit):
            # the parent's runs are not all in yet (its second baseline, say): judged on the first alone, the verdict
            # hung on which worker finished first, against a parent mean later candidates do not see (found by review)
            return None
        parent_runs = view.runs_of(e.parent_commit)
        if not parent_runs:
            self._write_decision(s, view, e, Decision.discard, cfg.kind,
                                 "the parent has no successful run to compare with", {"runs": runs})
            return self._noop
        agreed = parent_consensus(cfg, parent_runs)
        if agreed is None:  # the parent's runs disagree, none outvoted: one of them is broken, which is unknown
            if self._remeasure(s, view, e.parent_commit, cfg):
                return self._noop  # judged when the parent's new run is in
            agreed = [statistics.median(parent_runs)]  # re-measured as often as allowed: the middle of its runs
        parent_aside = list(parent_runs)
        for r in agreed:
            if r in parent_aside:
                parent_aside.remove(r)
        prior = self._prior_deltas(s, p.id, e.id) if e.proposer_kind == "replay" else []  # only replays have
        verdict = judge(cfg, runs, agreed, view.sigma(cfg), prior)
        if parent_aside:
            verdict = replace(verdict, stats={**verdict.stats, "parent_set_aside": parent_aside})
        if verdict.stats.get("set_aside"):  # which rows those values are: the decision marks them
            left = list(verdict.stats["set_aside"])
            aside = []
            for x in [e, *reps]:
                v = view.value(x)
                if v is not None and v in left:
                    left.remove(v)
                    aside.append(x.id)
            verdict = replace(verdict, stats={**verdict.stats, "set_aside_ids": aside})
        head_moved = p.head_commit != e.parent_commit
        replay = head_moved and (verdict.action == "keep" or (
            verdict.action == "confirm" and not verdict.stats["sanity"] and e.role == ExperimentRole.candidate))
        confirm = verdict.action == "confirm" and not replay and len(reps) < 1 + cfg.confirm_runs + 1
        if (replay or confirm) and p.status == ProgramStatus.stopped:
            # nothing of a stopped program runs again: a confirmation or a replay would wait (cancelled) for ever and
            # hold the verdict; the run stays undecided, as unconfirmed as it is (found by review)
            return None
        if verdict.action == "confirm":
            if head_moved and not verdict.stats["sanity"] and e.role == ExperimentRole.candidate:
                return self._replay(s, view, e, verdict, stats)
            if len(reps) >= 1 + cfg.confirm_runs + 1:  # never more than the policy can ask for
                verdict = replace(verdict, action="discard", reason=verdict.reason + " (confirmation limit)")
            else:
                self._confirm(s, view, e, reps)
                stats["confirmations"] += 1
                return self._noop
        if verdict.action == "keep":
            if head_moved:
                return self._replay(s, view, e, verdict, stats)
            return self._keep(s, view, e, reps, verdict, stats)
        self._write_decision(s, view, e, Decision.discard, cfg.kind, verdict.reason, verdict.stats, reps)
        stats["discards"] += 1
        return self._note_step(e, "discard", verdict)

    def _remeasure(self, s: Session, view: ProgramView, commit: str, cfg: PolicyConfig) -> bool:
        """One more run of a parent commit whose runs disagree (parent_consensus), as a confirmation of its first
        run, so that a program out of new work still runs it. True: queued, or one is queued already; False: the
        parent has had PARENT_REMEASURES more runs than it started with and still no majority."""
        mine = [x for x in view.exps if x.commit_sha == commit and x.status != S.cancelled]
        if any(x.status in OUTSTANDING for x in mine) or commit in view.remeasured:
            return True
        first = min(mine, key=lambda x: x.id)
        if len([x for x in mine if x.role == ExperimentRole.confirmation and x.replicate_of == first.id
                and x.description.startswith("re-measure")]) >= PARENT_REMEASURES:
            return False
        seed = max(x.seed for x in mine) + 1
        s.add(Experiment(program_id=first.program_id, role=ExperimentRole.confirmation, parent_commit=first.parent_commit,
                         commit_sha=commit, files=dict(first.files), diff=first.diff, content_hash=first.content_hash,
                         proposer_kind=first.proposer_kind, seed=seed, replicate_of=first.id, hw_class=first.hw_class,
                         description=f"re-measure of #{first.id}: its commit's runs disagree"[:2000], status=S.proposed))
        s.flush()
        view.remeasured.add(commit)
        log.info("program %s: the runs of %s disagree; one more run of it", view.program.slug, commit[:12])
        return True

    def _prior_deltas(self, s: Session, program_id: int, exp_id: int) -> list[float]:
        for d in s.execute(select(DecisionRecord).where(DecisionRecord.program_id == program_id)).scalars():
            replay = (d.statistics or {}).get("replay") or {}
            if replay.get("experiment_id") == exp_id:
                return [float(x) for x in replay.get("deltas", [])]
        return []

    def _confirm(self, s: Session, view: ProgramView, e: Experiment, reps: list[Experiment]) -> None:
        used = {x.seed for x in view.exps if x.commit_sha == e.commit_sha}
        seed = max(used | {0}) + 1
        s.add(Experiment(program_id=e.program_id, role=ExperimentRole.confirmation, parent_commit=e.parent_commit,
                         commit_sha=e.commit_sha, files=dict(e.files), diff=e.diff, content_hash=e.content_hash,
                         proposer_kind=e.proposer_kind, description=f"confirmation of #{e.id}: {e.description}"[:2000],
                         rationale=e.rationale, seed=seed, replicate_of=e.id, hw_class=e.hw_class,
                         status=S.proposed))
        s.flush()

    def _keep(self, s: Session, view: ProgramView, e: Experiment, reps: list[Experiment], verdict: Verdict,
              stats: dict[str, int]) -> Callable[[], None]:
        p = s.execute(select(Program).where(Program.id == view.program.id).with_for_update()
                      .execution_options(populate_existing=True)).scalar_one()
        if p.head_commit != e.parent_commit or e.commit_sha is None:
            return self._noop  # the head moved under us: judged again next pass
        before = p.head_commit
        self._write_decision(s, view, e, Decision.keep, verdict.stats["policy"], verdict.reason, verdict.stats,
                             reps, head_before=before, head_after=e.commit_sha)
        p.head_commit = e.commit_sha
        p.head_experiment_id = e.id
        stats["keeps"] += 1
        slug, new = p.slug, e.commit_sha
        log.info("program %s: keep #%d (%s), head %s -> %s", slug, e.id, verdict.reason, before[:12], new[:12])
        note = self._note_step(e, "keep", verdict)

        def after_commit() -> None:
            self._move_branch(slug, new)
            note()

        return after_commit

    def _move_branch(self, slug: str, new: str) -> None:
        """The git half of a keep, after the database commit (a crash here is repaired by _sync_branches). A branch
        that cannot be moved (someone committed on it) is said and left: the database holds the head; raised, it
        ended the pass there, the keep's note and the later programs' decisions with it (found by review)."""
        try:
            self.lineage.sync_branch(slug, new)
        except LineageError as exc:
            log.error("program %s: the branch stays where it is: %s", slug, exc)

    @staticmethod
    def _note_text(experiment_id: int, decision: str, st: dict[str, Any]) -> str:
        """A decision's git note, from the numbers the policy used (the decisions table keeps them too)."""
        return "\n".join([f"Val-Bpb: {st.get('mean', 0):.6f}", f"Runs: {' '.join(f'{x:.6f}' for x in st.get('runs', []))}",
                          f"Parent-Val-Bpb: {st.get('parent_mean', 0):.6f}", f"Sigma: {st.get('sigma', 0):.6f}",
                          f"Margin: {st.get('margin', 0):.6f}", f"Decision: {decision}",
                          f"Experiment: {experiment_id}"])

    def _repair_notes(self) -> None:
        """Notes are written after the database commit, off the pass: a scheduler stopped with notes still to write
        lost them for good (found by review). At start, every decided commit without a note gets it, from the
        decisions table."""
        try:
            noted = self.lineage.noted_commits()
        except LineageError as exc:
            log.warning("could not list the git notes: %s", exc)
            return
        D, E = DecisionRecord, Experiment
        with session_scope(self.engine) as s:
            # one note per commit, the judged run's (a confirmation shares its commit and has a record of its own)
            decided = s.execute(select(D.id, E.commit_sha).join(E, E.id == D.experiment_id)
                                .where(E.commit_sha.is_not(None), E.replicate_of.is_(None))).all()
            missing = [rid for rid, sha in decided if sha not in noted]
            # the statistics (the heavy column) of those only
            todo = [(eid, str(sha), d.value, dict(st or {})) for eid, sha, d, st in s.execute(
                select(D.experiment_id, E.commit_sha, D.decision, D.statistics).join(E, E.id == D.experiment_id)
                .where(D.id.in_(missing)))] if missing else []
        for exp_id, sha, decision, st in todo:
            if decision == "discard" and "replay" in st:
                decision = "discard (replayed)"
            try:
                self.lineage.add_note(sha, self._note_text(exp_id, decision, st))
            except LineageError as exc:
                log.warning("could not note %s: %s", sha[:12], exc)
        if todo:
            log.warning("wrote %d git note(s) a stopped scheduler had not written", len(todo))

    def _note_step(self, e: Experiment, decision: str, verdict: Verdict) -> Callable[[], None]:
        sha = e.commit_sha
        text = self._note_text(e.id, decision, verdict.stats)

        def write(sha: str) -> None:
            try:
                self.lineage.add_note(sha, text)
            except LineageError as exc:
                log.warning("could not note %s: %s", sha[:12], exc)

        def note() -> None:  # informational (the database holds the decision): never waited for by a pass
            if sha:
                self._notes = [f for f in self._notes if not f.done()] + [self._note_writer.submit(write, sha)]

        return note

    def flush_notes(self, timeout: float = 60.0) -> None:
        """Wait until the git notes of the decisions made so far are written (tests, shutdown)."""
        pending, self._notes = self._notes, []
        for fut in pending:
            fut.result(timeout=timeout)

    def _replay(self, s: Session, view: ProgramView, e: Experiment, verdict: Verdict,
                stats: dict[str, int]) -> Callable[[], None]:
        p = view.program
        assert p.head_commit is not None and e.commit_sha is not None
        names = list(p.editable_files)
        st = dict(verdict.stats)
        try:
            res = self.lineage.replay(base=e.parent_commit, change=e.commit_sha, onto=p.head_commit, names=names)
        except LineageError as exc:
            res = None
            reason = f"replay onto head {p.head_commit[:12]} failed: {exc}"
        if res is not None and res.conflicts:
            reason = f"head moved to {p.head_commit[:12]}; replaying the change conflicts in {', '.join(res.conflicts)}"
        elif res is not None:
            head = self.lineage.files_at(p.head_commit, names)
            if content_hash({n: res.files[n] for n in names if n in res.files}) == content_hash(head):
                reason = f"head moved to {p.head_commit[:12]}, which already contains this change"
            else:
                new = record_proposal(s, p, parent_commit=p.head_commit, base_files=head,
                                      edit=Edit(files=res.files), proposer_kind="replay",
                                      description=f"replay of #{e.id}: {e.description}",
                                      rationale=e.rationale, role=ExperimentRole.confirmation, remeasures=e.id)
                if new.status == S.invalid:
                    reason = f"replay onto head {p.head_commit[:12]} is invalid: {new.status_reason}"
                else:
                    st["replay"] = {"experiment_id": new.id, "deltas": list(verdict.stats["deltas"])}
                    reason = (f"improved on its parent ({verdict.reason}); head moved to {p.head_commit[:12]}: "
                              f"replayed as #{new.id}")
                    stats["replays"] += 1
        reps = [r for r in view.exps if r.replicate_of == e.id and r.status != S.cancelled]
        self._write_decision(s, view, e, Decision.discard, verdict.stats["policy"], reason, st, reps)
        stats["discards"] += 1
        return self._note_step(e, "discard (replayed)" if "replay" in st else "discard", verdict)

    def _write_decision(self, s: Session, view: ProgramView, e: Experiment, decision: Decision, policy: str,
                        reason: str, stats: dict[str, Any], reps: list[Experiment] | None = None, *,
                        head_before: str | None = None, head_after: str | None = None) -> None:
        hb = head_before if head_before is not None else view.program.head_commit
        ha = head_after if head_after is not None else view.program.head_commit
        aside = set(stats.get("set_aside_ids") or ())
        for x, why in [(e, reason), *((r, f"confirmation of #{e.id}: {reason}") for r in (reps or []))]:
            if x.status != S.succeeded or x.decision is not None:
                continue
            decided = (states.decide_locked(x, decision) if x.id in view.locked
                       else states.set_decision(s, x.id, decision))
            if decided:
                x.set_aside = x.id in aside
                # not flushed one by one: the pass's decisions go out together (autoflush before any read)
                s.add(DecisionRecord(program_id=view.program.id, experiment_id=x.id, decision=decision,
                                     policy=policy, reason=why[:4000], head_before=hb, head_after=ha,
                                     statistics=_jsonable(stats)))

    def _repairs(self, s: Session, p: Program, cfg: PolicyConfig, stats: dict[str, int]) -> None:
        """Ask for repairs of the program's crashes that are worth one. Each pass reads the crashed ids (an index
        range); what a crash offers is read once (`_learn_crashes`), its files only when its repair is asked for."""
        crashed = list(s.execute(select(Experiment.id).where(Experiment.program_id == p.id,
                                                             Experiment.status == S.crashed)
                                 .order_by(Experiment.id)).scalars())
        self._learn_crashes(s, p.id, [i for i in crashed if i not in self._crashes])
        inflight = {j.repair_of for j in self.inflight.values() if j.repair_of is not None}
        for eid in crashed:
            depth, worth = self._crashes.get(eid, (0, False))
            if not worth or eid in inflight or eid in self.repairs_tried or depth >= cfg.max_repairs:
                continue
            e = s.get(Experiment, eid)
            if e is None or not e.files:
                self._crashes[eid] = (depth, False)
                continue
            if time.monotonic() < self.cooldown.get(p.id, 0.0):
                return
            # a program past a stop rule (spend cap, max_experiments, ...) takes no new work: its repair
            # would never be queued, and the call would spend past the cap. Asked only when a repair is due
            if self._exhausted(s, p, db_now(s)) is not None:
                return
            self.repairs_tried.add(e.id)
            r = s.execute(select(Result).where(Result.experiment_id == e.id)).scalar_one_or_none()
            log_tail = (r.log_tail if r else "") or ""
            ctx = self._context(s, p, seed=0)
            ctx = replace(ctx, head_files={n: str(t) for n, t in e.files.items()}, repair_of=e.id,
                          repair_diff=e.diff, repair_log=(r.reason or "") + "\n" + log_tail if r else log_tail)
            self._submit(p, Job(p.id, ctx, repair_of=e.id))
            stats["repairs"] += 1

    def _learn_crashes(self, s: Session, pid: int, fresh: list[int]) -> None:
        """Record what crashes not seen before offer: their repair depth (how many repairs lead to them) and whether
        one is worth a repair (not a baseline, not repaired yet, a log that looks fixable)."""
        if not fresh:
            return
        E, R = Experiment, Result
        # repair_of has no index: this reads the program's rows, only on a pass that meets new crashes
        repaired = set(s.execute(select(E.repair_of).where(E.program_id == pid, E.repair_of.is_not(None))).scalars())
        rows: list[Any] = []
        for i in range(0, len(fresh), 500):  # bounded IN lists (SQLite caps bound parameters)
            rows += s.execute(select(E.id, E.role, E.repair_of, E.status_reason)
                              .where(E.id.in_(fresh[i:i + 500]))).all()
        todo = sorted(r.id for r in rows if r.id not in repaired and r.role != ExperimentRole.baseline)
        tails: dict[int, str] = {}
        for i in range(0, len(todo), 500):
            tails.update((r.experiment_id, r.log_tail) for r in s.execute(
                select(R.experiment_id, R.log_tail).where(R.experiment_id.in_(todo[i:i + 500]))))
        candidates = set(todo)
        # a repair's repair_of is a crash older than it (only crashes are repaired): in id order it is known by
        # then; were it not, the chain is walked in the database
        for r in sorted(rows, key=lambda r: r.id):
            if r.repair_of is None:
                depth = 0
            elif r.repair_of in self._crashes:
                depth = self._crashes[r.repair_of][0] + 1
            else:
                depth = repair_depth(self._chain(s, r.id), r.id)
            self._crashes[r.id] = (depth, r.id in candidates and looks_fixable(tails.get(r.id) or "", r.status_reason))

    @staticmethod
    def _chain(s: Session, experiment_id: int) -> dict[int, int | None]:
        """id -> repair_of along the repairs that lead to an experiment."""
        chain: dict[int, int | None] = {}
        cur: int | None = experiment_id
        while cur is not None and cur not in chain:
            chain[cur] = s.execute(select(Experiment.repair_of).where(Experiment.id == cur)).scalar_one_or_none()
            cur = chain[cur]
        return chain

    def _submit(self, program: Program, job: Job) -> None:
        proposer = self._proposer_for(program)
        if proposer is not None:
            self.inflight[self.pool.submit(self._propose, proposer, job.ctx)] = job

    def _proposer_for(self, program: Program) -> Proposer | None:
        """The program's proposer, or None: one that cannot be made (an LLM without a model) pauses the program with
        the reason, shown on its page. It stayed active, its calls failing every pass with nothing on the dashboard
        but a call count (found by review)."""
        try:
            return self.proposer_factory(program)
        except ProposerError as exc:
            self._to_pause[program.id] = str(exc)  # paused at the end of the pass (callers may hold a transaction)
            return None

    def _pause_unproposable(self) -> None:
        to_pause, self._to_pause = self._to_pause, {}
        for pid, reason in to_pause.items():
            with session_scope(self.engine) as s:
                p = s.execute(select(Program).where(Program.id == pid).with_for_update()
                              .execution_options(populate_existing=True)).scalar_one_or_none()
                if p is not None and p.status == ProgramStatus.active:
                    p.status = ProgramStatus.paused
                    p.status_reason = f"paused by the scheduler: {reason}"
                    log.error("program %s paused: %s", p.slug, reason)

    @staticmethod
    def _propose(proposer: Proposer, ctx: ProposalContext) -> Proposal:
        """In a proposer thread: the answer, and the edit applied and checked against the head files
        (compiling train.py alone is about 9 ms; not in the scheduler's pass). A repair is checked
        against other files when it is stored."""
        proposal = proposer.propose(ctx)
        if ctx.repair_of is None:
            try:
                proposal.checked = check_edit(ctx.head_files, proposal.edit, ctx.editable)
            except Exception:  # noqa: BLE001 - storing it checks again, and reports what is wrong there
                log.exception("program %d: checking a proposal failed", ctx.program_id)
        return proposal

    # ------------------------------------------------------------------ stop rules
    def _exhausted(self, s: Session, p: Program, now: datetime) -> str | None:
        """Why the program should take no new work, or None. A few small queries, never a load of the
        whole program: this runs for every active program on every pass."""
        rules = p.stop_rules or {}
        checks: list[tuple[str, Callable[[], str | None]]] = [
            ("max_experiments", lambda: self._ran_out(s, p, rules)), ("deadline", lambda: _past_deadline(rules, now)),
            ("max_hours", lambda: self._over_time(p, rules, now)), ("max_spend_usd", lambda: self._over_spend(s, p, rules)),
            ("target_val_bpb", lambda: self._on_target(s, p, rules)), ("baselines", lambda: self._no_baseline(s, p))]
        for name, check in checks:
            try:
                reason = check()
            except (ValueError, TypeError, OverflowError) as exc:  # a rule stored before the API checked it
                # one unreadable rule must not fail the pass, which feeds every program's workers (found by review: a
                # deadline that overflowed on conversion failed every pass), nor switch off the program's other
                # rules (its spend cap); said once per program and rule
                if (p.id, name) not in self._bad_rules:
                    self._bad_rules.add((p.id, name))
                    log.warning("program %s: its stop rule %s cannot be read (%s); not applied", p.slug, name, exc)
                continue
            if reason is not None:
                return reason
        return None

    @staticmethod
    def _ran_out(s: Session, p: Program, rules: dict[str, Any]) -> str | None:
        if rules.get("max_experiments") is None:
            return None
        limit = int(rules["max_experiments"])
        ran = s.execute(select(func.count()).select_from(Experiment).where(
            Experiment.program_id == p.id, Experiment.status.not_in(NOT_RUN))).scalar_one()
        return f"reached max_experiments={limit}" if ran >= limit else None

    @staticmethod
    def _over_time(p: Program, rules: dict[str, Any], now: datetime) -> str | None:
        if rules.get("max_hours") is None:
            return None
        hours = float(rules["max_hours"])  # compared in seconds: a timedelta of a huge max_hours overflows
        return f"ran for max_hours={hours:g}" if (now - as_utc(p.created_at)).total_seconds() >= hours * 3600 else None

    @staticmethod
    def _over_spend(s: Session, p: Program, rules: dict[str, Any]) -> str | None:
        cap = rules.get("max_spend_usd", rules.get("max_cost_usd", (p.proposer or {}).get("spend_cap_usd")))
        if cap is None:
            return None
        spent = s.execute(select(func.coalesce(func.sum(LLMCall.cost_usd), 0.0))
                          .where(LLMCall.program_id == p.id)).scalar_one()
        return f"LLM spend {float(spent):.4f} USD reached the cap {float(cap):g} USD" if float(spent) >= float(cap) else None

    def _on_target(self, s: Session, p: Program, rules: dict[str, Any]) -> str | None:
        target = rules.get("target_val_bpb")
        if target is None or p.head_experiment_id is None or not p.head_commit:
            return None
        goal = float(target)
        head_runs = self._load(s, p, Experiment.commit_sha == p.head_commit).runs_of(p.head_commit)
        if head_runs and mean(head_runs) <= goal:
            return f"head val_bpb {mean(head_runs):.6f} reached the target {goal:g}"
        return None

    @staticmethod
    def _no_baseline(s: Session, p: Program) -> str | None:
        baselines = s.execute(select(Experiment.status, Experiment.status_reason).where(
            Experiment.program_id == p.id, Experiment.role == ExperimentRole.baseline)
            .order_by(Experiment.id)).all()
        if baselines and all(st.finished for st, _ in baselines) and not any(
                st == S.succeeded for st, _ in baselines):
            return "every baseline run failed: " + (baselines[-1][1] or baselines[-1][0].value)
        return None

    def _busy(self, s: Session, p: Program) -> bool:
        """Work of the program still under way: runs, confirmations to run, verdicts to make, answers."""
        if any(j.program_id == p.id for j in self.inflight.values()):
            return True
        return bool(s.execute(select(exists().where(Experiment.program_id == p.id, or_(
            Experiment.status.in_(ACTIVE_RUN),
            and_(Experiment.status == S.proposed, Experiment.role == ExperimentRole.confirmation),
            and_(Experiment.status == S.succeeded, Experiment.decision.is_(None),
                 Experiment.role != ExperimentRole.baseline))))).scalar_one())

    def _stop_rules(self, stats: dict[str, int]) -> None:
        with session_scope(self.engine) as s:
            # a stopped program's run that comes back to the queue (its worker handed it back or died) or an answer
            # that arrives after the stop: cancelled like what the stop found (found by review: queued for ever,
            # since no worker claims it and the reconciler does not publish it)
            for pid in s.execute(select(Experiment.program_id).join(Program, Program.id == Experiment.program_id)
                                 .where(Program.status == ProgramStatus.stopped,
                                        Experiment.status.in_([S.proposed, S.queued])).distinct()).scalars():
                stats["cancelled"] += len(states.cancel_unstarted(s, pid, "its program was stopped before it ran"))
            now = db_now(s)
            for p in s.execute(select(Program).where(Program.status == ProgramStatus.active,
                                                     Program.root_commit.is_not(None))).scalars():
                reason = self._exhausted(s, p, now)
                if reason is None or self._busy(s, p):
                    continue
                p.status = ProgramStatus.finished
                p.status_reason = reason
                # a candidate still proposed (a person's, past max_experiments) would have shown as queued forever
                stats["cancelled"] += len(states.cancel_unstarted(
                    s, p.id, f"its program finished before it ran ({reason})", statuses=(S.proposed,)))
                stats["finished"] += 1
                log.info("program %s finished: %s", p.slug, reason)

    # ------------------------------------------------------------------ feeding workers
    def _live_workers(self, s: Session) -> dict[str, int]:
        """Job slots of the live workers per hardware class (a two-slot worker holds the next job too)."""
        now, own = db_now(s), self.settings.heartbeat_interval
        live: dict[str, int] = {}
        for hw, slots, beat, every in s.execute(
                select(Worker.hw_class, Worker.slots, Worker.last_heartbeat, Worker.heartbeat_interval)
                .where(Worker.stopped_at.is_(None))):  # a row per worker: its own interval decides
            if as_utc(beat) >= now - timedelta(seconds=states.stale_after(own, every)):
                live[hw] = live.get(hw, 0) + int(slots)
        return live

    def _fill(self, stats: dict[str, int]) -> None:
        self._pass_ctx = {}
        self._pass_pending = {}
        self._pass_room = {}
        self._pass_batch = []
        try:
            self._fill_classes(stats)
        finally:  # what this pass picked is queued even if a later program failed
            batch, self._pass_batch = self._pass_batch, []
            self._queue_many(batch, stats)

    def _fill_classes(self, stats: dict[str, int]) -> None:
        with session_scope(self.engine) as s:
            live = self._live_workers(s)
            programs = list(s.execute(select(Program).where(Program.status == ProgramStatus.active,
                                                            Program.root_commit.is_not(None))
                                      .order_by(Program.id)).scalars())
            # a paused program's queued runs wait without a worker: they take none of the class's capacity
            busy_rows = s.execute(select(Experiment.hw_class, func.count())
                                  .join(Program, Program.id == Experiment.program_id)
                                  .where(or_(Experiment.status == S.running,
                                             and_(Experiment.status == S.queued,
                                                  Program.status.not_in(states.HELD_PROGRAMS))))
                                  .group_by(Experiment.hw_class)).all()
        busy: dict[str, int] = {hw: int(n) for hw, n in busy_rows}
        by_class: dict[str, list[Program]] = defaultdict(list)
        for p in programs:
            by_class[p.hw_class].append(p)
        for hw, progs in by_class.items():
            capacity = live.get(hw, 0) + self.settings.lookahead
            inflight_hw = sum(1 for j in self.inflight.values() if any(p.id == j.program_id for p in progs))
            load = {p.id: 0 for p in progs}
            with session_scope(self.engine) as s:
                for pid, n in s.execute(select(Experiment.program_id, func.count())
                                        .where(Experiment.status.in_(ACTIVE_RUN),
                                               Experiment.program_id.in_(list(load)))
                                        .group_by(Experiment.program_id)).all():
                    load[pid] = int(n)
            for j in self.inflight.values():
                if j.program_id in load:
                    load[j.program_id] += 1
            total = busy.get(hw, 0) + inflight_hw
            blocked: set[int] = set()
            weights = {p.id: max(float(p.weight), 1e-9) for p in progs}
            # the program's own bound (proposer.max_in_flight) on its load: runs queued or running and
            # proposer calls in flight, confirmations included (they are runs too)
            limits = {p.id: int(lim) for p in progs if (lim := (p.proposer or {}).get("max_in_flight")) is not None}
            while total < capacity:
                open_ = [p for p in progs if p.id not in blocked]
                if not open_:
                    break
                p = min(open_, key=lambda q: ((load[q.id] + 1) / weights[q.id], q.id))
                if p.id in limits and load[p.id] >= limits[p.id]:
                    blocked.add(p.id)
                elif self._feed_one(p, stats):
                    load[p.id] += 1
                    total += 1
                else:
                    blocked.add(p.id)

    def _room(self, s: Session, p: Program) -> int | None:
        """How many more runs max_experiments allows (None: no cap): the runs in the database, less the
        proposer calls in flight (each answer is a run to come; a call whose answer cannot run is spend
        for nothing)."""
        cap = (p.stop_rules or {}).get("max_experiments")
        if cap is None:
            return None
        ran = s.execute(select(func.count()).select_from(Experiment).where(
            Experiment.program_id == p.id, Experiment.status.not_in(NOT_RUN))).scalar_one()
        return int(cap) - int(ran) - sum(1 for j in self.inflight.values() if j.program_id == p.id)

    def _take_room(self, pid: int, role: ExperimentRole | None) -> bool:
        """Count one more run (role None: a proposer call) against this pass's room; False at the cap.
        The rows picked in a pass stay `proposed` until its end, so the database count alone let one pass
        queue past max_experiments. Confirmations are never refused: they complete a decision."""
        if role == ExperimentRole.confirmation or pid not in self._pass_room:
            return True
        if self._pass_room[pid] <= 0:
            return False
        self._pass_room[pid] -= 1
        return True

    def _next_pending(self, pid: int) -> int | None:
        """The next pending row of this pass the cap allows (skipping those it does not), or None."""
        queue_next = self._pass_pending.get(pid) or []
        while queue_next:
            exp_id, role = queue_next.pop(0)
            if self._take_room(pid, role):
                return exp_id
        return None

    def _feed_one(self, program: Program, stats: dict[str, int]) -> bool:
        """Queue (or start proposing) one more experiment for this program; False if it has nothing."""
        pick = self._next_pending(program.id)
        if pick is not None:  # pending rows found earlier in this pass: queued with the pass's batch
            self._pass_batch.append(pick)
            return True
        cached = self._pass_ctx.get(program.id)
        if cached is not None:
            if not self._take_room(program.id, None):
                return False
            # this pass already found nothing pending here and sent the proposer this context: more
            # slots of the same pass get the same context (another seed) without reloading the
            # program and reading git again (64 free workers cost 64 full reloads before)
            ctx2 = replace(cached, seed=cached.seed + 1)
            self._pass_ctx[program.id] = ctx2
            proposer = self._proposer_for(program)
            if proposer is None:
                return False
            self.inflight[self.pool.submit(self._propose, proposer, ctx2)] = Job(program.id, ctx2)
            stats["llm_calls_started"] += 1
            return True
        with session_scope(self.engine) as s:
            p = s.get(Program, program.id)
            if p is None or p.status != ProgramStatus.active:
                return False
            # small queries, not a load of the program: this runs every pass for every program
            if not s.scalar(select(exists().where(Experiment.program_id == p.id,
                                                  Experiment.role == ExperimentRole.baseline))):
                self._create_baselines(s, p, PolicyConfig.from_dict(p.policy or {}).baseline_runs)
            exhausted = self._exhausted(s, p, db_now(s))
            if p.id not in self._pass_room:  # once a pass: rows picked in it are still `proposed` here
                room = self._room(s, p)
                if room is not None:
                    self._pass_room[p.id] = room
            picked = set(self._pass_batch)  # picked earlier in this pass, not queued yet
            proposed = s.execute(select(Experiment.id, Experiment.role).where(Experiment.program_id == p.id,
                                                                             Experiment.status == S.proposed)).all()
            pending = sorted(((i, role) for i, role in proposed if i not in picked),
                             key=lambda x: (0 if x[1] == ExperimentRole.baseline else
                                            1 if x[1] == ExperimentRole.confirmation else 2, x[0]))
            if exhausted:  # no new work; confirmations still run so that decisions complete
                pending = [x for x in pending if x[1] == ExperimentRole.confirmation]
            self._pass_pending[p.id] = list(pending)
            pick = self._next_pending(p.id)
            ctx: ProposalContext | None = None
            # a manual program proposes nothing (people submit its candidates): no context, no proposer
            if (pick is None and not exhausted and self._kind(p) != "manual"
                    and time.monotonic() >= self.cooldown.get(p.id, 0.0) and p.id not in self._to_pause
                    and self._take_room(p.id, None)):
                ctx = self._context(s, p)
        if pick is not None:
            self._pass_batch.append(pick)
            return True
        if ctx is None:
            return False
        proposer = self._proposer_for(program)
        if proposer is None:
            return False
        if proposer.inline:
            try:
                proposal = proposer.propose(ctx)
            except ProposerError as exc:
                log.warning("program %s: %s", program.slug, exc)
                self.cooldown[program.id] = time.monotonic() + 30.0
                return False
            exp_id = self._record(Job(program.id, ctx), proposal, stats)
            with session_scope(self.engine) as s:
                e = s.get(Experiment, exp_id)
                valid = e is not None and e.status == S.proposed
            return self._queue(exp_id, stats) if valid else True
        self.inflight[self.pool.submit(self._propose, proposer, ctx)] = Job(program.id, ctx)
        self._pass_ctx[program.id] = ctx
        stats["llm_calls_started"] += 1
        return True

    def _create_baselines(self, s: Session, p: Program, runs: int) -> None:
        locked = s.execute(select(Program).where(Program.id == p.id).with_for_update()
                           .execution_options(populate_existing=True)).scalar_one()
        exists = s.execute(select(func.count()).select_from(Experiment).where(
            Experiment.program_id == p.id, Experiment.role == ExperimentRole.baseline)).scalar_one()
        if exists or locked.root_commit is None:
            return
        head = locked.head_commit or locked.root_commit
        files = self.lineage.files_at(head, list(p.editable_files))
        for i in range(max(1, runs)):
            s.add(Experiment(program_id=p.id, role=ExperimentRole.baseline, parent_commit=head, commit_sha=head,
                             files=files, diff="", content_hash=content_hash(files), proposer_kind="baseline",
                             description="baseline" if i == 0 else f"baseline (seed {i})", seed=i,
                             hw_class=p.hw_class, status=S.proposed))
        s.flush()

    def _queue(self, exp_id: int, stats: dict[str, int]) -> bool:
        """git commit (idempotent by ref) -> queued (committed) -> published; False if not proposed."""
        return self._queue_many([exp_id], stats) > 0

    def _queue_many(self, exp_ids: list[int], stats: dict[str, int]) -> int:
        """_queue for many experiments in one transaction (a pass queues dozens at 64 workers: one
        round trip for all their rows instead of several each). Returns how many were handled: queued,
        or found invalid (no git parent); rows no longer `proposed` are skipped."""
        if not exp_ids:
            return 0
        to_publish = []
        with session_scope(self.engine) as s:
            programs: dict[int, Program] = {}
            rows = [e for e in states.locked_many(s, exp_ids) if e.status == S.proposed]
            for e in rows:
                p = programs.get(e.program_id) or s.get(Program, e.program_id)
                assert p is not None and p.root_commit is not None
                programs[p.id] = p
                if not e.parent_commit:
                    e.parent_commit = p.root_commit  # proposed before the branch existed: against the template
            uncommitted = [e for e in rows if e.commit_sha is None]
            made = self.lineage.commit_candidates([
                (programs[e.program_id].slug, e.id, dict(e.files), e.parent_commit,
                 format_message(e.description, rationale=e.rationale, trailers={
                     "Farm-Program": programs[e.program_id].slug, "Farm-Experiment": str(e.id),
                     "Farm-Proposer": e.proposer_kind, "Farm-Role": e.role.value}))
                for e in uncommitted])
            self._since_gc += sum(1 for sha in made if isinstance(sha, str))
            if self._since_gc >= GC_EVERY:  # in the notes' thread: off the pass, never beside a note write
                self._since_gc = 0
                self._notes.append(self._note_writer.submit(self.lineage.maintain))
            for e, sha in zip(uncommitted, made, strict=True):
                if isinstance(sha, LineageUnavailable):  # a moment's trouble (found by review: stored invalid for
                    # good when the repository was away for one pass): proposed still, committed on a later pass
                    log.warning("experiment %d: not committed this pass: %s", e.id, sha)
                    stats["commit_retries"] += 1
                elif isinstance(sha, LineageError):
                    states.move(e, S.invalid, expect={S.proposed}, status_reason=str(sha), finished_at=utcnow())
                    stats["invalid"] += 1
                else:
                    e.commit_sha = sha
            for e in rows:
                if e.commit_sha is None:
                    continue
                if states.move(e, S.queued, expect={S.proposed}, queued_at=utcnow()):
                    to_publish.append((e.id, e.hw_class,
                                       job_time_limit(programs[e.program_id].time_budget, self.settings)))
        handled = len(rows)
        for exp_id, hw, limit in to_publish:  # after commit: a worker must find the row queued
            self._publish(exp_id, hw, limit)
            stats["queued"] += 1
        return handled

    def _publish(self, exp_id: int, hw: str, time_limit: float | None = None) -> None:
        try:
            self.publish(exp_id, hw, time_limit=time_limit)
        except Exception:  # the row is queued: the broker reconciler re-publishes it
            log.exception("could not publish experiment %d", exp_id)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    import json

    return dict(json.loads(json.dumps(d, default=str)))
