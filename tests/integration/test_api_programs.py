"""Programs over real HTTP: create, list, read, pause/resume/stop, and their error codes."""

from __future__ import annotations

import threading

from farm.models import Decision, ExperimentRole, ExperimentStatus, LLMCall, Result
from tests.factories import make_experiment

BODY = {"name": "Tiny LR sweep", "instructions": "# Goal\nlower val_bpb\n", "profile": "cpu",
        "policy": {"k_sigma": 3.0}, "stop_rules": {"max_experiments": 50}, "weight": 2.0}


def test_create_list_read(live_api):
    c = live_api.client()
    r = c.post("/programs", json=BODY)
    assert r.status_code == 201, r.text
    prog = r.json()
    assert prog["slug"] == "tiny-lr-sweep" and prog["status"] == "active" and prog["weight"] == 2.0
    assert prog["policy"]["k_sigma"] == 3.0 and prog["policy"]["kind"] == "confirm"  # defaults merged
    assert prog["stop_rules"] == {"max_experiments": 50} and prog["time_budget"] > 0
    listed = c.get("/programs").json()
    assert [p["id"] for p in listed] == [prog["id"]] and listed[0]["counts"] == {}
    for ref in (str(prog["id"]), prog["slug"]):
        detail = c.get(f"/programs/{ref}").json()
        assert detail["id"] == prog["id"] and detail["instructions"].startswith("# Goal")
        assert detail["best"] is None and detail["noise_sigma"] is None and detail["llm_spend_usd"] == 0


def test_detail_figures(live_api):
    c = live_api.client()
    pid = c.post("/programs", json=BODY).json()["id"]
    with live_api.session() as s:
        from farm.models import Program

        p = s.get(Program, pid)
        done = dict(status=ExperimentStatus.succeeded, finished_at=None)
        vals = {}
        for i, (role, commit, v, dec) in enumerate([
                (ExperimentRole.baseline, "c0", 1.000, None), (ExperimentRole.baseline, "c0", 1.004, None),
                (ExperimentRole.candidate, "c1", 0.990, Decision.keep),
                (ExperimentRole.candidate, "c2", 1.010, Decision.discard),
                (ExperimentRole.confirmation, "c1", 0.992, None)]):
            e = make_experiment(s, p, role=role, commit_sha=commit, parent_commit="c0", decision=dec,
                                seed=i, **done)
            s.add(Result(experiment_id=e.id, outcome=ExperimentStatus.succeeded, val_bpb=v, test_bpb=v + 0.01,
                         peak_vram_mb=2048))
            vals[i] = e.id
        make_experiment(s, p, status=ExperimentStatus.crashed)
        make_experiment(s, p, status=ExperimentStatus.queued)
        s.add(LLMCall(program_id=pid, model="m", cost_usd=0.25))
        s.add(LLMCall(program_id=pid, model="m", cost_usd=0.5))
        from sqlalchemy import update

        from farm.models import Experiment, utcnow
        s.execute(update(Experiment).where(Experiment.status != ExperimentStatus.queued)
                  .values(finished_at=utcnow()))
    d = c.get(f"/programs/{pid}").json()
    assert d["counts"] == {"succeeded": 5, "crashed": 1, "queued": 1}
    assert d["decisions"] == {"keep": 1, "discard": 1}
    assert d["best"]["val_bpb"] == 0.990 and abs(d["best"]["test_bpb"] - 1.0) < 1e-9
    assert abs(d["baseline_val_bpb"] - 1.002) < 1e-9
    # pooled over the c0 pair (1.000, 1.004) and the c1 pair (0.990, 0.992): sqrt((8e-6 + 2e-6) / 2)
    assert abs(d["noise_sigma"] - (5e-6) ** 0.5) < 1e-9 and d["noise_source"] == "replicates"
    assert d["llm_spend_usd"] == 0.75 and d["llm_calls"] == 2 and d["experiments_per_hour"] == 6
    summary = c.get("/programs").json()[0]
    assert summary["best"]["val_bpb"] == 0.990 and summary["counts"]["succeeded"] == 5


