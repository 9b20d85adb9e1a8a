"""Judge a finished run: succeeded, crashed, timed_out or refused, with a reason and the metrics.

Pure functions over what the runner collected (exit code, why the worker killed it, the tail of
the output, the result file, the harness checksums), so every rule is unit-tested without a run.

Trust rules: the signed JSON is the result; the printed `---` summary must agree with it; a summary
with no valid signed JSON is a forgery; a harness that changed during the run voids everything.
"""

from __future__ import annotations

import json
import math
import re
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from farm.harness import digest_ok
from farm.models import ExperimentStatus

S = ExperimentStatus

# result JSON key -> Result column
METRIC_FIELDS = {
    "val_bpb": "val_bpb", "test_bpb": "test_bpb", "training_seconds": "training_seconds",
    "total_seconds": "total_seconds", "startup_seconds": "startup_seconds", "eval_seconds": "eval_seconds",
    "peak_vram_mb": "peak_vram_mb", "mfu_percent": "mfu_percent", "total_tokens_m": "total_tokens_m",
    "num_steps": "num_steps", "num_params_m": "num_params_m", "depth": "depth",
}
INT_FIELDS = {"num_steps", "depth"}
TAIL_LINES = 50

# the template's exit codes (training_template/prepare.py)
EXIT_REASONS = {2: "bad environment", 3: "training failed (NaN or exploding loss)", 4: "data unavailable",
                5: "model rejected by the harness"}
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)|KeyboardInterrupt)\b(:.*)?$")
_OOM = re.compile(r"MemoryError|out of memory|OutOfMemoryError|Cannot allocate memory|std::bad_alloc",
                  re.IGNORECASE)
_SUMMARY_LINE = re.compile(r"^([A-Za-z_]+):\s+(\S+)\s*$")
# The settings the harness records as it found them in its environment (training_template/prepare.py RUN_ENV_KEYS):
# a candidate can rewrite os.environ before `import prepare`, so each must be what the worker set.
RUN_ENV_KEYS = ("FARM_PROFILE", "FARM_TIME_BUDGET", "FARM_MAX_STEPS", "FARM_SEED", "FARM_CORPUS",
                "FARM_EVAL_TOKENS", "FARM_DATA_DIR", "FARM_CACHE_DIR", "FARM_EVAL_EXPORT", "FARM_CORPUS_ID")
# what the isolated evaluation's signed result contributes to the run's result (the rest is the training's)
EVAL_KEYS = ("val_bpb", "test_bpb", "eval_tokens", "eval_seconds", "causal_probe_nats", "eval_peak_vram_mb",
             "evaluation")
# The clock stops after the step that crosses the budget, so honest training ends within one step of it (well
# under a second at the h100 profile); more than this is a candidate that does not follow the clock.
BUDGET_SLACK_SECONDS = 3.0
BUDGET_SLACK_FRACTION = 0.05


@dataclass
class EvalFacts:
    """The isolated evaluation's process (worker/runner.py _evaluate)."""

    exit_code: int | None
    killed: str | None = None
    tail: Sequence[str] = ()
    result_text: str | None = None
    nonce: str = ""
    wall_limit: float = 0.0
    peak_rss_mb: float = 0.0
    disk_full: str | None = None


@dataclass
class RunFacts:
    exit_code: int | None  # None: still running when killed
    killed: str | None = None  # "timeout" | "memory" | "disk" | None
    tail: Sequence[str] = ()
    result_text: str | None = None
    nonce: str = ""
    harness_before: str = ""
    harness_after: str = ""
    expected: dict[str, Any] = field(default_factory=dict)  # profile, seed, ... the run was given
    wall_limit: float = 0.0
    memory_limit_mb: float = 0.0
    peak_rss_mb: float = 0.0
    evaluation: EvalFacts | None = None  # with expected["isolated"]: the second process that scored the export
    # the worker's clocks (worker/runner.py): seconds from the latest moment the timed window could honestly have
    # begun (its turn on the device, or the end of the start-up allowance) to the training process's exit, and the
    # most that may take beyond the budget and its slack (None: not measured)
    after_start: float | None = None
    after_start_allowance: float = 0.0
    disk_full: str | None = None  # killed == "disk": which disk, how full


