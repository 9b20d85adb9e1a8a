"""The CLI's REST client: FARM_API_URL + FARM_API_TOKEN, and every failure as one clear line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from cli.errors import CLIError
from farm.settings import get_settings


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
        if r.status_code >= 400:
            raise CLIError(f"{r.status_code} {r.reason_phrase}: {_detail(r) or r.text[:200]}")
        if r.headers.get("content-type", "").startswith("application/json"):
            return r.json()
        return r.content

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
