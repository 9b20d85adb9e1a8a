"""Workers: who is running what, how far along, and whether it is still alive."""

from __future__ import annotations

from fastapi import APIRouter

from api import crud, errors
from api.deps import ReadAccess, SessionDep, SettingsDep
from api.schemas import WorkerPublic

router = APIRouter(prefix="/workers", tags=["workers"])


@router.get("", response_model=list[WorkerPublic], responses=errors.AUTH,
            summary="Workers with their current experiment and progress; alive/stale by the database clock")
def list_(session: SessionDep, settings: SettingsDep, _: ReadAccess) -> list[WorkerPublic]:
    return crud.list_workers(session, heartbeat_interval=settings.heartbeat_interval)
