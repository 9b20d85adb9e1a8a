"""The dashboard: server-rendered pages (Jinja2) that refresh themselves by polling HTML fragments.

One rendering path: a page includes its fragment templates, and the small vendored script in
static/app.js re-fetches the same fragments every two seconds and swaps them in. Forms post JSON
to the REST API itself, so the dashboard validates exactly as the API does.

Browser auth: a token typed once into /login is kept in an HttpOnly, SameSite=Strict cookie (so
no other site can make the browser use it); pages without it redirect to /login unless the
deployment set FARM_PUBLIC_DASHBOARD.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Form, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from api import crud
from api.deps import COOKIE, SessionDep, SettingsDep
from farm import reports
from farm.db import as_utc
from farm.models import ApiToken
from farm.programs import PROFILES
from farm.settings import Settings
from farm.tokens import verify_token

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).resolve().parent.parent / "templates")
PAGE = 50


def _bpb(v: float | None) -> str:
    return f"{v:.6f}" if v is not None else "–"


def _delta(v: float | None) -> str:
    return f"{v:+.6f}" if v is not None else "–"


def _ago(v: datetime | None) -> str:
    if v is None:
        return "–"
    s = max(0, int((datetime.now(UTC) - as_utc(v)).total_seconds()))
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m ago"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m ago"
    return f"{s // 86400}d ago"


def _diff_class(line: str) -> str:
    if line.startswith(("+++", "---")):
        return "dh"
    if line.startswith("@@"):
        return "dc"
    return {"+": "da", "-": "dd"}.get(line[:1], "")


templates.env.filters.update(bpb=_bpb, delta=_delta, ago=_ago, diff_class=_diff_class)


class LoginRequired(Exception):
    pass


def viewer(request: Request, session: Session, settings: Settings) -> ApiToken | None:
    """The cookie's token; None on a public dashboard without one. Raises LoginRequired otherwise."""
    plain = request.cookies.get(COOKIE)
    token = verify_token(session, plain=plain) if plain else None
    if token is None and not settings.public_dashboard:
        raise LoginRequired
    return token


def render(request: Request, name: str, ctx: dict[str, Any], code: int = 200) -> HTMLResponse:
    return templates.TemplateResponse(request, name, ctx, status_code=code)


# Pages and fragments take a builder, not a context: it runs only after the login check, so a visitor
# without a token cannot tell an existing program or experiment (redirect) from a missing one (404).
Context = Callable[[], dict[str, Any]]


def page(request: Request, session: Session, settings: Settings, name: str, ctx: Context) -> Response:
    try:
        token = viewer(request, session, settings)
    except LoginRequired:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target)}", status_code=status.HTTP_303_SEE_OTHER)
    try:
        built = ctx()
    except HTTPException as exc:  # a page in a browser: an HTML page, not the API's JSON body (found by review)
        if exc.status_code != status.HTTP_404_NOT_FOUND:
            raise
        return render(request, "not_found.html", {"message": str(exc.detail), "viewer": token,
                                                  "public": settings.public_dashboard}, code=exc.status_code)
    return render(request, name, {**built, "viewer": token, "public": settings.public_dashboard})


def fragment(request: Request, session: Session, settings: Settings, name: str, ctx: Context) -> Response:
    try:
        token = viewer(request, session, settings)
    except LoginRequired:
        return HTMLResponse("login required", status_code=status.HTTP_401_UNAUTHORIZED)
    return render(request, name, {**ctx(), "viewer": token})


def _program_or_404(session: Session, ref: str) -> Any:
    program = crud.get_program(session, ref=ref[:100])
    if program is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no program {ref!r}")
    return program


# ---------------------------------------------------------------- login

def _safe_next(target: str) -> str:
    return target if target.startswith("/") and not target.startswith("//") else "/"


@router.get("/login")
def login_form(request: Request, next: str = "/") -> Response:
    return render(request, "login.html", {"next": _safe_next(next), "error": None, "viewer": None})


