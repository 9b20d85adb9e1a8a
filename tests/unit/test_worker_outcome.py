"""Judging a finished run: every outcome rule on hand-made facts (no process, no database)."""

from __future__ import annotations

import json

import pytest

from farm.harness import result_digest
from farm.models import ExperimentStatus
from worker.outcome import EvalFacts, RunFacts, crash_reason, judge, parse_summary

S = ExperimentStatus
NONCE = "ab" * 16
SUMMARY = ["step 1 | loss 3.0", "---", "val_bpb:          1.234500", "training_seconds: 2.0",
           "num_steps:        7", "depth:            2"]


def signed(**over: object) -> str:
    payload = {"status": "ok", "val_bpb": 1.2345, "test_bpb": 1.3, "training_seconds": 2.0, "num_steps": 7,
               "depth": 2, "startup_seconds": 0.5, "eval_seconds": 0.2, "profile": "cpu", "seed": 1,
               "device": "cpu (x)", "nonce": NONCE, **over}
    payload["digest"] = result_digest(payload, NONCE)
    return json.dumps(payload)


def facts(**kw: object) -> RunFacts:
    base: dict[str, object] = dict(exit_code=0, tail=SUMMARY, result_text=signed(), nonce=NONCE,
                                   harness_before="h", harness_after="h",
                                   expected={"profile": "cpu", "seed": 1}, wall_limit=10)
    base.update(kw)
    return RunFacts(**base)  # type: ignore[arg-type]


def test_a_signed_consistent_result_succeeds_with_its_metrics():
    o = judge(facts())
    assert o.status == S.succeeded and o.reason is None
    assert o.metrics["val_bpb"] == 1.2345 and o.metrics["num_steps"] == 7 and o.metrics["gpu_name"] == "cpu (x)"


def test_wrong_digest_or_nonce_is_refused():
    tampered = json.loads(signed())
    tampered["val_bpb"] = 0.5
    assert judge(facts(result_text=json.dumps(tampered))).status == S.refused
    assert judge(facts(nonce="cd" * 16)).status == S.refused


def test_summary_disagreeing_with_the_signed_result_is_refused():
    tail = [*SUMMARY[:2], "val_bpb:          0.900000", *SUMMARY[3:]]
    o = judge(facts(tail=tail))
    assert o.status == S.refused and "disagrees" in (o.reason or "")


def test_a_forged_line_before_the_real_summary_is_ignored():
    o = judge(facts(tail=["---", "val_bpb: 0.0001", *SUMMARY]))
    assert o.status == S.succeeded and o.metrics["val_bpb"] == 1.2345


def test_summary_without_a_result_is_a_forgery_and_silence_is_a_crash():
    assert judge(facts(result_text=None)).status == S.refused
    o = judge(facts(result_text=None, tail=["hello"]))
    assert o.status == S.crashed and "without a result" in (o.reason or "")


def test_changed_harness_is_refused_even_after_success():
    assert judge(facts(harness_after="other")).status == S.refused


def test_result_for_another_seed_or_harness_is_refused():
    assert judge(facts(result_text=signed(seed=2))).status == S.refused
    assert judge(facts(result_text=signed(harness_sha256="zz"))).status == S.refused


RUN_ENV = {"FARM_PROFILE": "cpu", "FARM_TIME_BUDGET": "300", "FARM_SEED": "1", "FARM_MAX_STEPS": None,
           "FARM_CORPUS": None, "FARM_EVAL_TOKENS": None, "FARM_DATA_DIR": "/d", "FARM_CACHE_DIR": "/c"}
GIVEN = {"profile": "cpu", "seed": 1, "time_budget": 300.0, "run_env": RUN_ENV}


def test_a_run_that_changed_its_own_settings_is_refused():
    """Found by review: train.py set FARM_TIME_BUDGET / FARM_EVAL_TOKENS before `import prepare` and trained 5x
    longer on a 512-token evaluation; the signed result said so, and the worker accepted it."""
    honest = signed(time_budget=300.0, run_env=RUN_ENV)
    assert judge(facts(result_text=honest, expected=GIVEN)).status == S.succeeded
    for key, value in (("FARM_TIME_BUDGET", "900"), ("FARM_EVAL_TOKENS", "512"), ("FARM_CACHE_DIR", "/mine"),
                       ("FARM_MAX_STEPS", "5")):
        o = judge(facts(result_text=signed(time_budget=300.0, run_env={**RUN_ENV, key: value}), expected=GIVEN))
        assert o.status == S.refused and key in (o.reason or ""), (key, o.reason)
    o = judge(facts(result_text=signed(time_budget=900.0, run_env=RUN_ENV), expected=GIVEN))
    assert o.status == S.refused and "time_budget" in (o.reason or "")


