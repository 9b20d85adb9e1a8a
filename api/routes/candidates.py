"""Candidates: a person's own patch, through the same validation as every proposer's."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from api import crud, errors
from api.deps import CurrentToken, SessionDep
from api.routes.programs import ProgramRef, load_program
from api.schemas import CandidateCreate, ExperimentPublic
from farm.models import ExperimentStatus, ProgramStatus

router = APIRouter(tags=["experiments"])


@router.post("/programs/{program_id}/candidates", status_code=status.HTTP_201_CREATED,
             response_model=ExperimentPublic, responses={**errors.WRITE, **errors.NOT_FOUND, **errors.CONFLICT},
             summary="Inject a candidate patch (422 with the reason when it does not apply or breaks a rule)")
def create(program_id: ProgramRef, body: CandidateCreate, session: SessionDep, _: CurrentToken) -> ExperimentPublic:
    program = load_program(session, program_id)
    # locked until the candidate is stored: a scheduler finishing the program (it cancels what is still proposed, in
    # the transaction that sets the status) either went first and is seen here, or waits and then cancels this one.
    # Unlocked, a candidate stored just after that pass stayed `proposed` for good (found by review)
    session.refresh(program, with_for_update=True)
    if program.status in (ProgramStatus.stopped, ProgramStatus.finished):
        raise HTTPException(status.HTTP_409_CONFLICT, f"program {program.slug} is {program.status.value}")
    exp = crud.add_candidate(session, program=program, body=body)
    if exp.status == ExperimentStatus.invalid:
        reason = exp.status_reason or "invalid candidate"
        session.rollback()
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"body: {reason}")
    session.commit()
    public = crud.experiment_public(session, experiment_id=exp.id)
    assert public is not None
    return public
