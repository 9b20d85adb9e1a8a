"""API tokens (farm/tokens.py) on the embedded SQLite store."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from farm.tokens import TokenError, create_token, list_tokens, revoke_token, verify_token


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[Engine]:
    from farm.db import make_engine

    eng = make_engine(sqlite_url)
    yield eng
    eng.dispose()


def test_a_revoked_name_can_be_reused(engine: Engine) -> None:
    # `farm token revoke alice` then `farm token create alice` said "already exists (revoke it first ...)"
    with Session(engine) as s, s.begin():
        old = create_token(s, name="alice").plain
    with Session(engine) as s, s.begin():
        assert revoke_token(s, name="alice")
    with Session(engine) as s, s.begin():
        new = create_token(s, name="alice").plain
    with Session(engine) as s, s.begin():
        assert verify_token(s, plain=old) is None
        live = verify_token(s, plain=new)
        assert live is not None and live.name == "alice"
        rows = list_tokens(s)
        assert len(rows) == 2  # the revoked row is kept, for the record
        assert [r.revoked for r in rows] == [True, False]
        assert rows[0].name != "alice" and rows[0].name.startswith("alice")
    with Session(engine) as s, s.begin():  # revoking alice now means the new token
        assert revoke_token(s, name="alice")
        assert verify_token(s, plain=new) is None
        create_token(s, name="alice")  # and the name is free again


def test_a_live_name_is_still_refused(engine: Engine) -> None:
    with Session(engine) as s, s.begin():
        create_token(s, name="bob")
    with Session(engine) as s, s.begin(), pytest.raises(TokenError, match="already exists"):
        create_token(s, name="bob")


def test_a_long_revoked_name_is_renamed_within_the_column(engine: Engine) -> None:
    name = "n" * 100
    with Session(engine) as s, s.begin():
        create_token(s, name=name)
        assert revoke_token(s, name=name)
        create_token(s, name=name)
        assert all(len(r.name) <= 100 for r in list_tokens(s))


def test_a_token_no_request_can_carry_is_refused_unread(engine: Engine) -> None:
    # one rule for verify_token, `farm up`'s FARM_API_TOKEN and the CLI (found by review: `farm up` registered a
    # token over 200 characters that verify_token then always refused)
    from farm.models import ApiToken
    from farm.tokens import hash_token, plain_token_problem

    assert plain_token_problem("rf_" + "x" * 43) is None
    assert plain_token_problem("") == "is empty"
    assert plain_token_problem("x" * 201) == "is longer than 200 characters"
    assert plain_token_problem("rf_abc…") == "contains a non-ASCII character (U+2026 at position 7)"
    assert plain_token_problem("rf_a\tb") == "contains a control character (U+0009 at position 5)"
    with Session(engine) as s, s.begin():
        for plain in ("x" * 201, "rf_abcdefghijklmnop…"):
            s.add(ApiToken(name=plain[-5:], token_hash=hash_token(plain), prefix=plain[:10]))
    with Session(engine) as s, s.begin():
        assert verify_token(s, plain="x" * 201) is None and verify_token(s, plain="rf_abcdefghijklmnop…") is None
