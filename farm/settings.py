"""One typed settings object for every service, read from FARM_* variables and an optional .env.

With nothing set, the farm runs embedded on one machine: SQLite (WAL) and a filesystem Celery
broker under the farm home, so no server has to be installed.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "changethis", "secret", "dev", "development", "please-change"}
DEV_SECRET = "dev-only-secret"


class SettingsError(ValueError):
    """Raised for a settings value the farm refuses at start-up."""


def default_home() -> Path:
    return Path(os.environ.get("FARM_HOME", "~/.researchfarm")).expanduser()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FARM_", env_file=".env", extra="ignore")

    env: Literal["development", "production"] = "development"
    home: Path = Field(default_factory=default_home)
    database_url: str = ""  # empty: SQLite file under home
    broker_url: str = ""  # empty: filesystem transport under home

    # LLM (litellm model strings: "openai/gpt-4o", "anthropic/claude-...", "openai/local" with api_base)
    llm_model: str = ""
    llm_api_base: str = ""
    llm_api_key: SecretStr = SecretStr("")
    llm_temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    llm_max_tokens: int = Field(default=4096, gt=0)
    # the model's context window in tokens, which the prompt is budgeted against; 0: litellm's model map, else
    # 32768. Set it for a local model litellm does not know (SmolLM2: 8192)
    llm_context_tokens: int = Field(default=0, ge=0)
    llm_timeout: float = Field(default=120.0, gt=0)
    llm_concurrency: int = Field(default=4, gt=0)

    heartbeat_interval: float = Field(default=5.0, gt=0)
    max_retries: int = Field(default=2, ge=0)
    # how long a worker keeps trying to write a finished run's result while the database is unreachable: the run
    # cannot be redone for free, so it waits out an outage instead of dropping the result
    record_patience: float = Field(default=3600.0, gt=0)
    scheduler_interval: float = Field(default=1.0, gt=0)
    lookahead: int = Field(default=1, ge=0)

    api_secret: SecretStr = SecretStr(DEV_SECRET)
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8765, gt=0, lt=65536)
    api_url: str = ""  # where the CLI finds the API; empty: http://api_host:api_port
    api_token: SecretStr = SecretStr("")  # the CLI's bearer token
    public_dashboard: bool = False
    max_body_bytes: int = Field(default=1_000_000, gt=0)

    # worker limits
    worker_memory_mb: int = Field(default=0, ge=0)  # 0: half the machine's physical memory
    startup_allowance: float = Field(default=120.0, ge=0)
    # jobs a worker holds at once: 2 starts the next candidate while one trains (worker/gate.py);
    # 0 = the default for the hardware: 2 on a GPU, 1 on a CPU (where start-up competes with training)
    worker_slots: int = Field(default=0, ge=0, le=4)
    sandbox: Literal["auto", "bwrap", "unshare", "none"] = "auto"
    # auto: score each run in a second process from the exported model (worker/runner.py) when the template's
    # harness can; off: evaluate inside the candidate's process, as a template without it always does
    eval_isolation: Literal["auto", "off"] = "auto"

    @field_validator("home", mode="after")
    @classmethod
    def _expand_home(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @field_validator("database_url")
    @classmethod
    def _check_db_url(cls, v: str) -> str:
        if v and v.startswith("postgresql://"):
            # one driver everywhere: psycopg 3
            return "postgresql+psycopg://" + v[len("postgresql://"):]
        if v and not (v.startswith("postgresql+psycopg://") or v.startswith("sqlite")):
            raise ValueError("database_url must be postgresql+psycopg://... or sqlite:///...")
        return v

    @model_validator(mode="after")
    def _refuse_placeholder_secret(self) -> Settings:
        secret = self.api_secret.get_secret_value()
        if self.env != "development" and (secret.lower() in PLACEHOLDER_SECRETS or secret == DEV_SECRET
                                          or len(secret) < 16):
            raise ValueError(
                "FARM_API_SECRET is a placeholder or shorter than 16 characters; set a real secret "
                "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`) outside development mode")
        return self

    # ---- derived locations ----
    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'farm.db'}"

    @property
    def broker(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        return self.home / "broker"

    @property
    def repo_dir(self) -> Path:
        return self.home / "repo"

    @property
    def workdirs(self) -> Path:
        return self.home / "work"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def embedded(self) -> bool:
        return self.db_url.startswith("sqlite")

    @property
    def resolved_api_url(self) -> str:
        host = f"[{self.api_host}]" if ":" in self.api_host else self.api_host  # an IPv6 address (::1)
        return self.api_url or f"http://{host}:{self.api_port}"


def mask_url(url: str) -> str:
    """Hide the password in a database or broker URL for messages and logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    try:
        return Settings()
    except Exception as exc:  # pydantic.ValidationError: reword as one clear line per field
        errors = getattr(exc, "errors", None)
        if callable(errors):
            parts = []
            for e in errors():
                loc = ".".join(str(p) for p in e.get("loc", ())) or "settings"
                name = f"FARM_{loc.upper()}" if loc != "settings" else "settings"
                msg = str(e.get("msg", "")).removeprefix("Value error, ")
                parts.append(f"{name}: {msg}" if name != "settings" else msg)
            raise SettingsError("invalid settings: " + "; ".join(parts)) from None
        raise


def reset_settings_cache() -> None:
    get_settings.cache_clear()
