"""Workers, health and metrics over real HTTP."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from farm.db import db_now
from farm.models import ExperimentStatus, LLMCall, Program, Worker
from tests.factories import make_experiment, make_worker


def test_workers_alive_stale_by_db_clock(live_api):
    c = live_api.client()
    pid = c.post("/programs", json={"name": "w", "instructions": "# go"}).json()["id"]
    with live_api.session() as s:
        p = s.get(Program, pid)
        busy = make_worker(s, "gpu-box:gpu0", hw_class="gpu.h100")
        busy.gpu_name, busy.gpu_index = "NVIDIA H100", 0
        make_worker(s, "gpu-box:gpu1", hw_class="gpu.h100")
        gone = make_worker(s, "old:cpu0")
        run = make_experiment(s, p, status=ExperimentStatus.running, worker_id=busy.id, progress=62.5,
                              current_loss=3.1, description="wider mlp")
        busy.current_experiment_id = run.id
        interval = live_api.settings.heartbeat_interval
        s.execute(update(Worker).where(Worker.id == gone.id)
                  .values(last_heartbeat=db_now(s) - timedelta(seconds=2 * interval + 1)))
    workers = {w["id"]: w for w in c.get("/workers").json()}
    assert workers["gpu-box:gpu0"]["state"] == "alive" and workers["gpu-box:gpu0"]["progress"] == 62.5
    assert workers["gpu-box:gpu0"]["current_description"] == "wider mlp"
    assert workers["gpu-box:gpu0"]["current_program_id"] == pid
    assert workers["gpu-box:gpu1"]["current_experiment_id"] is None
    assert workers["old:cpu0"]["state"] == "stale" and workers["old:cpu0"]["seconds_since_heartbeat"] > 2 * interval


def test_workers_show_sandbox_and_versions(live_api):
    # docs/deploy.md sends operators to the dashboard to see whether a worker got its sandbox:
    # the API and the workers page must both say so, and name the torch/CUDA/driver it registered with
    with live_api.session() as s:
        ok = make_worker(s, "gpu-box:gpu0", hw_class="gpu.h100")
        ok.sandbox, ok.sandbox_ok = "bwrap: bubblewrap 0.9.0", True
        ok.torch_version, ok.cuda_version, ok.driver_version = "2.11.0+cu130", "13.0", "580.65"
        bare = make_worker(s, "gpu-box:gpu1", hw_class="gpu.h100")
        bare.sandbox, bare.sandbox_ok = "none: bwrap failed (<Mount too revealing>) & unshare failed", False
        bare.torch_version = "2.9.1"
        half = make_worker(s, "gpu-box:gpu2", hw_class="gpu.h100")
        half.sandbox, half.sandbox_ok = "unshare: bwrap failed (setting up uid map)", False
    workers = {w["id"]: w for w in live_api.client().get("/workers").json()}
    fields = ("sandbox", "sandbox_ok", "torch_version", "cuda_version", "driver_version")
    assert {k: workers["gpu-box:gpu0"].get(k) for k in fields} == {
        "sandbox": "bwrap: bubblewrap 0.9.0", "sandbox_ok": True, "torch_version": "2.11.0+cu130",
        "cuda_version": "13.0", "driver_version": "580.65"}
    assert workers["gpu-box:gpu1"]["sandbox_ok"] is False
    assert workers["gpu-box:gpu1"]["sandbox"].startswith("none: bwrap failed")
    assert workers["gpu-box:gpu1"]["torch_version"] == "2.9.1" and workers["gpu-box:gpu1"]["cuda_version"] is None

    browser = live_api.client(token=None, cookies={"farm_token": live_api.token})
    for path in ("/ui/workers", "/ui/workers/live"):
        r = browser.get(path)
        assert r.status_code == 200, path
        cards = r.text.split('<div class="worker ')[1:]
        assert len(cards) == 3, path
        card_ok, card_bare, card_half = cards  # ordered by host, then GPU index
        assert "gpu-box:gpu0" in card_ok and "gpu-box:gpu1" in card_bare and "gpu-box:gpu2" in card_half
        assert 'class="pill nosandbox"' in card_half and "PARTIAL SANDBOX" in card_half  # unshare: no network only
        assert "NO SANDBOX" not in card_ok and "nosandbox" not in card_ok
        assert "torch 2.11.0+cu130" in card_ok and "CUDA 13.0" in card_ok and "driver 580.65" in card_ok
        assert 'class="pill nosandbox"' in card_bare and "NO SANDBOX" in card_bare
        assert "torch 2.9.1" in card_bare
        # the reason is shown, escaped: a bwrap error line is not markup
        assert "(&lt;Mount too revealing&gt;) &amp; unshare failed" in card_bare
        assert "<Mount too revealing>" not in r.text


def test_healthz(live_api, start_api, redis_url):
    assert live_api.client(token=None).get("/healthz").json() == {"status": "ok", "database": "ok", "broker": "ok"}
    assert live_api.client(token=None).head("/healthz").status_code == 200  # load balancers probe with HEAD too
    bad = start_api(broker_url="redis://127.0.0.1:1/0")
    r = bad.client(token=None).get("/healthz")
    assert r.status_code == 503 and r.json()["broker"] != "ok" and r.json()["database"] == "ok"
    nodb = start_api(database_url="postgresql+psycopg://farm@127.0.0.1:1/none")
    r = nodb.client(token=None).get("/healthz")
    assert r.status_code == 503 and "cannot reach the database" in r.json()["database"]


def test_metrics(live_api):
    c = live_api.client()
    pid = c.post("/programs", json={"name": "m", "instructions": "# go"}).json()["id"]
    with live_api.session() as s:
        p = s.get(Program, pid)
        w = make_worker(s, "h:cpu0")
        make_worker(s, "h:cpu1")
        run = make_experiment(s, p, status=ExperimentStatus.running, worker_id=w.id)
        w.current_experiment_id = run.id
        for _ in range(3):
            make_experiment(s, p, status=ExperimentStatus.queued)
        s.add(LLMCall(program_id=pid, model="x", cost_usd=1.5))
        s.add(LLMCall(program_id=pid, model="x", cost_usd=1234.0678))  # :g printed 1234.57 (found by review)
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'farm_experiments{program="m",status="queued"} 3' in text
    assert 'farm_queue_depth{hw_class="cpu"} 3' in text
    assert 'farm_workers{state="alive"} 2' in text and "farm_worker_utilisation 0.5" in text
    assert 'farm_llm_spend_usd_total{program="m"} 1235.5678' in text and 'farm_llm_calls_total{program="m"} 2' in text
    assert "# TYPE farm_queue_depth gauge" in text
    assert live_api.client(token=None).get("/metrics").status_code == 401
    assert c.post(f"/programs/{pid}/pause").status_code == 200  # its queued runs wait for the resume, not a worker
    text = c.get("/metrics").text
    assert 'farm_queue_depth{hw_class="cpu"}' not in text and 'farm_experiments{program="m",status="queued"} 3' in text


def test_the_api_pages_the_docs_name_are_served(live_api):
    # docs/programs.md once sent readers to /docs, which the app does not serve (no CDN scripts)
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    anon = live_api.client(token=None)
    texts = [p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))]]
    paths = {m for t in texts for m in re.findall(r"http://(?:<api>|127\.0\.0\.1:8765)(/[\w./-]*)", t)}
    assert "/openapi.json" in paths
    for path in sorted(paths):
        r = anon.get(path)
        assert r.status_code != 404, path


def test_a_database_error_is_a_json_503_and_any_other_a_json_500(live_api, start_api, monkeypatch):
    """Found by review: a database error was a plain-text "Internal Server Error" 500, though every error is
    documented as {"detail": "<one line>"}."""
    nodb = start_api(database_url="postgresql+psycopg://farm@127.0.0.1:1/none")
    r = nodb.client(token="rf_" + "x" * 40).get("/programs")
    assert r.status_code == 503 and r.headers["content-type"] == "application/json", r.text
    detail = r.json()["detail"]
    assert detail.startswith("the database is unavailable: ") and "127.0.0.1" in detail and "\n" not in detail
    # a browser asking for a dashboard page gets a page that says so, not the API's JSON
    from api.routes.dashboard import COOKIE

    browser = nodb.client(token="rf_" + "x" * 40)
    browser.cookies.set(COOKIE, "rf_" + "x" * 40)  # logged in: the page checks the cookie's token in the database
    r = browser.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert r.status_code == 503 and r.headers["content-type"].startswith("text/html"), r.text
    assert "database is unavailable" in r.text and r.headers["retry-after"] == "5"
    r = browser.get("/programs", headers={"Accept": "text/html,application/xhtml+xml"})  # the REST API stays JSON
    assert r.status_code == 503 and r.headers["content-type"] == "application/json"

    from api import crud

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("password=s3cret in some internal state")

    monkeypatch.setattr(crud, "list_programs", broken)
    r = live_api.client().get("/programs")
    assert r.status_code == 500 and r.headers["content-type"] == "application/json", r.text
    assert r.json() == {"detail": "internal server error (RuntimeError); the server's log has the details"}
    # the handlers FastAPI's own errors go through are untouched
    r = live_api.client().get("/programs/nope")
    assert r.status_code == 404 and r.json() == {"detail": "no program 'nope'"}
    r = live_api.client().get("/programs/1/experiments", params={"limit": 0})
    assert r.status_code == 422 and r.json()["detail"].startswith("query.limit: ")
    assert live_api.client(token="rf_wrong").get("/workers").status_code == 401
