"""The REST reads and the dashboard's chart over the embedded SQLite database (api/, farm/reports.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest


@pytest.fixture
def api(farm_env) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    """A TestClient on a fresh SQLite farm, authenticated with a read-write token."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.deps import COOKIE
    from farm import migrate
    from farm.db import session_scope
    from farm.settings import get_settings
    from farm.tokens import create_token

    settings = get_settings()
    migrate.upgrade(settings.db_url)
    with session_scope() as s:
        plain = create_token(s, name="t").plain
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {plain}"},
                    cookies={COOKIE: plain}) as c:  # the cookie: the dashboard's pages
        yield c


def _datetimes(value: Any, key: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _datetimes(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _datetimes(v, key)
    elif isinstance(value, str) and (key.endswith("_at") or key == "last_heartbeat"):
        yield key, value


def test_every_api_datetime_carries_its_utc_offset_on_sqlite(api) -> None:  # type: ignore[no-untyped-def]
    # SQLite gave back naive values ("2026-11-27T17:08:40.642000"), which a browser reads as local time
    from farm.db import session_scope
    from farm.models import Decision, DecisionRecord, ExperimentStatus, Result
    from tests.factories import make_experiment, make_program, make_worker

    t0 = datetime(2026, 11, 27, 17, 8, 40, 642000, tzinfo=UTC)
    with session_scope() as s:
        p = make_program(s, "tz")
        w = make_worker(s, "host:cpu0")
        e = make_experiment(s, p, status=ExperimentStatus.succeeded, decision=Decision.keep, worker_id=w.id,
                            queued_at=t0, started_at=t0 + timedelta(seconds=5),
                            finished_at=t0 + timedelta(seconds=65), decided_at=t0 + timedelta(seconds=66),
                            heartbeat_at=t0 + timedelta(seconds=60))
        s.add(Result(experiment_id=e.id, worker_id=w.id, outcome=ExperimentStatus.succeeded, val_bpb=1.0))
        s.add(DecisionRecord(program_id=p.id, experiment_id=e.id, decision=Decision.keep, policy="greedy"))
        pid, eid = p.id, e.id
    bodies = [api.get(f"/experiments/{eid}"), api.get(f"/programs/{pid}/experiments"), api.get("/programs"),
              api.get(f"/programs/{pid}"), api.get("/workers")]
    seen: dict[str, str] = {}
    for r in bodies:
        assert r.status_code == 200, r.text
        for key, text in _datetimes(r.json()):
            seen[key] = text
            parsed = datetime.fromisoformat(text)
            assert parsed.utcoffset() == timedelta(0), f"{r.url} {key}={text!r} has no UTC offset"
    assert {"created_at", "queued_at", "started_at", "finished_at", "decided_at", "heartbeat_at",
            "last_heartbeat"} <= set(seen)
    assert datetime.fromisoformat(seen["started_at"]) == t0 + timedelta(seconds=5)  # the instant is unchanged


def _finished_runs(program_id: int, n: int, keep_every: int = 0) -> None:
    from farm.db import session_scope
    from farm.models import Decision, ExperimentStatus, Program, Result
    from tests.factories import make_experiment

    with session_scope() as s:
        p = s.get(Program, program_id)
        assert p is not None
        for i in range(n):
            keep = keep_every and i % keep_every == 0
            e = make_experiment(s, p, status=ExperimentStatus.succeeded,
                                decision=Decision.keep if keep else Decision.discard, commit_sha=f"{i:040x}")
            s.add(Result(experiment_id=e.id, outcome=ExperimentStatus.succeeded, val_bpb=1.0 + i * 1e-4))


def test_the_progress_chart_renders_once_per_version_and_a_versioned_url_is_immutable(api, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # every viewer re-rendered it on every finished run (2.9 s and 9.9 MB at 100k runs), with no-store
    from farm import reports
    from farm.db import session_scope
    from tests.factories import make_program

    with session_scope() as s:
        pid = make_program(s, "chart").id
    _finished_runs(pid, 3, keep_every=2)
    renders: list[str] = []
    real = reports.render_progress

    def counting(rows, name, fmt="png"):  # type: ignore[no-untyped-def]
        renders.append(fmt)
        return real(rows, name, fmt)

    monkeypatch.setattr(reports, "render_progress", counting)

    def page_version() -> str:  # the version the dashboard page puts in the image's URL
        m = re.search(r'progress\.svg\?v=([^"&]+)"', api.get(f"/ui/programs/{pid}").text)
        assert m is not None
        return m.group(1)

    v = page_version()
    first = api.get(f"/programs/{pid}/progress.svg", params={"v": v})
    second = api.get(f"/programs/{pid}/progress.svg", params={"v": v})
    assert first.status_code == second.status_code == 200 and first.content == second.content
    assert first.headers["content-type"].startswith("image/svg+xml")
    assert "immutable" in first.headers["cache-control"] and "max-age=31536000" in first.headers["cache-control"]
    assert "private" in first.headers["cache-control"]
    assert renders == ["svg"], "the second request with the same version re-rendered"
    # no version, or one that is not current: the current plot (still the cached render), never cacheable
    for params in ({}, {"v": "0-0-0"}):
        r = api.get(f"/programs/{pid}/progress.svg", params=params)
        assert r.status_code == 200 and r.content == first.content and r.headers["cache-control"] == "no-store"
    assert renders == ["svg"]
    assert api.get(f"/programs/{pid}/progress.png", params={"v": v}).content[:4] == b"\x89PNG"
    assert renders == ["svg", "png"]
    # a finished run is a new version: rendered again, once
    _finished_runs(pid, 1)
    v2 = page_version()
    assert v2 != v
    for _ in range(2):
        r = api.get(f"/programs/{pid}/progress.svg", params={"v": v2})
        assert "immutable" in r.headers["cache-control"] and r.content != first.content
    assert renders == ["svg", "png", "svg"]
    assert api.get(f"/programs/{pid}/progress.svg", params={"v": "<script>"}).status_code == 422
    # the live fragment carries the same version the route computes (else every reload is no-store)
    with session_scope() as s:
        current = reports.chart_version(s, pid)
    assert current == v2 and f'data-chart-v="{v2}"' in api.get(f"/ui/programs/{pid}/live").text


def test_thinning_keeps_every_kept_point_and_each_columns_lowest_discard() -> None:
    import random

    from farm.reports import Row, progress_figure, thin_points

    rng = random.Random(1)
    pts = [(i, 1.0 + rng.random() * 0.01) for i in range(1, 50_001)]
    thin = thin_points(pts, 50_000, columns=800, limit=3000)
    assert len(thin) <= 3 * 800 and set(thin) <= set(pts)
    width = 50_000 / 800
    for col in range(800):
        group = [p for p in pts if int((p[0] - 1) / width) == col]
        assert min(group, key=lambda p: p[1]) in thin
        assert max(group, key=lambda p: p[1]) in thin
    assert thin_points(pts[:3000], 3000) == pts[:3000]  # below the limit nothing is dropped
    rows = [Row(i, "c", v, 0.0, "keep" if i % 97 == 0 else "discard", "d") for i, v in pts]
    fig = progress_figure(rows, "t")
    kept, discarded = ([c for c in fig.axes[0].collections if c.get_label() == label]
                       for label in ("kept", "discarded"))
    assert len(kept[0].get_offsets()) == sum(1 for r in rows if r.status == "keep")  # exact
    assert len(discarded[0].get_offsets()) <= 2400


def test_the_program_list_takes_as_many_statements_for_thirty_programs_as_for_one(sqlite_url: str) -> None:
    # baseline_val_bpb ran twice per program (31 programs: 35 statements, polled every 2 s by each viewer)
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    from api import crud
    from farm.db import make_engine
    from farm.models import Decision, ExperimentRole, ExperimentStatus, Result
    from tests.factories import make_experiment, make_program

    engine = make_engine(sqlite_url)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda _c, _cur, stmt, *_: statements.append(stmt))

    def add(session: Session, slug: str, base: float) -> None:
        p = make_program(session, slug)
        for i, (role, status, commit, val) in enumerate([
                (ExperimentRole.baseline, ExperimentStatus.crashed, "a", None),  # not measured: not the start
                (ExperimentRole.baseline, ExperimentStatus.succeeded, "b", base),
                (ExperimentRole.baseline, ExperimentStatus.succeeded, "b", base + 0.002),
                (ExperimentRole.candidate, ExperimentStatus.succeeded, "c", base - 0.5),
                (ExperimentRole.baseline, ExperimentStatus.succeeded, "c", base - 0.4)]):  # a later head
            e = make_experiment(session, p, status=status, role=role, commit_sha=commit * 40, content_hash=f"{i}",
                                decision=Decision.keep if role == ExperimentRole.candidate else None)
            session.add(Result(experiment_id=e.id, outcome=status, val_bpb=val))

    def listed() -> tuple[int, dict[str, float | None]]:
        statements.clear()
        with Session(engine) as s:
            out = crud.list_programs(s)
        return len(statements), {p.slug: p.baseline_val_bpb for p in out}

    with Session(engine) as s:
        add(s, "p0", 1.0)
        make_program(s, "empty")
        s.commit()
    one, values = listed()
    assert values == {"p0": pytest.approx(1.001), "empty": None}
    with Session(engine) as s:
        for n in range(1, 29):
            add(s, f"p{n}", 1.0 + n)
        s.commit()
    thirty, values = listed()
    assert len(values) == 30 and values["empty"] is None
    assert all(values[f"p{n}"] == pytest.approx(1.001 + n) for n in range(29))
    assert thirty == one, f"{one} statements for 2 programs, {thirty} for 30"
    engine.dispose()


def test_paging_by_cursor_neither_repeats_nor_skips_rows_while_runs_arrive(api) -> None:  # type: ignore[no-untyped-def]
    # with ?offset= every run that arrived between two pages pushed a row of the first onto the second
    from farm.db import session_scope
    from tests.factories import make_experiment, make_program

    with session_scope() as s:
        p = make_program(s, "paged")
        ids = [make_experiment(s, p).id for _ in range(120)]
        pid = p.id
    url = f"/programs/{pid}/experiments"
    first = api.get(url, params={"limit": 50}).json()
    with session_scope() as s:
        p = s.get(type(p), pid)
        for _ in range(5):
            make_experiment(s, p)
    seen = [e["id"] for e in first["items"]]
    cursor = seen[-1]
    while True:
        page = api.get(url, params={"limit": 50, "before_id": cursor}).json()
        got = [e["id"] for e in page["items"]]
        assert not set(got) & set(seen), f"rows repeated: {sorted(set(got) & set(seen))}"
        seen += got
        if page["next_before_id"] is None:
            break
        assert page["next_before_id"] == got[-1]
        cursor = page["next_before_id"]
    assert first["next_before_id"] == first["items"][-1]["id"]
    assert seen == sorted(ids, reverse=True), "rows skipped or out of order"
    assert page["total"] == 125 and len(got) == 20  # the last page says so: no cursor to an empty page
    # the offset still works, and a cursor with any other order is refused
    assert [e["id"] for e in api.get(url, params={"limit": 2, "offset": 5}).json()["items"]] == [ids[-1], ids[-2]]
    r = api.get(url, params={"before_id": 10, "sort": "val_bpb"})
    assert r.status_code == 422 and "before_id" in r.json()["detail"]


def test_the_dashboard_pager_walks_by_cursor(api) -> None:  # type: ignore[no-untyped-def]
    from farm.db import session_scope
    from tests.factories import make_experiment, make_program

    with session_scope() as s:
        p = make_program(s, "pager")
        ids = [make_experiment(s, p).id for _ in range(120)]
        pid = p.id
    top = api.get(f"/ui/programs/{pid}").text
    older = re.search(r'href="\?before_id=(\d+)">older', top)
    assert older is not None and int(older.group(1)) == ids[-50]
    assert "1–50 of 120" in top and "← newer" not in top
    with session_scope() as s:
        make_experiment(s, s.get(type(p), pid))  # arrives while the reader looks at page two
    second = api.get(f"/ui/programs/{pid}/live", params={"before_id": older.group(1)}).text
    rows = [int(x) for x in re.findall(r'<tr class="link" data-exp="(\d+)"', second)]
    assert rows == ids[-51:-101:-1]  # the rows the first page's link promised, not shifted by the arrival
    assert "52–101 of 121" in second
    newer = re.search(r'href="\?(before_id=\d+)?">← newer', second)
    assert newer is not None and newer.group(1) == f"before_id={ids[-1] + 1}"  # the 50 runs just above
    page = api.get(f"/ui/programs/{pid}", params={"before_id": older.group(1)}).text
    assert f'live?offset=0&amp;before_id={older.group(1)}"' in page  # it polls the same rows


def test_a_page_sorted_by_created_at_walks_an_index(sqlite_url: str) -> None:
    # without an index on (program_id, created_at) the page sorted the whole program: 174 ms at 100k runs
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    from api import crud
    from farm.db import make_engine
    from tests.factories import make_experiment, make_program

    engine = make_engine(sqlite_url)
    with Session(engine) as s:
        p = make_program(s, "sorted")
        for _ in range(3):
            make_experiment(s, p)
        s.commit()
        pid = p.id
    seen: list[tuple[str, Any]] = []
    event.listen(engine, "before_cursor_execute", lambda _c, _cur, stmt, params, *_: seen.append((stmt, params)))
    with Session(engine) as s:
        page = crud.list_experiments(s, program_id=pid, sort="created_at", limit=2)
    assert len(page.items) == 2
    stmt, params = next((st, pa) for st, pa in seen if "ORDER BY experiments.created_at" in st)
    with engine.connect() as conn:
        plan = " | ".join(str(r[-1]) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {stmt}", params))
    engine.dispose()
    assert "ix_experiments_program_created" in plan and "TEMP B-TREE FOR ORDER BY" not in plan, plan


def test_a_chart_version_names_its_program_not_only_its_counts() -> None:
    """Found by review: the version was the counts alone, which start again in a new database (a second `farm demo`
    on the same address), and its program 1 got the first one's charts, cached as immutable for a year."""
    from datetime import UTC, datetime

    from farm import reports

    first, second = datetime(2026, 11, 27, 17, 0, tzinfo=UTC), datetime(2026, 11, 27, 17, 5, tzinfo=UTC)
    assert reports.version_key({}, {}, first) != reports.version_key({}, {}, second)
    assert reports.version_key({}, {}, first) == reports.version_key({}, {}, first.replace(tzinfo=None))
