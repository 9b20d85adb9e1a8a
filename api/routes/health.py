"""Health (for load balancers: no token) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from api import crud, errors
from api.deps import ReadAccess, SessionDep, SettingsDep
from api.schemas import HealthPublic
from farm.db import DatabaseUnavailable, check_connection, get_engine
from farm.settings import Settings

router = APIRouter(tags=["operations"])


def broker_problem(settings: Settings) -> str | None:
    """None when the broker answers; otherwise one line saying why not."""
    url = settings.broker
    try:
        if url.startswith(("redis://", "rediss://")):
            import redis

            client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
            try:
                client.ping()
            finally:
                client.close()
        elif url.startswith("filesystem"):
            from farm.broker import filesystem_options

            filesystem_options(settings.broker_dir)  # creates and so proves the folders writable
        else:
            from kombu.connection import Connection

            with Connection(url, connect_timeout=2) as conn:  # type: ignore[no-untyped-call]
                conn.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:  # any failure is "unreachable", with its reason
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    return None


@router.api_route("/healthz", methods=["GET", "HEAD"], response_model=HealthPublic,
            responses={503: {"model": HealthPublic, "description": "Database or broker unreachable"}},
            summary="Database and broker reachable (503 otherwise)")
def healthz(settings: SettingsDep) -> JSONResponse:
    try:
        check_connection(get_engine(settings))
        db = "ok"
    except DatabaseUnavailable as exc:
        db = str(exc)
    broker = broker_problem(settings) or "ok"
    ok = db == "ok" and broker == "ok"
    body = HealthPublic(status="ok" if ok else "unavailable", database=db, broker=broker)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


class PrometheusResponse(Response):
    media_type = "text/plain; version=0.0.4"


@router.get("/metrics", response_class=PrometheusResponse, summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "OK"},
                       **errors.explicit_json(errors.AUTH)})
def metrics(session: SessionDep, settings: SettingsDep, _: ReadAccess) -> Response:
    return PrometheusResponse(crud.metrics_text(session, heartbeat_interval=settings.heartbeat_interval))
