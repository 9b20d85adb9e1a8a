"""Dependencies every route shares: the database session, the settings, and the bearer token.

Auth model: every write needs a live token (Authorization: Bearer ..., or the dashboard's HttpOnly
cookie set by the login form); reads need one too unless FARM_PUBLIC_DASHBOARD opts in (then a wrong
bearer token is still refused, and a stale cookie counts as none).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from farm.db import get_engine, session_scope
from farm.models import ApiToken
from farm.settings import Settings
from farm.tokens import verify_token

COOKIE = "farm_token"
bearer = HTTPBearer(auto_error=False, description="A token from `farm token create NAME`")


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    with session_scope(get_engine(settings)) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def presented_token(request: Request, creds: HTTPAuthorizationCredentials | None) -> str | None:
    if creds is not None and creds.credentials:
        return creds.credentials
    return request.cookies.get(COOKIE) or None


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"})


def require_token(request: Request, session: SessionDep,
                  creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> ApiToken:
    plain = presented_token(request, creds)
    if plain is None:
        raise _unauthorized("missing bearer token (create one with `farm token create NAME`)")
    token = verify_token(session, plain=plain)
    if token is None:
        raise _unauthorized("invalid or revoked token")
    return token


def read_access(request: Request, session: SessionDep, settings: SettingsDep,
                creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> ApiToken | None:
    """A token for reads, unless the dashboard is public (then a token is optional, but a wrong one is 401)."""
    if settings.public_dashboard and (creds is None or not creds.credentials):
        # Only the dashboard's cookie, if anything: a stale one is ignored, as the public page itself
        # ignores it, so that the plot and results.tsv the page links to load for the same browser.
        plain = request.cookies.get(COOKIE)
        return verify_token(session, plain=plain) if plain else None
    return require_token(request, session, creds)


CurrentToken = Annotated[ApiToken, Depends(require_token)]
ReadAccess = Annotated[ApiToken | None, Depends(read_access)]
