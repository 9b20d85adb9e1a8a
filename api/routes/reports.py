"""Reports: results.tsv in autoresearch's format and the progress plot (farm/reports.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.orm import Session

from api import errors
from api.chartcache import ChartCache
from api.deps import ReadAccess, SessionDep
from api.routes.programs import ProgramRef, load_program
from farm import reports

router = APIRouter(prefix="/programs/{program_id}", tags=["reports"])
NO_STORE = {"Cache-Control": "no-store"}
# a `?v=` that names the current chart version is a URL whose bytes never change: the browser keeps it
# (private: the dashboard may sit behind a login) and never asks again
IMMUTABLE = {"Cache-Control": "private, max-age=31536000, immutable"}
Version = Annotated[str | None, Query(max_length=64, pattern=r"^[0-9-]+$", description=(
    "The chart version the dashboard shows (`data-chart-v`); with the current one the response is cacheable "
    "for good. Any other value, or none, gets the current plot, not cached."))]


def _docs(media: str, example: str | None = None) -> errors.Responses:
    content: dict[str, object] = {"schema": {"type": "string"}}
    if example:
        content["example"] = example
    return {200: {"content": {media: content}, "description": "OK"},
            **errors.explicit_json({**errors.READ, **errors.NOT_FOUND})}


class TSVResponse(Response):
    media_type = "text/tab-separated-values"


class SVGResponse(Response):
    media_type = "image/svg+xml"


class PNGResponse(Response):
    media_type = "image/png"


@router.get("/results.tsv", response_class=TSVResponse,
            responses=_docs("text/tab-separated-values",
                            "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
                            "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline\n"),
            summary="results.tsv (commit, val_bpb, memory_gb, status, description)")
def results_tsv(program_id: ProgramRef, session: SessionDep, _: ReadAccess) -> Response:
    program = load_program(session, program_id)
    return TSVResponse(reports.results_tsv(session, program), headers={
        **NO_STORE, "Content-Disposition": f'inline; filename="{program.slug}-results.tsv"'})


def _progress(request: Request, session: Session, program_id: str, fmt: str,
              v: str | None) -> tuple[bytes, dict[str, str]]:
    program = load_program(session, program_id)
    current = reports.chart_version(session, program.id)  # read before the rows: the render is never older
    cache: ChartCache = request.app.state.chart_cache
    def draw() -> bytes:
        rows, name = reports.result_rows(session, program), program.name
        # the rows are read: end the transaction before drawing (a second on a large program), since on SQLite
        # every transaction holds the write lock, and workers' heartbeats and results waited for the drawing
        session.commit()
        return reports.render_progress(rows, name, fmt)

    data = cache.get((program.id, fmt, current), draw)
    return data, IMMUTABLE if v == current else NO_STORE


@router.get("/progress.svg", response_class=SVGResponse, responses=_docs("image/svg+xml"),
            summary="Progress plot: val_bpb per experiment, kept ones joined as the running best")
def progress_svg(request: Request, program_id: ProgramRef, session: SessionDep, _: ReadAccess,
                 v: Version = None) -> Response:
    data, headers = _progress(request, session, program_id, "svg", v)
    return SVGResponse(data, headers=headers)


@router.get("/progress.png", response_class=PNGResponse, responses=_docs("image/png"),
            summary="Progress plot as PNG")
def progress_png(request: Request, program_id: ProgramRef, session: SessionDep, _: ReadAccess,
                 v: Version = None) -> Response:
    data, headers = _progress(request, session, program_id, "png", v)
    return PNGResponse(data, headers=headers)
