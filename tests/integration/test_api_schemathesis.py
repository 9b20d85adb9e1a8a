"""Property-based run of the live OpenAPI spec (schemathesis): no 5xx and every response matches the
documented status codes, content types and schemas. About 20 cases per operation, ~300 in all."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from farm.models import Decision, ExperimentStatus, Program, Result
from tests.factories import make_experiment, make_worker

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture
def api_schema(live_api):
    c = live_api.client()
    pid = c.post("/programs", json={"name": "st", "instructions": "# go"}).json()["id"]
    with live_api.session() as s:
        p = s.get(Program, pid)
        w = make_worker(s, "h:cpu0")
        e = make_experiment(s, p, status=ExperimentStatus.succeeded, commit_sha="c1", decision=Decision.keep,
                            diff="--- a/train.py\n+++ b/train.py\n")
        s.add(Result(experiment_id=e.id, outcome=ExperimentStatus.succeeded, val_bpb=0.99, log_tail="ok\n"))
        run = make_experiment(s, p, status=ExperimentStatus.running, worker_id=w.id, progress=10.0)
        w.current_experiment_id = run.id
    return schemathesis.openapi.from_url(f"{live_api.url}/openapi.json")


def test_openapi_conformance(api_schema, live_api):
    # schemathesis' lazy pytest loader does not work with this pytest; drive each operation's
    # hypothesis strategy directly instead (same generation, same checks)
    from hypothesis import given

    auth = {"Authorization": f"Bearer {live_api.token}"}
    failures: list[str] = []
    ran = 0
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def run(case):
            nonlocal ran
            ran += 1
            case.call_and_validate(headers=auth, checks=CHECKS)

        try:
            run()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # FailureGroup is a BaseExceptionGroup; collect every operation's failure, then report them together
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    print(f"schemathesis: {ran} cases over {len(list(api_schema.get_all_operations()))} operations")
    assert ran >= 200
    assert not failures, "\n\n".join(failures)
