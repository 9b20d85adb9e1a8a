"""Experiments and candidates over real HTTP: list filters/sort/paging, detail, a person's patch."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update

from farm.models import (
    Decision,
    DecisionRecord,
    Experiment,
    ExperimentRole,
    ExperimentStatus,
    Program,
    Result,
    utcnow,
)
from tests.factories import make_experiment, make_worker

PROGRAM = {"name": "exp", "instructions": "# go"}


def _seed(live_api):
    c = live_api.client()
    pid = c.post("/programs", json=PROGRAM).json()["id"]
    with live_api.session() as s:
        p = s.get(Program, pid)
        base = make_experiment(s, p, status=ExperimentStatus.succeeded, role=ExperimentRole.baseline,
                               commit_sha="c0", parent_commit="c0", description="baseline")
        s.add(Result(experiment_id=base.id, outcome=ExperimentStatus.succeeded, val_bpb=1.0, peak_vram_mb=1024))
        ids = []
        for i, v in enumerate([0.99, 1.02, 0.98]):
            e = make_experiment(s, p, status=ExperimentStatus.succeeded, commit_sha=f"c{i + 1}", parent_commit="c0",
                                description=f"cand {i}", decision=Decision.keep if v < 1 else Decision.discard,
                                diff="--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n-x\n+y\n")
            s.add(Result(experiment_id=e.id, outcome=ExperimentStatus.succeeded, val_bpb=v, test_bpb=v + 0.01,
                         log_tail=f"step 10 loss 3.2\nval_bpb: {v:.6f}\n", peak_vram_mb=2048))
            ids.append(e.id)
        s.add(DecisionRecord(program_id=pid, experiment_id=ids[0], decision=Decision.keep, policy="confirm",
                             reason="beat head by 5 sigma", head_before="c0", head_after="c1",
                             statistics={"sigma": 0.002, "delta": -0.01}))
        w = make_worker(s, "host:cpu0")
        run = make_experiment(s, p, status=ExperimentStatus.running, worker_id=w.id, progress=40.0,
                              description="running one")
        w.current_experiment_id = run.id
        make_experiment(s, p, status=ExperimentStatus.crashed, description="boom", status_reason="exit 1")
        s.execute(update(Experiment).where(Experiment.status != ExperimentStatus.running)
                  .values(finished_at=utcnow(), started_at=utcnow(), queued_at=utcnow()))
    return c, pid, ids, run.id


def test_list_filter_sort_page(live_api):
    c, pid, ids, run_id = _seed(live_api)
    page = c.get(f"/programs/{pid}/experiments").json()
    assert page["total"] == 6 and page["items"][0]["id"] == max(i["id"] for i in page["items"])
    by_id = {i["id"]: i for i in page["items"]}
    assert by_id[ids[0]]["parent_val_bpb"] == 1.0 and abs(by_id[ids[0]]["delta"] + 0.01) < 1e-9
    assert by_id[ids[0]]["memory_gb"] == 2.0 and by_id[run_id]["progress"] == 40.0
    kept = c.get(f"/programs/{pid}/experiments", params={"decision": "keep"}).json()
    assert {i["id"] for i in kept["items"]} == {ids[0], ids[2]}
    st = c.get(f"/programs/{pid}/experiments", params=[("status", "running"), ("status", "crashed")]).json()
    assert st["total"] == 2
    lb = c.get(f"/programs/{pid}/experiments", params={"sort": "val_bpb", "order": "asc", "limit": 2}).json()
    assert [i["val_bpb"] for i in lb["items"]] == [0.98, 0.99] and lb["limit"] == 2 and lb["total"] == 6
    p2 = c.get(f"/programs/{pid}/experiments", params={"limit": 2, "offset": 4}).json()
    assert len(p2["items"]) == 2 and p2["offset"] == 4
    assert c.get(f"/programs/{pid}/experiments", params={"role": "baseline"}).json()["total"] == 1
    r = c.get(f"/programs/{pid}/experiments", params={"limit": 0})
    assert r.status_code == 422 and "query.limit" in r.json()["detail"]
    r = c.get(f"/programs/{pid}/experiments", params={"status": "exploded"})
    assert r.status_code == 422 and "query.status" in r.json()["detail"]
    assert c.get("/programs/404/experiments").status_code == 404


def test_detail(live_api):
    c, pid, ids, run_id = _seed(live_api)
    d = c.get(f"/experiments/{ids[0]}").json()
    assert d["diff"].startswith("--- a/train.py") and "val_bpb: 0.990000" in d["log_tail"]
    assert d["metrics"]["val_bpb"] == 0.99 and d["metrics"]["test_bpb"] == 1.0
    assert d["decision_record"]["statistics"] == {"sigma": 0.002, "delta": -0.01}
    assert d["decision_record"]["reason"] == "beat head by 5 sigma"
    assert d["timings"]["run_seconds"] is not None and d["timings"]["wait_seconds"] is not None
    r = c.get(f"/experiments/{run_id}").json()
    assert r["worker"]["id"] == "host:cpu0" and r["worker"]["state"] == "alive" and r["metrics"] is None
    assert c.get("/experiments/999999").status_code == 404
    assert c.get("/experiments/0").status_code == 422
    assert c.get("/experiments/99999999999").status_code == 422
    assert c.get("/experiments/abc").status_code == 422
    # the policy's own sigma wins over the pooled estimate
    assert c.get(f"/programs/{pid}").json()["noise_sigma"] == 0.002


def test_candidate_valid_and_invalid(live_api):
    c = live_api.client()
    prog = c.post("/programs", json=PROGRAM).json()
    url = f"/programs/{prog['slug']}/candidates"
    sr = "train.py\n<<<<<<< SEARCH\nLEARNING_RATE = 0.01\n=======\nLEARNING_RATE = 0.02\n>>>>>>> REPLACE\n"
    with live_api.session() as s:
        from farm.programs import head_files

        train = head_files(s, s.get(Program, prog["id"]))["train.py"]
    if "LEARNING_RATE = 0.01" not in train:  # the real template: edit its first line instead
        first = train.splitlines()[0]
        sr = f"train.py\n<<<<<<< SEARCH\n{first}\n=======\n{first}  # changed\n>>>>>>> REPLACE\n"
    r = c.post(url, json={"description": "double the LR", "search_replace": sr})
    assert r.status_code == 201, r.text
    exp = r.json()
    assert exp["status"] == "proposed" and exp["proposer_kind"] == "manual" and exp["role"] == "candidate"
    assert "+" in c.get(f"/experiments/{exp['id']}").json()["diff"]
    # the same change again: a duplicate, refused with the reason
    r = c.post(url, json={"description": "again", "search_replace": sr})
    assert r.status_code == 422 and f"duplicate of experiment {exp['id']}" in r.json()["detail"]
    r = c.post(url, json={"description": "bad", "search_replace": sr.replace("SEARCH\n", "SEARCH\nnot there\n")})
    assert r.status_code == 422 and "not found" in r.json()["detail"]
    r = c.post(url, json={"description": "harness", "files": {"prepare.py": "x = 1\n"}})
    assert r.status_code == 422 and "non-editable" in r.json()["detail"]
    r = c.post(url, json={"description": "broken", "files": {"train.py": "def (:\n"}})
    assert r.status_code == 422 and "does not compile" in r.json()["detail"]
    r = c.post(url, json={"description": "patch", "unified_diff": "--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n-nope\n+x\n"})
    assert r.status_code == 422 and "does not apply" in r.json()["detail"]
    r = c.post(url, json={"description": "two", "files": {"train.py": "x=1\n"}, "search_replace": sr})
    assert r.status_code == 422 and "exactly one" in r.json()["detail"]
    r = c.post(url, json={"search_replace": sr})
    assert r.status_code == 422 and "body.description" in r.json()["detail"]
    r = c.post(url, json={"description": "   ", "search_replace": sr})  # was stored as "(no description)"
    assert r.status_code == 422 and "body.description" in r.json()["detail"] and "blank" in r.json()["detail"]
    # invalid requests leave no rows behind; the valid one is there
    assert c.get(f"/programs/{prog['id']}/experiments").json()["total"] == 1
    assert c.post("/programs/missing/candidates", json={"description": "x", "files": {"train.py": "x=1\n"}}
                  ).status_code == 404
    c.post(f"/programs/{prog['id']}/stop")
    r = c.post(url, json={"description": "late", "files": {"train.py": "x = 2\n"}})
    assert r.status_code == 409


def test_a_candidate_sent_while_the_scheduler_finishes_its_program_is_refused_not_left_proposed(live_api):
    """Found by review: the route read the program's status unlocked; a scheduler pass that finished the program
    (and cancelled what was `proposed`) between that read and the insert left the new candidate `proposed` for good,
    counted as queued on the dashboard. The route now locks the program row first, so it waits for that pass."""
    import threading
    import time

    from farm.models import ProgramStatus

    c = live_api.client()
    prog = c.post("/programs", json=PROGRAM).json()
    answer: dict[str, Any] = {}
    with live_api.session() as s:  # the scheduler's pass: the status written, its transaction still open
        s.execute(update(Program).where(Program.id == prog["id"]).values(status=ProgramStatus.finished))
        t = threading.Thread(target=lambda: answer.update(r=c.post(
            f"/programs/{prog['id']}/candidates", json={"description": "late", "files": {"train.py": "x = 2\n"}})))
        t.start()
        time.sleep(1.5)
        assert t.is_alive(), answer["r"].text  # waits for the pass to commit
    t.join(30)
    assert answer["r"].status_code == 409 and "finished" in answer["r"].json()["detail"]
    assert c.get(f"/programs/{prog['id']}/experiments").json()["total"] == 0
