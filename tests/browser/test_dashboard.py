"""The dashboard in real headless Chromium (Debian's, driven by Playwright's client): log in, submit
a program through the form, inject a candidate through the program page, watch the run appear and
finish live (no reload), open its diff. Saves artifacts/dashboard.png.

The experiments are run by real `farm scheduler` and `farm worker --cpu` subprocesses against the
test Postgres and Redis, training the real template on the cpu profile.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


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

    procs = start_real_farm(live_api, tmp_path)
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
            from farm.models import Result
            with live_api.session() as s:
                val = s.query(Result).filter(Result.experiment_id == int(exp_id)).one().val_bpb
            expect(row).to_contain_text(f"{val:.6f}")  # the worker's real measurement, shown live
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
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
