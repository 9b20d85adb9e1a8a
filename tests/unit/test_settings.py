from __future__ import annotations

import pytest

from farm.settings import Settings, SettingsError, get_settings, mask_url, reset_settings_cache


def test_defaults_are_embedded(tmp_path, monkeypatch):
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    s = Settings()
    assert s.db_url == f"sqlite:///{tmp_path / 'farm.db'}"
    assert s.embedded
    assert s.broker == "filesystem://"


def test_postgres_url_normalised_to_psycopg():
    s = Settings(database_url="postgresql://u:p@h:5432/db")
    assert s.db_url == "postgresql+psycopg://u:p@h:5432/db"


def test_unknown_database_scheme_refused():
    with pytest.raises(ValueError, match="database_url"):
        Settings(database_url="mysql://u@h/db")


@pytest.mark.parametrize("var,value", [("FARM_HEARTBEAT_INTERVAL", "-1"), ("FARM_HEARTBEAT_INTERVAL", "0"),
                                       ("FARM_API_PORT", "70000"), ("FARM_LLM_TEMPERATURE", "9"),
                                       ("FARM_SANDBOX", "chroot")])
def test_bad_values_refused_at_startup(var, value, monkeypatch):
    monkeypatch.setenv(var, value)
    reset_settings_cache()
    with pytest.raises(SettingsError, match=var):
        get_settings()
    reset_settings_cache()


@pytest.mark.parametrize("secret", ["changeme", "dev-only-secret", "short"])
def test_placeholder_secret_refused_outside_development(secret):
    with pytest.raises(ValueError, match="FARM_API_SECRET"):
        Settings(env="production", api_secret=secret)


def test_real_secret_accepted_in_production():
    s = Settings(env="production", api_secret="x" * 32)
    assert s.api_secret.get_secret_value() == "x" * 32


def test_placeholder_secret_fine_in_development():
    assert Settings(env="development").api_secret.get_secret_value()


def test_mask_url_hides_password():
    masked = mask_url("postgresql+psycopg://farm:hunter2@db:5432/farm")
    assert "hunter2" not in masked and "farm:***@db" in masked


def test_the_api_url_of_an_ipv6_host_is_bracketed():
    assert Settings(api_host="::1", api_port=9000).resolved_api_url == "http://[::1]:9000"
    assert Settings(api_host="127.0.0.1", api_port=9000).resolved_api_url == "http://127.0.0.1:9000"
