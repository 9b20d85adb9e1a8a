"""A real uvicorn server for API tests: the app on a free loopback port in a thread of the test
process, a fresh Postgres database (pg_env), a token, and an httpx client speaking real HTTP.

Import the fixtures into a test module: `from tests.apiserver import live_api, start_api  # noqa: F401`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

TINY_TRAIN = '''"""A tiny stand-in for the training script."""
LEARNING_RATE = 0.01  # step size
BATCH_SIZE = 8  # rows per step


def main():
    print("---")
    print("val_bpb: 1.000000")


if __name__ == "__main__":
    main()
'''
TINY_PREPARE = '"""Fixed harness stand-in."""\nTIME_BUDGET = 5\n'


def ensure_template(tmp_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Use the real training template when it is there (branch `template` merged), else a tiny one."""
    from farm import templates

    if (templates.TEMPLATES["default"] / "train.py").exists():
        return
    root = tmp_root / "tiny_template"
    root.mkdir(exist_ok=True)
    (root / "train.py").write_text(TINY_TRAIN)
    (root / "prepare.py").write_text(TINY_PREPARE)
    monkeypatch.setitem(templates.TEMPLATES, "default", root)


@dataclass
class LiveAPI:
    url: str
    token: str
    db_url: str
    settings: Any
    clients: list[httpx.Client] = field(default_factory=list)

    def client(self, token: str | None = "default", **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token if token == 'default' else token}"} if token else {}
        c = httpx.Client(base_url=self.url, headers=headers, timeout=30, **kw)
        self.clients.append(c)
        return c

    def session(self) -> Any:
        from farm.db import get_engine, session_scope

        return session_scope(get_engine(self.settings))


class _Server:
    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def start_api(pg_env: dict[str, str], tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., LiveAPI]]:
    """Factory: start_api(public_dashboard=False, max_body_bytes=...) -> LiveAPI (stopped at teardown)."""
    from api.app import create_app
    from farm.db import get_engine, session_scope
    from farm.settings import Settings
    from farm.tokens import create_token

    ensure_template(tmp_path, monkeypatch)
    started: list[tuple[_Server, LiveAPI]] = []

    def start(**overrides: Any) -> LiveAPI:
        settings = Settings(**overrides)
        from sqlalchemy.exc import OperationalError

        try:
            with session_scope(get_engine(settings)) as s:
                plain = create_token(s, name=f"test-{len(started)}").plain
        except OperationalError:  # a server started against an unreachable database (health tests)
            plain = ""
        server = _Server(create_app(settings)).__enter__()
        live = LiveAPI(url=f"http://127.0.0.1:{server.port}", token=plain, db_url=settings.db_url,
                       settings=settings)
        started.append((server, live))
        return live

    yield start
    for server, live in reversed(started):
        for c in live.clients:
            c.close()
        server.__exit__()


@pytest.fixture
def live_api(start_api: Callable[..., LiveAPI]) -> LiveAPI:
    return start_api()
