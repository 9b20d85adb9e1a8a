"""The CLI finds the token `farm up` saved when FARM_API_TOKEN is not set."""

from __future__ import annotations

from cli.client import Api


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
