"""The CLI's REST client: FARM_API_URL + FARM_API_TOKEN, and every failure as one clear line."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from cli.errors import CLIError
from farm.settings import get_settings
from farm.tokens import plain_token_problem


class ApiError(CLIError):
    """The API answered with an error status (the message is the line to print)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def segment(value: str) -> str:
    """`value` (a program id or slug as typed) as one URL path segment. Pasted in as typed, `1?x=1` or `1#x` cut the
    path short and the CLI read the wrong answer (found by review); every dot is escaped too, or httpx resolves a
    `..` against the path."""
    return quote(value, safe="").replace(".", "%2E")


def _saved_token(home: Path) -> str:
    """The token `farm up` saved for this farm home (FARM_HOME/api-token), if any."""
    try:
        return (home / "api-token").read_text().strip()
    except OSError:
        return ""


class Api:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0) -> None:
        s = get_settings()
        self.url = (url or s.resolved_api_url).rstrip("/")
        self.token_source = "the token you gave"
        if token is None:
            token = s.api_token.get_secret_value()
            self.token_source = "FARM_API_TOKEN"
            if not token:
                token = _saved_token(s.home)
                self.token_source = (f"the token in {s.home / 'api-token'} (kept by `farm up`)" if token
                                     else "a request without a token (no FARM_API_TOKEN, no token file)")
        problem = plain_token_problem(token) if token else None
        if problem is not None:  # a pasted "…" was a UnicodeEncodeError traceback in httpx (found by review)
            raise CLIError(f"{self.token_source} {problem}: set FARM_API_TOKEN to a token from "
                           "`farm token create NAME`, copied as printed")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        except httpx.InvalidURL as exc:  # not an HTTPError: request() would not catch it
            raise CLIError(f"the API URL {self.url!r} is not valid ({exc}): check FARM_API_URL") from None

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.ConnectError:
            raise CLIError(f"cannot reach the API at {self.url} (is `farm api` running? set FARM_API_URL)") from None
        except httpx.TimeoutException:
            raise CLIError(f"the API at {self.url} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise CLIError(f"talking to the API at {self.url} failed: {exc}") from None
        if r.status_code == 401:
            raise CLIError(f"401 unauthorized by {self.url}: it refused {self.token_source}; set FARM_API_TOKEN "
                           "to a token from `farm token create NAME`" + (f" ({_detail(r)})" if _detail(r) else ""))
        if 300 <= r.status_code < 400:  # not followed; read as success, it printed empty tables (found by review)
            raise CLIError(self._redirected(r, path))
        if not r.is_success:
            raise ApiError(f"{r.status_code} {r.reason_phrase}: {_detail(r) or r.text[:200]}", r.status_code)
        # every caller reads JSON: anything else is not the farm's API (a web server's page, a proxy's)
        kind = r.headers.get("content-type", "").split(";")[0].strip()
        if kind != "application/json":
            raise CLIError(f"the API at {self.url} answered {method} {path} with {kind or 'no content type'}, not "
                           "JSON: is FARM_API_URL the farm's API?")
        try:
            return r.json()
        except ValueError:
            raise CLIError(f"the API at {self.url} answered {method} {path} with invalid JSON") from None

    def _redirected(self, r: httpx.Response, path: str) -> str:
        location = r.headers.get("location")
        if not location:
            return f"the API at {self.url} answered {r.status_code} {r.reason_phrase} without saying where to"
        target = r.url.join(location)
        # the address to use is the target less the path asked for, when the server kept that path
        where = str(target.copy_with(query=None, fragment=None))
        base = where[:-len(path)] if path and where.endswith(path) else ""
        return (f"the API at {self.url} redirected to {target}; set FARM_API_URL to "
                + (base if base else "the API's own address"))

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.request("POST", path, **kw)


def _detail(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return ""
    detail = body.get("detail") if isinstance(body, dict) else None
    return detail if isinstance(detail, str) else ""