def test_training_past_the_budget_is_refused():
    """A loop that ignores clock.done (a fixed step count, a reset counter) trains past the budget."""
    for trained, status in ((314.9, S.succeeded), (315.1, S.refused), (900.0, S.refused)):
        o = judge(facts(result_text=signed(time_budget=300.0, training_seconds=trained, run_env=RUN_ENV),
                        expected=GIVEN, tail=[*SUMMARY[:3], f"training_seconds: {trained}"]))
        assert o.status == status, (trained, o.reason)
    small = {**GIVEN, "time_budget": 2.0, "run_env": {**RUN_ENV, "FARM_TIME_BUDGET": "2"}}
    o = judge(facts(result_text=signed(time_budget=2.0, training_seconds=10.5,
                                       run_env={**RUN_ENV, "FARM_TIME_BUDGET": "2"}), expected=small,
                    tail=[*SUMMARY[:3], "training_seconds: 10.5"]))
    assert o.status == S.refused and "over the 2 s budget" in (o.reason or "")


def test_timeout_and_memory_kills():
    assert judge(facts(killed="timeout", exit_code=None)).status == S.timed_out
    o = judge(facts(killed="memory", exit_code=None, memory_limit_mb=100, peak_rss_mb=120))
    assert o.status == S.crashed and o.reason and o.reason.startswith("out of memory")


def test_crash_reason_is_the_final_traceback_line():
    tail = ["Traceback (most recent call last):", '  File "train.py", line 3, in <module>',
            "    x = 1 / 0", "ZeroDivisionError: division by zero"]
    assert crash_reason(tail, 1) == "ZeroDivisionError: division by zero"
    syntax = ['  File "/w/train.py", line 2', "    def broken(:", "               ^",
              "SyntaxError: invalid syntax"]
    assert judge(facts(exit_code=1, tail=syntax)).reason == "SyntaxError: invalid syntax"
    assert crash_reason(["FAIL: loss nan at step 3"], 3) == "FAIL: loss nan at step 3"
    assert crash_reason([], -15) == "killed by SIGTERM"
    # found by review: every SIGKILL was recorded as "out of memory", a guess stated as a fact
    for code in (-9, 137):
        o = judge(facts(exit_code=code, tail=["step 3 | loss 2.1"]))
        assert o.reason == "killed by SIGKILL, not by the worker (the kernel's out-of-memory killer, most likely)"
    assert crash_reason(["boom"], 4) == "exit code 4 (data unavailable): boom"


def test_oom_is_recognised():
    tail = ["Traceback (most recent call last):", "torch.OutOfMemoryError: CUDA out of memory. Tried 2 GiB"]
    o = judge(facts(exit_code=1, tail=tail))
    assert o.status == S.crashed and o.reason == "out of memory: torch.OutOfMemoryError: CUDA out of memory. Tried 2 GiB"
    assert judge(facts(exit_code=1, tail=["MemoryError"])).reason == "out of memory: MemoryError"


def test_parse_summary_reads_the_last_block():
    assert parse_summary(["---", "val_bpb: 1", "---", "val_bpb: 2"]) == {"val_bpb": "2"}
    assert parse_summary(["no summary"]) is None


# ---- the isolated evaluation: the training's signed result gives the figures, the second process's the score ----

EVAL_NONCE = "cd" * 16


def signed_eval(nonce: str = EVAL_NONCE, **over: object) -> str:
    payload = {"status": "ok", "evaluation": "isolated", "val_bpb": 1.1, "test_bpb": 1.2, "eval_tokens": 4096,
               "eval_seconds": 0.7, "causal_probe_nats": 0.0, "profile": "cpu", "seed": 1, "nonce": nonce, **over}
    payload["digest"] = result_digest(payload, nonce)
    return json.dumps(payload)


def isolated_facts(evaluation: EvalFacts | None = None, **kw: object) -> RunFacts:
    trained = json.loads(signed(evaluation="exported", export_seconds=0.3))
    del trained["val_bpb"], trained["test_bpb"], trained["digest"]
    trained["digest"] = result_digest(trained, NONCE)
    ev = EvalFacts(exit_code=0, result_text=signed_eval(), nonce=EVAL_NONCE, wall_limit=60)
    base: dict[str, object] = dict(tail=["step 1 | loss 3.0", "model exported"], result_text=json.dumps(trained),
                                   expected={"profile": "cpu", "seed": 1, "isolated": True},
                                   evaluation=evaluation or ev)
    base.update(kw)
    return facts(**base)


def test_an_isolated_run_takes_its_score_from_the_evaluation_and_its_figures_from_training():
    o = judge(isolated_facts())
    assert o.status == S.succeeded, o.reason
    assert o.metrics["val_bpb"] == 1.1 and o.metrics["test_bpb"] == 1.2 and o.metrics["eval_seconds"] == 0.7
    assert o.metrics["num_steps"] == 7 and o.metrics["training_seconds"] == 2.0
    assert o.result is not None and o.result["evaluation"] == "isolated"


def test_an_isolated_run_ignores_a_score_claimed_by_the_training_process():
    # a val_bpb in the training's own (signed) result is the candidate's word: the evaluation's replaces it
    trained = json.loads(signed(evaluation="exported", val_bpb=0.01))
    o = judge(isolated_facts(result_text=json.dumps(trained)))
    assert o.status == S.succeeded and o.metrics["val_bpb"] == 1.1


