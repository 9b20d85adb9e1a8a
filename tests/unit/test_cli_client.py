"""The CLI finds the token `farm up` saved when FARM_API_TOKEN is not set."""

from __future__ import annotations

import pytest

from cli.client import Api
from cli.errors import CLIError


def test_saved_token_used_when_no_env_token(farm_env, tmp_path):
    from pathlib import Path

    home = Path(farm_env["FARM_HOME"])
    (home / "api-token").write_text("rf_saved\n")
    with Api() as api:
        assert api.http.headers["Authorization"] == "Bearer rf_saved"


def test_env_token_wins(farm_env, monkeypatch):
    from pathlib import Path

    from farm.settings import reset_settings_cache

    (Path(farm_env["FARM_HOME"]) / "api-token").write_text("rf_saved\n")
    monkeypatch.setenv("FARM_API_TOKEN", "rf_env")
    reset_settings_cache()
    with Api() as api:
        assert api.http.headers["Authorization"] == "Bearer rf_env"


# ---------------------------------------------------------------- found by review

class _FakeApi:
    """A loopback HTTP server answering every request with one canned response ("{path}" in a header: the path
    asked); it records the paths asked."""

    def __init__(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        fake = self
        self.paths: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                fake.paths.append(self.path)
                self.rfile.read(int(self.headers.get("content-length") or 0))
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v.replace("{path}", self.path))
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_api(farm_env, monkeypatch):  # type: ignore[no-untyped-def]
    """Start a _FakeApi(status, body, headers) and point FARM_API_URL at it."""
    from farm.settings import reset_settings_cache

    started: list[_FakeApi] = []

    def start(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> _FakeApi:
        fake = _FakeApi(status, body, headers)
        started.append(fake)
        monkeypatch.setenv("FARM_API_URL", fake.url)
        monkeypatch.setenv("FARM_API_TOKEN", "rf_" + "x" * 40)
        reset_settings_cache()
        return fake

    yield start
    for fake in started:
        fake.close()


def test_a_redirect_is_an_error_naming_where_to(fake_api, tmp_path):  # type: ignore[no-untyped-def]
    """Found by review: the CLI took any 3xx for success: `farm status` printed empty tables and exited 0,
    `farm leaderboard 1` raised AttributeError and `farm submit` TypeError."""
    from cli.leaderboard import leaderboard
    from cli.status import status
    from cli.submit import submit

    fake_api(301, headers={"location": "https://farm.example.org/api{path}"})
    md = tmp_path / "p.md"
    md.write_text("# p\n")
    for command in (lambda: status(), lambda: leaderboard("1"), lambda: submit(md)):
        with pytest.raises(CLIError) as err:
            command()
        assert "redirected to https://farm.example.org/api/programs" in str(err.value)
        assert str(err.value).endswith("; set FARM_API_URL to https://farm.example.org/api")
    fake_api(302, headers={"location": "/login"})  # somewhere else on the same server: no address to suggest
    with pytest.raises(CLIError, match=r"redirected to http://127\.0\.0\.1:\d+/login; set FARM_API_URL to the API's"):
        status()


def test_an_answer_that_is_not_json_is_an_error(fake_api):  # type: ignore[no-untyped-def]
    from cli.status import status

    fake_api(200, b"<html>hello</html>", {"content-type": "text/html"})
    with pytest.raises(CLIError, match="answered GET /programs with text/html, not JSON"):
        status()
    fake_api(200, b"{not json", {"content-type": "application/json"})
    with pytest.raises(CLIError, match="invalid JSON"):
        status()


def test_a_program_reference_is_one_path_segment(fake_api):  # type: ignore[no-untyped-def]
    """Found by review: `farm leaderboard '1?x=1'` (or `'1#x'`) was pasted into the URL as typed and read program 1's
    answer as the page (KeyError); `farm leaderboard a/b` printed a bare 404."""
    from cli.leaderboard import leaderboard

    fake = fake_api(404, b'{"detail": "Not Found"}', {"content-type": "application/json"})
    for ref, sent in (("1?x=1", "/programs/1%3Fx%3D1"), ("1#x", "/programs/1%23x"), ("a/b", "/programs/a%2Fb"),
                      ("..", "/programs/%2E%2E")):
        with pytest.raises(CLIError) as err:
            leaderboard(ref)
        assert str(err.value) == f"no program {ref!r}: give its id or slug (`farm status` lists them)"
        assert fake.paths[-1] == sent


def test_a_non_ascii_token_is_one_clear_line(farm_env, monkeypatch):  # type: ignore[no-untyped-def]
    """Found by review: a token with a pasted ellipsis made every API command a UnicodeEncodeError traceback."""
    from pathlib import Path

    from farm.settings import reset_settings_cache

    monkeypatch.setenv("FARM_API_TOKEN", "rf_abc…")
    reset_settings_cache()
    with pytest.raises(CLIError, match=r"^FARM_API_TOKEN contains a non-ASCII character \(U\+2026 at position 7\)"):
        Api()
    monkeypatch.delenv("FARM_API_TOKEN")
    reset_settings_cache()
    saved = Path(farm_env["FARM_HOME"]) / "api-token"
    saved.write_text("rf_abc…\n")
    with pytest.raises(CLIError, match=f"^the token in {saved} .* contains a non-ASCII character"):
        Api()
