"""Dependencies every route shares: the database session, the settings, and the bearer token.

Auth model: every write needs a live token (Authorization: Bearer ..., or the dashboard's HttpOnly
cookie set by the login form, for a write only from the dashboard's own pages); reads need one too unless FARM_PUBLIC_DASHBOARD opts in (then a wrong
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


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def cross_site_write(request: Request) -> str | None:
    """Why a write carried by the dashboard's cookie did not come from the dashboard's own pages, or None. SameSite
    keeps the cookie from other sites, but another port or subdomain of the same host is the same site: a page there
    could POST a plain form to /programs/1/stop with the cookie (found by review). Browsers say where a request
    comes from (Sec-Fetch-Site, else Origin); a client that says neither is not a browser page."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return None if site in ("same-origin", "none") else f"Sec-Fetch-Site: {site}"
    origin = request.headers.get("origin")
    if origin is None:
        return None
    host = request.headers.get("host", "")
    # scheme and host of the Origin against the Host header (a TLS proxy in front may speak http to the API)
    return None if origin.split("://", 1)[-1].rstrip("/") == host else f"Origin: {origin[:200]}"


def require_token(request: Request, session: SessionDep,
                  creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> ApiToken:
    plain = presented_token(request, creds)
    if plain is None:
        raise _unauthorized("missing bearer token (create one with `farm token create NAME`)")
    if (creds is None or not creds.credentials) and request.method not in SAFE_METHODS:
        why = cross_site_write(request)
        if why is not None:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"a write with the dashboard's cookie from another page "
                                                           f"({why}) is refused: send a bearer token instead")
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