@pytest.mark.parametrize("evaluation, status, reason", [
    (EvalFacts(exit_code=0, result_text=signed_eval(nonce=NONCE), nonce=EVAL_NONCE), S.crashed, "not signed"),
    (EvalFacts(exit_code=0, result_text=signed_eval(evaluation="in_process"), nonce=EVAL_NONCE), S.crashed,
     "does not say"),
    (EvalFacts(exit_code=5, tail=["prepare: model rejected: its predictions depend on later tokens"]), S.crashed,
     "isolated evaluation: prepare: model rejected: its predictions depend on later tokens"),
    (EvalFacts(exit_code=None, killed="timeout", wall_limit=60), S.timed_out, "limit of 60s"),
    (EvalFacts(exit_code=None, killed="memory", peak_rss_mb=900), S.crashed, "out of memory in the isolated"),
])
def test_an_isolated_evaluation_that_fails_fails_the_run(evaluation, status, reason):
    o = judge(isolated_facts(evaluation))
    assert o.status == status and reason in (o.reason or ""), o.reason


def test_an_isolated_run_that_did_not_export_is_refused():
    o = judge(isolated_facts(result_text=signed(evaluation="in_process")))
    assert o.status == S.refused and "did not export" in (o.reason or "")
    o = judge(facts(**{**isolated_facts().__dict__, "evaluation": None}))
    assert o.status == S.refused and "no exported model" in (o.reason or "")


@pytest.mark.parametrize("isolated", [False, True])
def test_a_run_that_held_the_device_past_its_budget_and_allowance_is_refused_whatever_its_clock_said(isolated):
    """The harness's clock is an object train.py holds: a run can keep training with training_seconds wound back.
    The worker's clocks (from its turn, or the end of the start-up allowance, to its exit) bound it."""
    budget = {"time_budget": 300.0}
    make = isolated_facts if isolated else facts
    base = make(**({"expected": {"profile": "cpu", "seed": 1, "isolated": True, **budget}} if isolated else
                   {"expected": {"profile": "cpu", "seed": 1, **budget}}))
    limit = 300.0 + 15.0 + 60.0  # budget + max(3 s, 5 %) + the allowance
    for after, status in ((None, S.succeeded), (200.0, S.succeeded), (limit - 0.1, S.succeeded), (limit + 0.1, S.refused),
                          (900.0, S.refused)):
        o = judge(RunFacts(**{**base.__dict__, "after_start": after, "after_start_allowance": 60.0}))
        assert o.status == status, (after, o.reason)
        if status == S.refused:
            assert "used the device" in (o.reason or "") and "FARM_TURN_ALLOWANCE" in (o.reason or "")
    # a toy template's result without a budget: the job's budget is what the worker gave, but none is known here
    o = judge(RunFacts(**{**facts().__dict__, "after_start": 900.0}))
    assert o.status == S.succeeded


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_result_with_a_non_finite_number_is_refused(value):
    """Found by review: a candidate that set clock.training_seconds = nan got NaN into the result (json.loads takes
    it), `nan > limit` is False so the budget check passed it, and Postgres json then rejected the result write, so
    the run was lost and repeated until `lost`. A non-finite number anywhere in a signed result is refused."""
    o = judge(facts(result_text=signed(time_budget=300.0, training_seconds=value, run_env=RUN_ENV), expected=GIVEN,
                    tail=SUMMARY[:3]))
    assert o.status == S.refused and "training_seconds" in (o.reason or "") and "finite" in (o.reason or "")
    trained = json.loads(signed(evaluation="exported", training_seconds=value, extra={"mfu": [1.0, value]}))
    del trained["val_bpb"], trained["test_bpb"], trained["digest"]
    trained["digest"] = result_digest(trained, NONCE)
    o = judge(isolated_facts(result_text=json.dumps(trained)))
    assert o.status == S.refused and "finite" in (o.reason or ""), o.reason
    o = judge(isolated_facts(evaluation=EvalFacts(exit_code=0, result_text=signed_eval(causal_probe_nats=value),
                                                  nonce=EVAL_NONCE, wall_limit=60)))
    assert o.status != S.succeeded and "causal_probe_nats" in (o.reason or "")


@pytest.mark.parametrize("over", [{"val_bpb": 10 ** 400}, {"num_params_m": 10 ** 400}, {"depth": 2 ** 63},
                                  {"time_budget": -(10 ** 30)}, {"extra": {"steps": [1, 2 ** 64]}}])
def test_a_result_with_an_integer_no_column_can_hold_is_refused(over):
    """Found by review: json.loads takes any integer; 10**400 made float() raise OverflowError while judging and
    2**63 made the SQLite write raise, and with no result recorded the run was re-queued until `lost`."""
    o = judge(facts(result_text=signed(**over), tail=SUMMARY[:3]))
    assert o.status == S.refused and "out of range" in (o.reason or ""), o.reason
    assert judge(facts(result_text=signed(depth=2 ** 63 - 1), tail=SUMMARY[:3])).status == S.succeeded
