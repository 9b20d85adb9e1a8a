"""Programs: create, list, read (with the figures a person watches), pause / resume / stop."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status
from sqlalchemy.orm import Session

from api import crud, errors
from api.deps import CurrentToken, ReadAccess, SessionDep
from api.schemas import ProgramCreate, ProgramDetail, ProgramPublic, ProgramSummary
from farm.models import Program
from farm.programs import ProgramError
from farm.templates import TemplateError

router = APIRouter(prefix="/programs", tags=["programs"])

ProgramRef = Annotated[str, Path(description="Numeric id or slug", max_length=100,
                                 examples=["1", "tiny-lr-sweep"])]


def load_program(session: Session, ref: str) -> Program:
    program = crud.get_program(session, ref=ref)
    if program is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no program {ref!r}")
    return program


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ProgramPublic,
             responses=errors.WRITE, summary="Submit a research program")
def create(body: ProgramCreate, session: SessionDep, token: CurrentToken) -> ProgramPublic:
    try:
        program = crud.add_program(session, body=body)
    except (ProgramError, TemplateError) as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"body: {exc}") from None
    session.commit()
    return ProgramPublic.model_validate(program)


@router.get("", response_model=list[ProgramSummary], responses=errors.AUTH, summary="List programs")
def list_(session: SessionDep, _: ReadAccess) -> list[ProgramSummary]:
    return crud.list_programs(session)


@router.get("/{program_id}", response_model=ProgramDetail, responses={**errors.READ, **errors.NOT_FOUND},
            summary="A program with its best result, noise floor, counts and spend")
def read(program_id: ProgramRef, session: SessionDep, _: ReadAccess) -> ProgramDetail:
    return crud.program_detail(session, program=load_program(session, program_id))


def _move(action: str, program_id: str, session: Session) -> ProgramPublic:
    program = load_program(session, program_id)
    changed, program_after = crud.move_program(session, program_id=program.id, action=action)
    assert program_after is not None
    if not changed:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"cannot {action} program {program.slug}: it is {program_after.status.value}")
    session.commit()
    return ProgramPublic.model_validate(program_after)


MOVE_DOCS: errors.Responses = {**errors.READ, **errors.NOT_FOUND, **errors.CONFLICT}


@router.post("/{program_id}/pause", response_model=ProgramPublic, responses=MOVE_DOCS,
             summary="Pause: no new candidates are queued; running ones finish")
def pause(program_id: ProgramRef, session: SessionDep, _: CurrentToken) -> ProgramPublic:
    return _move("pause", program_id, session)


@router.post("/{program_id}/resume", response_model=ProgramPublic, responses=MOVE_DOCS,
             summary="Resume a paused program")
def resume(program_id: ProgramRef, session: SessionDep, _: CurrentToken) -> ProgramPublic:
    return _move("resume", program_id, session)


@router.post("/{program_id}/stop", response_model=ProgramPublic, responses=MOVE_DOCS,
             summary="Stop for good (a stopped program cannot be resumed)")
def stop(program_id: ProgramRef, session: SessionDep, _: CurrentToken) -> ProgramPublic:
    return _move("stop", program_id, session)
