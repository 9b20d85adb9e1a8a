"""The dashboard in real headless Chromium (Debian's, driven by Playwright's client): log in, submit
a program through the form, inject a candidate through the program page, watch the run appear and
finish live (no reload), open its diff. Saves artifacts/dashboard.png.

Who runs the experiment:
- REAL mode, when the `worker`, `scheduler` and `template` branches are merged (worker.app,
  scheduler.loop and training_template/train.py exist): real `farm scheduler` and `farm worker --cpu`
  subprocesses against the test Postgres and Redis.
- SIMULATED mode until then: a thread walks the experiment through the farm's own state machine
  (farm.states: queue, claim, heartbeat, result, decision) exactly as those services will.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from farm.templates import TEMPLATES

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def real_services_available() -> bool:
    return (importlib.util.find_spec("worker.app") is not None
            and importlib.util.find_spec("scheduler.loop") is not None
            and (TEMPLATES["default"] / "train.py").exists())


class SimulatedFarm(threading.Thread):
    """Stands in for `farm scheduler` + `farm worker --cpu`: same transitions, no training."""

    def __init__(self, live) -> None:
        super().__init__(daemon=True)
        self.live, self.stop = live, threading.Event()

    def run(self) -> None:
        from sqlalchemy import select

        from farm.models import Decision, Experiment, ExperimentStatus, Worker
        from farm.states import claim, heartbeat, mark_queued, record_result, set_decision

        with self.live.session() as s:
            s.add(Worker(id="sim:cpu0", host="sim", hw_class="cpu"))
        while not self.stop.is_set():
            with self.live.session() as s:
                ids = s.execute(select(Experiment.id).where(Experiment.status == ExperimentStatus.proposed)
                                ).scalars().all()
            for eid in ids:
                with self.live.session() as s:
                    mark_queued(s, eid)
                    s.get(Experiment, eid).commit_sha = f"{eid:07x}" + "0" * 33
                with self.live.session() as s:
                    claim(s, eid, "sim:cpu0")
                for pct in (25.0, 50.0, 75.0):
                    time.sleep(0.7)
                    with self.live.session() as s:
                        heartbeat(s, eid, "sim:cpu0", progress=pct, current_loss=4.0 - pct / 50)
                with self.live.session() as s:
                    record_result(s, eid, "sim:cpu0", ExperimentStatus.succeeded, val_bpb=0.9871, test_bpb=0.9902,
                                  training_seconds=20.0, total_seconds=24.5, peak_vram_mb=512.0,
                                  log_tail="step 120 | loss 2.91\n---\nval_bpb: 0.987100\n")
                with self.live.session() as s:
                    set_decision(s, eid, Decision.keep)
            self.stop.wait(0.3)


def start_real_farm(live, tmp_path: Path) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "FARM_DATABASE_URL": live.settings.db_url, "FARM_BROKER_URL": live.settings.broker,
           "FARM_HOME": str(tmp_path / "farm-home"), "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "FARM_HEARTBEAT_INTERVAL": "1"}
    farm = [sys.executable, "-m", "cli.main"]
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    return [subprocess.Popen(farm + args, env=env, cwd=ROOT, stdout=(logs / f"{name}.log").open("wb"),
                             stderr=subprocess.STDOUT)
            for name, args in (("scheduler", ["scheduler"]), ("worker", ["worker", "--cpu"]))]


@pytest.mark.timeout(600)
def test_submit_watch_live_and_open_diff(live_api, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    real = real_services_available()
    procs: list[subprocess.Popen[bytes]] = []
    sim = None
    if real:
        procs = start_real_farm(live_api, tmp_path)
    else:
        sim = SimulatedFarm(live_api)
        sim.start()
    ARTIFACTS.mkdir(exist_ok=True)
    url = live_api.url
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 950})
            external = []
            page.on("request", lambda r: external.append(r.url) if not r.url.startswith(url) else None)

            page.goto(f"{url}/ui/programs/new")
            assert "/login" in page.url  # private deployment: the form asks for a token first
            page.fill("input[name=token]", live_api.token)
            page.click("button[type=submit]")
            page.wait_for_url(f"{url}/ui/programs/new")
            cookie = next(c for c in page.context.cookies() if c["name"] == "farm_token")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

            page.fill("input[name=name]", "Browser sweep")
            page.fill("textarea[name=instructions]", "# Goal\nLower val_bpb on CPU.\n")
            page.select_option("select[name=profile]", "cpu")
            page.fill("input[name=time_budget]", "20")
            page.click("form[data-form=program] button[type=submit]")
            page.wait_for_url(f"{url}/ui/programs/*")
            expect(page.locator("h1")).to_contain_text("Browser sweep")
            page.evaluate("window.__noReload = true")

            from farm.programs import head_files
            with live_api.session() as s:
                from farm.models import Program
                prog = s.query(Program).one()
                first = head_files(s, prog)["train.py"].splitlines()[0]
            page.click("#inject summary")
            page.fill("#inject input[name=description]", "annotate the first line")
            page.fill("#inject textarea[name=patch]",
                      f"train.py\n<<<<<<< SEARCH\n{first}\n=======\n{first}  # browser edit\n>>>>>>> REPLACE\n")
            page.click("#inject button[type=submit]")
            expect(page.locator("#inject .form-msg")).to_contain_text("Accepted as experiment #", timeout=10_000)
            exp_id = page.locator("#inject .form-msg").inner_text().split("#")[1].split()[0]

            row = page.locator(f"tr[data-exp='{exp_id}']")
            expect(row).to_be_visible(timeout=10_000)
            expect(row.locator(".pill.running")).to_be_visible(timeout=300_000)  # appears live
            expect(row.locator(".pill.succeeded")).to_be_visible(timeout=300_000)
            if not real:
                expect(row.locator(".pill.keep")).to_be_visible(timeout=30_000)
                expect(row).to_contain_text("0.987100")
            assert page.evaluate("window.__noReload") is True  # it all arrived without a page load

            row.click()
            expect(page.locator("#detail pre.diff .da")).to_contain_text("# browser edit")
            expect(page.locator("#detail pre.log")).to_be_visible()
            page.wait_for_timeout(600)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=False)

            page.goto(f"{url}/ui/workers")
            expect(page.locator(".worker").first).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "dashboard-workers.png"))
            assert not external, f"the dashboard fetched from elsewhere: {external[:3]}"
            browser.close()
    finally:
        if sim is not None:
            sim.stop.set()
            sim.join(10)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
