"""Error bodies: every error is `{"detail": "<one line>"}`; a 422 also lists each error and its
one line names the field (`body.name: Field required`); a database that cannot be reached is a 503,
and anything unexpected a 500 that names only the exception's type."""

from __future__ import annotations

import html
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException

from api.schemas import ErrorPublic
from farm.db import DatabaseUnavailable

log = logging.getLogger(__name__)

Responses = dict[int | str, dict[str, Any]]


def _doc(description: str) -> dict[str, Any]:
    return {"model": ErrorPublic, "description": description}


def explicit_json(responses: Responses) -> Responses:
    """The same error docs spelled out as application/json, for routes whose own response class is not
    JSON (FastAPI would otherwise document their error models under the route's media type)."""
    ref = {"$ref": "#/components/schemas/ErrorPublic"}
    return {code: {"description": doc["description"], "content": {"application/json": {"schema": ref}}}
            for code, doc in responses.items()}


AUTH: Responses = {401: _doc("Missing, wrong or revoked bearer token")}
READ: Responses = {**AUTH, 422: _doc("A query or path parameter is invalid; the detail names it")}
NOT_FOUND: Responses = {404: _doc("No such program, experiment or worker")}
WRITE: Responses = {**AUTH, 413: _doc("Request body over the size limit"),
         422: _doc("Invalid body; the detail names the field")}
CONFLICT: Responses = {409: _doc("The program's state does not allow this")}


def field_path(loc: Any) -> str:
    return ".".join(str(p) for p in loc) if isinstance(loc, list | tuple) else str(loc)


def validation_summary(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        parts.append(f"{field_path(e.get('loc', ()))}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
    return JSONResponse(status_code=422, content=jsonable_encoder(
        {"detail": validation_summary(errors), "errors": errors}))


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return JSONResponse(status_code=exc.status_code, content={"detail": str(exc.detail)},
                        headers=getattr(exc, "headers", None))


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


async def _database(request: Request, exc: Exception) -> Response:
    # a database down or restarting was a plain-text "Internal Server Error" 500 (found by review): it is a 503,
    # worth a retry, and says why in the JSON body every client reads; a browser asking for a page gets a page
    orig = getattr(exc, "orig", None)  # OperationalError: the driver's own message, without SQLAlchemy's SQL
    reason = _first_line(str(orig if orig is not None else exc)) or type(exc).__name__
    log.warning("%s %s: the database is unavailable: %s", request.method, request.url.path, reason)
    path = request.url.path
    if "text/html" in request.headers.get("accept", "") and (path in ("/", "/login") or path.startswith("/ui/")):
        return HTMLResponse(status_code=503, headers={"Retry-After": "5"}, content=(
            "<!doctype html><meta charset=utf-8><title>database unavailable · researchfarm</title>"
            f"<p><b>The farm's database is unavailable</b>: {html.escape(reason)}</p>"
            "<p>Nothing is lost: workers keep their results until it is back. Reload in a moment.</p>"))
    return JSONResponse(status_code=503, content={"detail": f"the database is unavailable: {reason}"},
                        headers={"Retry-After": "5"})


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    # The JSON body every other error has, naming the exception's type only: its message may hold internals.
    # Starlette raises the exception again after this answer, so the server logs its traceback.
    return JSONResponse(status_code=500, content={
        "detail": f"internal server error ({type(exc).__name__}); the server's log has the details"})


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(OperationalError, _database)
    app.add_exception_handler(DatabaseUnavailable, _database)
    app.add_exception_handler(Exception, _internal)