@router.post("/login")
def login(request: Request, session: SessionDep, token: Annotated[str, Form(max_length=200)],
          next: Annotated[str, Form(max_length=2000)] = "/") -> Response:
    if verify_token(session, plain=token.strip()) is None:
        return render(request, "login.html", {"next": _safe_next(next), "error": "That token is not valid.",
                                               "viewer": None}, code=status.HTTP_401_UNAUTHORIZED)
    session.commit()
    resp = RedirectResponse(_safe_next(next), status_code=status.HTTP_303_SEE_OTHER)
    resp.set_cookie(COOKIE, token.strip(), max_age=30 * 86400, httponly=True, samesite="strict",
                    secure=request.url.scheme == "https", path="/")
    return resp


@router.post("/logout")
def logout() -> Response:
    resp = RedirectResponse("/login", status_code=status.HTTP_303_SEE_OTHER)
    resp.delete_cookie(COOKIE, path="/")
    return resp


# ---------------------------------------------------------------- pages

@router.get("/")
def programs_page(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    return page(request, session, settings, "programs.html", lambda: {"programs": crud.list_programs(session)})


@router.get("/ui/programs/live")
def programs_live(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    return fragment(request, session, settings, "_programs.html",
                    lambda: {"programs": crud.list_programs(session)})


@router.get("/ui/programs/new")
def new_program_page(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    return page(request, session, settings, "new_program.html", lambda: {"profiles": PROFILES})


def _program_ctx(session: Session, ref: str, offset: int, before_id: int | None) -> dict[str, Any]:
    program = _program_or_404(session, ref)
    detail = crud.program_detail(session, program=program)
    # the pager walks by cursor (before_id), so an older page keeps its rows while new runs arrive;
    # `offset` still works for an old link
    exps = crud.list_experiments(session, program_id=program.id, limit=PAGE, offset=offset, before_id=before_id)
    newer, newer_cursor = 0, None
    if before_id is not None:
        newer, newer_cursor = crud.newer_than(session, program_id=program.id, before_id=before_id, limit=PAGE)
    chart_v = reports.version_key(detail.counts, detail.decisions, program.created_at)
    return {"p": detail, "page": exps, "start": newer + offset, "page_size": PAGE, "before_id": before_id,
            "offset": offset, "newer_cursor": newer_cursor, "chart_v": chart_v}


Offset = Annotated[int, Query(ge=0, le=10_000_000)]
BeforeId = Annotated[int | None, Query(ge=1, le=crud.MAX_ID)]


@router.get("/ui/programs/{ref}")
def program_page(request: Request, ref: str, session: SessionDep, settings: SettingsDep, offset: Offset = 0,
                 before_id: BeforeId = None) -> Response:
    return page(request, session, settings, "program.html", lambda: _program_ctx(session, ref, offset, before_id))


@router.get("/ui/programs/{ref}/live")
def program_live(request: Request, ref: str, session: SessionDep, settings: SettingsDep, offset: Offset = 0,
                 before_id: BeforeId = None) -> Response:
    return fragment(request, session, settings, "_program_live.html",
                    lambda: _program_ctx(session, ref, offset, before_id))


@router.get("/ui/experiments/{experiment_id}")
def experiment_fragment(request: Request, experiment_id: int, session: SessionDep, settings: SettingsDep) -> Response:
    def ctx() -> dict[str, Any]:
        detail = crud.experiment_detail(session, experiment_id=experiment_id,
                                        heartbeat_interval=settings.heartbeat_interval)
        if detail is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no experiment {experiment_id}")
        return {"e": detail}

    return fragment(request, session, settings, "_experiment.html", ctx)


@router.get("/ui/workers")
def workers_page(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    return page(request, session, settings, "workers.html",
                lambda: {"workers": crud.list_workers(session, heartbeat_interval=settings.heartbeat_interval)})


@router.get("/ui/workers/live")
def workers_live(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    return fragment(request, session, settings, "_workers.html",
                    lambda: {"workers": crud.list_workers(session, heartbeat_interval=settings.heartbeat_interval)})