def test_every_policy_knob_the_scheduler_reads_is_accepted(live_api):
    """docs/policy.md documents every field of scheduler.policy.PolicyConfig; the API must take each
    (it refused `prior_sigma` with a 422)."""
    from dataclasses import fields

    from scheduler.policy import PolicyConfig

    policy = {f.name: getattr(PolicyConfig(), f.name) for f in fields(PolicyConfig)} | {"prior_sigma": 0.001}
    c = live_api.client()
    r = c.post("/programs", json={**BODY, "name": "every knob", "policy": policy})
    assert r.status_code == 201, r.text
    assert r.json()["policy"] == policy
    r = c.post("/programs", json={**BODY, "name": "no noise", "policy": {"prior_sigma": 0}})
    assert r.status_code == 422 and "prior_sigma" in r.json()["detail"]


def test_pause_resume_stop(live_api):
    c = live_api.client()
    slug = c.post("/programs", json=BODY).json()["slug"]
    assert c.post(f"/programs/{slug}/resume").json()["status"] == "active"  # already active: no-op
    assert c.post(f"/programs/{slug}/pause").json()["status"] == "paused"
    assert c.post(f"/programs/{slug}/pause").json()["status"] == "paused"  # idempotent
    assert c.post(f"/programs/{slug}/resume").json()["status"] == "active"
    assert c.post(f"/programs/{slug}/stop").json()["status"] == "stopped"
    r = c.post(f"/programs/{slug}/resume")
    assert r.status_code == 409 and "stopped" in r.json()["detail"]
    assert c.post("/programs/nope/stop").status_code == 404


def test_stop_cancels_the_runs_that_have_not_started(live_api):
    """Found by review: a stopped program's queued runs were claimed and trained after the stop."""
    c = live_api.client()
    pid = c.post("/programs", json=BODY).json()["id"]
    with live_api.session() as s:
        from farm.models import Program

        p = s.get(Program, pid)
        ids = [make_experiment(s, p, status=st).id
               for st in (ExperimentStatus.queued, ExperimentStatus.proposed, ExperimentStatus.running)]
    assert c.post(f"/programs/{pid}/stop").json()["status"] == "stopped"
    got = {e["id"]: (e["status"], e["status_reason"]) for e in c.get(f"/programs/{pid}/experiments").json()["items"]}
    assert got[ids[0]] == got[ids[1]] == ("cancelled", "its program was stopped before it ran")
    assert got[ids[2]][0] == "running"  # a run in flight finishes and is recorded
    detail = c.get(f"/programs/{pid}").json()
    assert detail["counts"] == {"cancelled": 2, "running": 1}
    assert detail["experiments_per_hour"] == 0  # a cancelled run was not work done (it has a finished_at)
    r = c.get(f"/programs/{pid}/experiments", params={"status": "cancelled"})
    assert r.status_code == 200 and len(r.json()["items"]) == 2


def test_the_program_page_says_why_it_is_not_active(live_api):
    c = live_api.client()
    pid = c.post("/programs", json=BODY).json()["id"]
    browser = live_api.client(token=None, cookies={"farm_token": live_api.token})
    assert 'id="program-reason"' not in browser.get(f"/ui/programs/{pid}").text
    with live_api.session() as s:
        from farm.models import Program, ProgramStatus

        p = s.get(Program, pid)
        p.status, p.status_reason = ProgramStatus.paused, "paused by the scheduler: no model <set>"
    page = browser.get(f"/ui/programs/{pid}").text
    assert 'id="program-reason">paused by the scheduler: no model &lt;set&gt;</div>' in page


def test_a_missing_program_page_is_an_html_page(live_api):
    browser = live_api.client(token=None, cookies={"farm_token": live_api.token})
    r = browser.get("/ui/programs/999")
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
    assert 'id="not-found"' in r.text and "no program &#39;999&#39;" in r.text and "signed in as" in r.text


