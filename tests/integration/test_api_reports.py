"""results.tsv and progress plots over real HTTP, and `farm export`."""

from __future__ import annotations

from sqlalchemy import update

from farm.models import Decision, Experiment, ExperimentRole, ExperimentStatus, Program, Result, utcnow
from tests.factories import make_experiment

HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription"


def _seed(live_api):
    c = live_api.client()
    pid = c.post("/programs", json={"name": "rep", "instructions": "# go"}).json()["id"]
    with live_api.session() as s:
        p = s.get(Program, pid)
        rows = [(ExperimentRole.baseline, "aaaaaaa1", 0.9979, None, ExperimentStatus.succeeded, "baseline"),
                (ExperimentRole.baseline, "aaaaaaa1", 0.9990, None, ExperimentStatus.succeeded, "re-run"),
                (ExperimentRole.candidate, "bbbbbbb2", 0.9932, Decision.keep, ExperimentStatus.succeeded,
                 "halve\tthe batch\nsize"),
                (ExperimentRole.candidate, "ccccccc3", 1.0050, Decision.discard, ExperimentStatus.succeeded, "gelu"),
                (ExperimentRole.candidate, "ddddddd4", None, None, ExperimentStatus.crashed, "oom"),
                (ExperimentRole.candidate, "eeeeeee5", 0.9800, None, ExperimentStatus.succeeded, "pending")]
        for role, sha, v, dec, st, desc in rows:
            e = make_experiment(s, p, role=role, commit_sha=sha, parent_commit="aaaaaaa1", decision=dec, status=st,
                                description=desc)
            s.add(Result(experiment_id=e.id, outcome=st, val_bpb=v, peak_vram_mb=45060 if v else None))
            s.flush()
            s.execute(update(Experiment).where(Experiment.id == e.id).values(finished_at=utcnow()))
        make_experiment(s, p, status=ExperimentStatus.invalid, description="never ran")
    return c, pid


def test_results_tsv(live_api):
    c, pid = _seed(live_api)
    r = c.get(f"/programs/{pid}/results.tsv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/tab-separated-values")
    assert r.text == (f"{HEADER}\n"
                      "aaaaaaa\t0.997900\t44.0\tkeep\tbaseline\n"
                      "bbbbbbb\t0.993200\t44.0\tkeep\thalve the batch size\n"
                      "ccccccc\t1.005000\t44.0\tdiscard\tgelu\n"
                      "ddddddd\t0.000000\t0.0\tcrash\toom\n")
    assert c.get("/programs/nope/results.tsv").status_code == 404


def test_progress_plots(live_api):
    c, pid = _seed(live_api)
    svg = c.get(f"/programs/{pid}/progress.svg")
    assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
    assert svg.text.lstrip().startswith("<?xml") and "<svg" in svg.text and "running best" in svg.text
    assert c.get(f"/programs/{pid}/progress.svg").text == svg.text  # deterministic
    png = c.get(f"/programs/{pid}/progress.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    empty = c.post("/programs", json={"name": "empty", "instructions": "# go"}).json()["id"]
    assert c.get(f"/programs/{empty}/progress.png").status_code == 200
    assert c.get("/programs/nope/progress.svg").status_code == 404


def test_farm_export(live_api, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    _, pid = _seed(live_api)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["export", "rep", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "results.tsv").read_text().startswith(HEADER)
    assert (out / "progress.png").read_bytes()[:4] == b"\x89PNG" and (out / "progress.svg").stat().st_size > 1000
    res = CliRunner().invoke(app, ["export", "missing"])
    assert res.exit_code != 0


def test_a_name_with_dollar_signs_is_drawn_as_text(live_api, tmp_path):
    # matplotlib reads `$...$` as mathtext: an unbalanced or unknown one made the plot (and export) fail
    from typer.testing import CliRunner

    from cli.main import app

    c = live_api.client()
    for name in ("budget $x^$ sweep", "cost $5 vs $\\frac"):
        pid = c.post("/programs", json={"name": name, "instructions": "# go"}).json()["id"]
        svg = c.get(f"/programs/{pid}/progress.svg")
        assert svg.status_code == 200, svg.text[:200]
        assert f"{name}: 0 runs" in svg.text  # the name as typed, not typeset
        assert c.get(f"/programs/{pid}/progress.png").status_code == 200
        res = CliRunner().invoke(app, ["export", str(pid), "--out", str(tmp_path / str(pid))])
        assert res.exit_code == 0, res.output


def test_the_chart_is_drawn_with_the_embedded_database_unlocked(start_api, tmp_path, monkeypatch):
    """Found by review: on SQLite every transaction takes the write lock (BEGIN IMMEDIATE), and the progress chart was
    drawn inside the request's: at 60k runs, workers' heartbeats and results waited 1.4 s for each drawing. The
    route now reads the rows, ends its transaction, then draws."""
    import sqlite3

    from farm import migrate, reports

    db = tmp_path / "farm.db"
    migrate.upgrade(f"sqlite:///{db}")
    live = start_api(database_url=f"sqlite:///{db}", home=tmp_path / "home")
    c = live.client()
    pid = c.post("/programs", json={"name": "chart", "instructions": "# go"}).json()["id"]
    real, writes = reports.render_progress, []

    def render(rows, name, fmt):  # type: ignore[no-untyped-def]
        other = sqlite3.connect(db, timeout=0, isolation_level=None)  # a worker's write, no waiting
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            writes.append("ok")
        finally:
            other.close()
        return real(rows, name, fmt)

    monkeypatch.setattr(reports, "render_progress", render)
    r = c.get(f"/programs/{pid}/progress.svg")
    assert r.status_code == 200 and r.text.lstrip().startswith("<?xml") and writes == ["ok"], r.text[:200]
