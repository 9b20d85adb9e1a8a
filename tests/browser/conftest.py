"""Fixtures for tests that talk to a live API server (see tests/apiserver.py)."""

from tests.apiserver import live_api, start_api  # noqa: F401