def test_errors(live_api):
    c = live_api.client()
    r = c.post("/programs", json={"instructions": "x"})
    assert r.status_code == 422 and "body.name" in r.json()["detail"]
    r = c.post("/programs", json={**BODY, "weight": -1})
    assert r.status_code == 422 and "body.weight" in r.json()["detail"]
    r = c.post("/programs", json={**BODY, "profile": "tpu"})
    assert r.status_code == 422 and "body.profile" in r.json()["detail"]
    r = c.post("/programs", json={**BODY, "editable_files": ["prepare_nope.py"]})
    assert r.status_code == 422 and "prepare_nope.py" in r.json()["detail"]
    r = c.post("/programs", json={**BODY, "editable_files": ["train.py", "prepare.py"]})  # the harness
    assert r.status_code == 422 and "fixed harness: prepare.py" in r.json()["detail"], r.text
    r = c.post("/programs", json={**BODY, "name": "bad\x00name"})
    assert r.status_code == 422 and "body.name" in r.json()["detail"]
    # found by review: a file named twice was taken, and a brief of blanks
    r = c.post("/programs", json={**BODY, "editable_files": ["train.py", "train.py"]})
    assert r.status_code == 422 and "more than once: train.py" in r.json()["detail"], r.text
    r = c.post("/programs", json={**BODY, "instructions": " \n\t "})
    assert r.status_code == 422 and "body.instructions" in r.json()["detail"] and "blank" in r.json()["detail"]
    r = c.post("/programs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"].startswith("body")
    # "%C2%B3" is '³', which str.isdigit() accepts and int() refuses
    for ref in ("999999", "99999999999999", "no-such", "%00", "UPPER", "%C2%B3", "%D9%A3"):
        assert c.get(f"/programs/{ref}").status_code == 404, ref


def test_an_all_digit_name_gets_a_slug_that_is_not_an_id(live_api):
    c = live_api.client()
    c.post("/programs", json=BODY)  # program 1, so that "1" as a slug would find the wrong one
    for name in ("2024", "1"):
        created = c.post("/programs", json={**BODY, "name": name}).json()
        assert not created["slug"].isdigit(), created["slug"]
        r = c.get(f"/programs/{created['slug']}")
        assert r.status_code == 200 and r.json()["id"] == created["id"], r.text[:200]


def test_concurrent_creates_with_one_name_all_succeed(live_api):
    # each request picks the same free slug; the unique index refuses all but one
    codes: list[int] = []
    slugs: list[str] = []
    barrier = threading.Barrier(8)

    def create() -> None:
        c = live_api.client()
        barrier.wait()
        r = c.post("/programs", json={**BODY, "name": "same name"})
        codes.append(r.status_code)
        slugs.append(r.json()["slug"] if r.status_code == 201 else "")

    for _ in range(4):
        threads = [threading.Thread(target=create) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert codes == [201] * 32, codes
    assert len(set(slugs)) == 32


def test_a_deadline_with_no_utc_equivalent_is_a_422(live_api):
    """Found by review: the API took "9999-12-31T23:00:00-12:00" (201), and the scheduler's conversion to UTC raised
    OverflowError on every pass."""
    c = live_api.client()
    for deadline in ("9999-12-31T23:00:00-12:00", "0001-01-01T00:00:00+01:00"):
        r = c.post("/programs", json={**BODY, "stop_rules": {"deadline": deadline}})
        assert r.status_code == 422, r.text
        assert r.json()["detail"] == ("body.stop_rules.deadline: Value error, out of range: in UTC it would fall "
                                      "outside the years 1 to 9999")
    r = c.post("/programs", json={**BODY, "stop_rules": {"deadline": "2030-01-01T05:00:00+05:00"}})
    assert r.status_code == 201 and r.json()["stop_rules"] == {"deadline": "2030-01-01T00:00:00Z"}


def test_length_and_number_errors_say_what_is_wrong(live_api):
    """Found by review: an empty name was "Value should have at least 1 item after validation", and a NaN weight
    "Input should be less than or equal to 1000"."""
    c = live_api.client()
    r = c.post("/programs", json={**BODY, "name": ""})
    assert r.status_code == 422 and r.json()["detail"] == "body.name: String should have at least 1 character"
    r = c.post("/programs", content=b'{"name": "x", "instructions": "y", "weight": NaN}',
               headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"] == "body.weight: Input should be a finite number", r.text
