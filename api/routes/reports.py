"""Reports: results.tsv in autoresearch's format and the progress plot (farm/reports.py)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from api import errors
from api.deps import ReadAccess, SessionDep
from api.routes.programs import ProgramRef, load_program
from farm import reports

router = APIRouter(prefix="/programs/{program_id}", tags=["reports"])
NO_STORE = {"Cache-Control": "no-store"}


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


@router.get("/progress.svg", response_class=SVGResponse, responses=_docs("image/svg+xml"),
            summary="Progress plot: val_bpb per experiment, kept ones joined as the running best")
def progress_svg(program_id: ProgramRef, session: SessionDep, _: ReadAccess) -> Response:
    program = load_program(session, program_id)
    return SVGResponse(reports.progress_image(session, program, "svg"), headers=NO_STORE)


@router.get("/progress.png", response_class=PNGResponse, responses=_docs("image/png"),
            summary="Progress plot as PNG")
def progress_png(program_id: ProgramRef, session: SessionDep, _: ReadAccess) -> Response:
    program = load_program(session, program_id)
    return PNGResponse(reports.progress_image(session, program, "png"), headers=NO_STORE)
