"""Experiments: a program's runs (filtered, sorted, paged) and one run in full."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, Query, status

from api import crud, errors
from api.deps import ReadAccess, SessionDep, SettingsDep
from api.routes.programs import ProgramRef, load_program
from api.schemas import ExperimentDetail, ExperimentPage
from farm.models import Decision, ExperimentRole, ExperimentStatus

router = APIRouter(tags=["experiments"])


@router.get("/programs/{program_id}/experiments", response_model=ExperimentPage,
            responses={**errors.READ, **errors.NOT_FOUND}, summary="A program's experiments, newest first")
def list_(program_id: ProgramRef, session: SessionDep, _: ReadAccess,
          status_: Annotated[list[ExperimentStatus] | None,
                             Query(alias="status", description="Keep these statuses (repeatable)")] = None,
          decision: Annotated[Decision | None, Query()] = None,
          role: Annotated[ExperimentRole | None, Query()] = None,
          sort: Annotated[crud.SortKey, Query(description="Sort key")] = "id",
          order: Annotated[Literal["asc", "desc"], Query()] = "desc",
          limit: Annotated[int, Query(ge=1, le=500)] = 50,
          offset: Annotated[int, Query(ge=0, le=10_000_000, description=(
              "Rows to skip. Arrivals shift an offset page; prefer before_id for the newest-first order"))] = 0,
          before_id: Annotated[int | None, Query(ge=1, le=crud.MAX_ID, description=(
              "Keyset cursor (sort=id, order=desc only): experiments with a smaller id, so pages do not repeat "
              "or skip rows as new ones arrive. Take it from the previous page's next_before_id"))] = None,
          ) -> ExperimentPage:
    program = load_program(session, program_id)
    try:
        return crud.list_experiments(session, program_id=program.id, status=status_ or (), decision=decision,
                                     role=role, sort=sort, order=order, limit=limit, offset=offset,
                                     before_id=before_id)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"query.before_id: {exc}") from None


@router.get("/experiments/{experiment_id}", response_model=ExperimentDetail,
            responses={**errors.READ, **errors.NOT_FOUND},
            summary="One experiment: diff, metrics, decision and statistics, log tail, worker, timings")
def read(experiment_id: Annotated[int, Path(ge=1, le=crud.MAX_ID)], session: SessionDep, _: ReadAccess,
         settings: SettingsDep) -> ExperimentDetail:
    detail = crud.experiment_detail(session, experiment_id=experiment_id,
                                    heartbeat_interval=settings.heartbeat_interval)
    if detail is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no experiment {experiment_id}")
    return detail