@dataclass
class Outcome:
    status: ExperimentStatus
    reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None  # the parsed result JSON, when valid


def parse_summary(lines: Sequence[str]) -> dict[str, str] | None:
    """The key: value lines of the LAST `---` block (a line printed earlier is not the summary)."""
    start = None
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].strip() == "---":
            start = i
            break
    if start is None:
        return None
    out: dict[str, str] = {}
    for line in lines[start + 1:]:
        m = _SUMMARY_LINE.match(line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out or None


def forged_summary_lines(lines: Sequence[str]) -> bool:
    """Does the output contain a summary-looking `val_bpb:` line at all?"""
    return any(line.strip().startswith("val_bpb:") for line in lines)


def crash_reason(lines: Sequence[str], exit_code: int | None) -> str:
    """The final line of the last traceback (or exception line), else a FAIL line, else the exit."""
    clean = [ln.rstrip() for ln in lines if ln.strip()]
    for line in reversed(clean):
        if _EXC_LINE.match(line) and not line.startswith(" "):
            return line[:500]
    for line in reversed(clean):
        if line.startswith(("FAIL", "prepare:")):
            return line[:500]
    if exit_code in (-signal.SIGKILL, 128 + signal.SIGKILL):
        # the worker's own limits name themselves (timeout, memory): this one came from elsewhere, most often
        # the kernel's OOM killer, but a candidate can kill itself too, so it is not recorded as a fact
        return "killed by SIGKILL, not by the worker (the kernel's out-of-memory killer, most likely)"
    if exit_code is not None and exit_code < 0:
        try:
            return f"killed by {signal.Signals(-exit_code).name}"
        except ValueError:
            return f"killed by signal {-exit_code}"
    base = f"exit code {exit_code}"
    if exit_code in EXIT_REASONS:
        base += f" ({EXIT_REASONS[exit_code]})"
    return base + (f": {clean[-1][:300]}" if clean else "")


def is_oom(lines: Sequence[str], exit_code: int | None) -> bool:
    """Did the run say it ran out of memory? A bare SIGKILL is not taken as proof (crash_reason names it)."""
    return any(_OOM.search(ln) for ln in lines[-TAIL_LINES:])


def _summary_agrees(summary: dict[str, str], result: dict[str, Any]) -> str | None:
    """None if the printed summary matches the signed result, else what differs."""
    pairs = {"val_bpb": ("val_bpb", 1e-6), "num_steps": ("num_steps", 0.5),
             "training_seconds": ("training_seconds", 0.051)}
    for key, (rkey, tol) in pairs.items():
        if key not in summary:
            if key == "val_bpb":
                return "the summary has no val_bpb line"
            continue
        try:
            printed = float(summary[key])
            signed = float(result[rkey])
        except (KeyError, TypeError, ValueError):
            return f"summary {key} is not comparable with the signed result"
        if not abs(printed - signed) <= tol + 1e-9 * abs(signed):
            return f"printed {key} {summary[key]} disagrees with the signed result ({signed})"
    return None


def _metrics(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, column in METRIC_FIELDS.items():
        value = result.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[column] = int(value) if key in INT_FIELDS else float(value)
    device = result.get("device") or result.get("gpu_name")
    if isinstance(device, str):
        out["gpu_name"] = device[:200]
    return out


def verify_result(text: str | None, nonce: str, expected: dict[str, Any], harness: str,
                  scored: bool = True) -> tuple[dict[str, Any] | None, str | None]:
    """(result, None) if the JSON is well-formed, signed with this run's nonce and consistent with
    the run's settings; (None, why) otherwise. `scored=False`: a training result whose model the isolated
    evaluation scores, so it carries no val_bpb."""
    if not text:
        return None, "no result file"
    try:
        result = json.loads(text)
    except ValueError:
        return None, "result file is not JSON"
    if not isinstance(result, dict):
        return None, "result file is not a JSON object"
    if not nonce or result.get("nonce") != nonce or not digest_ok(result, nonce):
        return None, "result is not signed with this run's nonce (forged result)"
    if result.get("status", "ok") != "ok":
        return None, f"result status is {result.get('status')!r}"
    bad = non_finite(result)
    if bad is not None:
        # json.loads takes NaN and Infinity; Postgres json does not, and `nan > limit` is False, so a clock set to
        # nan passed the budget check (found by review: the result write then failed and the run repeated)
        return None, f"result {bad} is not a finite number"
    huge = out_of_range(result)
    if huge is not None:
        # json.loads takes any integer: 10**400 made float() raise OverflowError while judging and 2**63 made the
        # SQLite write raise, each time with no result recorded, so the run repeated until `lost` (found by review)
        return None, f"result {huge} is out of range"
    val = result.get("val_bpb")
    if scored and (isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val) or val <= 0):
        return None, f"val_bpb {val!r} is not a positive finite number"
    for key in ("profile", "seed"):
        if key in expected and key in result and str(result[key]) != str(expected[key]):
            return None, f"result {key} {result[key]!r} is not the run's {expected[key]!r}"
    why = _settings_differ(result, expected)
    if why:
        return None, why
    sha = result.get("harness_sha256")
    if sha is not None and harness and sha != harness:
        return None, "result names a different harness checksum"
    return result, None


def non_finite(value: Any) -> str | None:
    """The first place in a parsed result that holds NaN or an infinity (`training_seconds = nan`), or None."""
    return _first(value, lambda v: isinstance(v, float) and not math.isfinite(v), repr)


INT64_MAX = 2**63 - 1


def out_of_range(value: Any) -> str | None:
    """The first place in a parsed result that holds an integer no 64-bit column can hold (nor, past 1e308, a
    float), or None."""
    return _first(value, lambda v: isinstance(v, int) and not isinstance(v, bool) and abs(v) > INT64_MAX,
                  lambda v: f"an integer of {v.bit_length()} bits")


def _first(value: Any, bad: Callable[[Any], bool], show: Callable[[Any], str], path: str = "") -> str | None:
    if bad(value):
        return f"{path or 'value'} = {show(value)}"
    items: Any = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _first(item, bad, show, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def _settings_differ(result: dict[str, Any], expected: dict[str, Any]) -> str | None:
    """Why the run did not run under the settings the worker gave it (None: it did, or the template does not
    record them). A toy template's result without run_env / time_budget is taken as it is."""
    want_env = expected.get("run_env")
    found = result.get("run_env")
    if isinstance(want_env, dict) and found is not None:
        if not isinstance(found, dict):
            return "result run_env is not an object"
        for key, value in want_env.items():
            if found.get(key) != value:
                return (f"the run changed its own settings: {key}={found.get(key)!r}, the worker set {value!r} "
                        f"(refused: its val_bpb is not comparable)")
    budget = expected.get("time_budget")
    if budget is None or "time_budget" not in result:
        return None
    got, trained = result.get("time_budget"), result.get("training_seconds")
    if isinstance(got, bool) or not isinstance(got, (int, float)) or abs(float(got) - float(budget)) > 1e-6:
        return f"result time_budget {got!r} is not the run's {budget:g} s"
    if isinstance(trained, (int, float)) and not isinstance(trained, bool):
        limit = float(budget) + budget_slack(float(budget))
        if trained > limit:
            return f"trained {trained:.1f} s, over the {budget:g} s budget (the harness clock was not followed)"
    return None


def budget_slack(budget: float) -> float:
    return max(BUDGET_SLACK_SECONDS, BUDGET_SLACK_FRACTION * budget)


def overstayed(f: RunFacts) -> str | None:
    """Why the run held the device longer than its budget allows, by the worker's clocks (None: it did not).
    The harness's figures are the candidate's to write (its clock is an object train.py holds); the worker knows
    when the run started, when its turn came and when it exited."""
    budget = f.expected.get("time_budget")
    if f.after_start is None or not isinstance(budget, (int, float)):
        return None
    limit = float(budget) + budget_slack(float(budget)) + f.after_start_allowance
    if f.after_start <= limit:
        return None
    return (f"the run used the device {f.after_start:.0f} s after its start-up (its turn, or the start-up allowance) "
            f"against {limit:.0f} s for a {float(budget):g} s budget and its allowances: training the harness's clock "
            f"did not count (FARM_TURN_ALLOWANCE)")


def judge(f: RunFacts) -> Outcome:
    if f.harness_after and f.harness_before and f.harness_after != f.harness_before:
        return Outcome(S.refused, "the harness (prepare.py / kernels) was modified during the run")
    if f.killed == "timeout":
        return Outcome(S.timed_out, f"killed at the wall-clock limit of {f.wall_limit:.0f}s")
    if f.killed == "memory":
        return Outcome(S.crashed, f"out of memory: the run used {f.peak_rss_mb:.0f} MB, over the worker's "
                                  f"limit of {f.memory_limit_mb:.0f} MB (killed)")
    if f.killed == "disk":
        return Outcome(S.crashed, f"out of disk space: {f.disk_full or 'its disk ran low'} (killed)")
    tail = list(f.tail)
    summary = parse_summary(tail)
    if f.exit_code != 0:
        reason = crash_reason(tail, f.exit_code)
        if is_oom(tail, f.exit_code) and not reason.lower().startswith("out of memory"):
            reason = f"out of memory: {reason}"
        return Outcome(S.crashed, reason)
    if f.expected.get("isolated"):
        return _judge_isolated(f)
    result, why = verify_result(f.result_text, f.nonce, f.expected, f.harness_before)
    if result is None:
        if f.result_text or summary is not None or forged_summary_lines(tail):
            return Outcome(S.refused, f"{why}; the printed summary is ignored" if summary or
                           forged_summary_lines(tail) else why)
        return Outcome(S.crashed, "exited 0 without a result (did train.py call the harness's finish()?)")
    if summary is None:
        return Outcome(S.refused, "signed result but no `---` summary on stdout")
    disagreement = _summary_agrees(summary, result) or overstayed(f)
    if disagreement:
        return Outcome(S.refused, disagreement)
    return Outcome(S.succeeded, None, _metrics(result), result)


def _judge_isolated(f: RunFacts) -> Outcome:
    """The training process exited 0: its signed result gives the training figures, the isolated evaluation's
    signed result the scores. Whatever the training process printed about val_bpb is not read."""
    trained, why = verify_result(f.result_text, f.nonce, f.expected, f.harness_before, scored=False)
    if trained is None:
        if f.result_text:
            return Outcome(S.refused, why)
        return Outcome(S.crashed, "exited 0 without a result (did train.py call the harness's finish()?)")
    if trained.get("evaluation") != "exported":
        return Outcome(S.refused, "the run did not export its model for the isolated evaluation "
                                  "(FARM_EVAL_EXPORT was set by the worker)")
    why = overstayed(f)
    if why:
        return Outcome(S.refused, why)
    ev = f.evaluation
    if ev is None:
        return Outcome(S.refused, "the run reported an export, but no exported model was found")
    if ev.killed == "timeout":
        return Outcome(S.timed_out, f"the isolated evaluation ran past its limit of {ev.wall_limit:.0f}s "
                                    f"(FARM_EVAL_ALLOWANCE)")
    if ev.killed == "memory":
        return Outcome(S.crashed, f"out of memory in the isolated evaluation: {ev.peak_rss_mb:.0f} MB, over the "
                                  f"worker's limit of {f.memory_limit_mb:.0f} MB (killed)")
    if ev.killed == "disk":
        return Outcome(S.crashed, f"out of disk space in the isolated evaluation: {ev.disk_full} (killed)")
    if ev.killed is not None:
        return Outcome(S.crashed, f"the isolated evaluation was stopped ({ev.killed})")
    if ev.exit_code != 0:
        return Outcome(S.crashed, f"isolated evaluation: {crash_reason(list(ev.tail), ev.exit_code)}")
    scores, why = verify_result(ev.result_text, ev.nonce, f.expected, f.harness_before)
    if scores is None:
        return Outcome(S.crashed, f"isolated evaluation: {why}")
    if scores.get("evaluation") != "isolated":
        return Outcome(S.crashed, "isolated evaluation: its result does not say it is one")
    result = dict(trained)
    result.update({key: scores[key] for key in EVAL_KEYS if key in scores})
    return Outcome(S.succeeded, None, _metrics(result), result)
