"""API bearer tokens: created once (the plain token is shown to the person and never stored),
kept as a sha256 digest, looked up by that digest on every request.

A token is 32 random bytes, so a plain (unsalted) sha256 is enough: there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from farm.db import as_utc
from farm.models import ApiToken, utcnow

TOKEN_PREFIX = "rf_"
TOUCH_EVERY = timedelta(minutes=1)  # last_used_at is a hint; do not write on every request
NAME_MAX = 100  # api_tokens.name is String(100)
PLAIN_MAX = 200  # longer is refused unread: no token this farm makes comes near it


class TokenError(ValueError):
    pass


@dataclass(frozen=True)
class NewToken:
    token: ApiToken
    plain: str  # shown once


def plain_token_problem(plain: str) -> str | None:
    """Why `plain` can never work as a bearer token, or None: what verify_token refuses unread. `farm up` checks a
    FARM_API_TOKEN it is about to register, and the CLI the token it is about to send, against the same rule."""
    if not plain:
        return "is empty"
    if len(plain) > PLAIN_MAX:
        return f"is longer than {PLAIN_MAX} characters"
    # an HTTP header carries ASCII only: a pasted ellipsis or a control character can never reach the API intact
    for i, ch in enumerate(plain, 1):
        if not ch.isascii():
            return f"contains a non-ASCII character (U+{ord(ch):04X} at position {i})"
        if not ch.isprintable():
            return f"contains a control character (U+{ord(ch):04X} at position {i})"
    return None


def hash_token(plain: str) -> str:
    return hashlib.sha256(plain.encode("utf-8", "surrogatepass")).hexdigest()


def create_token(session: Session, *, name: str) -> NewToken:
    name = name.strip()
    if not name or len(name) > NAME_MAX:
        raise TokenError(f"a token name must be 1 to {NAME_MAX} characters")
    taken = session.execute(select(ApiToken).where(ApiToken.name == name)).scalar_one_or_none()
    if taken is not None and not taken.revoked:
        raise TokenError(f"a token named {name!r} already exists (revoke it first or pick another name)")
    if taken is not None:
        _retire_name(session, taken)
    plain = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(name=name, token_hash=hash_token(plain), prefix=plain[:10])
    session.add(row)
    session.flush()
    return NewToken(token=row, plain=plain)


def _retire_name(session: Session, row: ApiToken) -> None:
    """Free a revoked token's name for a new token: the unique name column would otherwise refuse the name
    for good. The row stays, renamed `NAME (revoked #ID)`, so `farm token list` still shows what existed."""
    n = 1
    while True:
        suffix = f" (revoked #{row.id}{'' if n == 1 else f'.{n}'})"
        new = row.name[:NAME_MAX - len(suffix)] + suffix
        if session.execute(select(ApiToken.id).where(ApiToken.name == new)).first() is None:
            break
        n += 1
    row.name = new
    session.flush()  # before the new row claims the old name


def verify_token(session: Session, *, plain: str) -> ApiToken | None:
    """The live token matching `plain`, or None. Stamps last_used_at at most once a minute."""
    if plain_token_problem(plain) is not None:
        return None
    row = session.execute(
        select(ApiToken).where(ApiToken.token_hash == hash_token(plain), ApiToken.revoked.is_(False))
    ).scalar_one_or_none()
    if row is None:
        return None
    # the local clock is fine here: last_used_at is a hint for people, never a staleness decision
    if row.last_used_at is None or datetime.now(UTC) - as_utc(row.last_used_at) > TOUCH_EVERY:
        session.execute(update(ApiToken).where(ApiToken.id == row.id).values(last_used_at=utcnow()))
    return row


def revoke_token(session: Session, *, name: str) -> bool:
    res = session.execute(update(ApiToken).where(ApiToken.name == name, ApiToken.revoked.is_(False))
                          .values(revoked=True))
    return bool(getattr(res, "rowcount", 0))


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.execute(select(ApiToken).order_by(ApiToken.id)).scalars())
