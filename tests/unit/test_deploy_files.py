"""The deployment files: docker-compose.yml against the Compose Specification, Dockerfile.gpu
through hadolint, and the promises docs/deploy.md makes about both (services, one distinct GPU
per worker, no secret with a default). No Docker engine is needed: everything here is offline."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile.gpu"
BIN = Path(sys.executable).parent

SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "KEY")
# ${NAME}, ${NAME:?msg}, ${NAME?msg}, ${NAME:-default}, ${NAME-default}
INTERP = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:\?|\?|:-|-)?(?P<rest>[^}]*)\}")


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in the venv: run `make test` (it installs the dev extras)")
    return str(path)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _is_secret(name: str) -> bool:
    return any(word in name.upper() for word in SECRET_WORDS)


def test_compose_validates_against_the_compose_spec() -> None:
    proc = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_is_hadolint_clean() -> None:
    proc = subprocess.run([_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_has_every_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("postgres", "redis", "migrate", "api", "scheduler", "flower"):
        assert name in services, f"service {name} missing"
    assert services["flower"].get("profiles") == ["flower"], "flower must be optional (a profile)"
    assert set(compose["volumes"]) >= {"postgres-data", "farm-repo", "farm-data", "compile-cache"}


def test_postgres_is_healthchecked_and_persistent(compose: dict[str, Any]) -> None:
    pg = compose["services"]["postgres"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in pg["volumes"])


def test_migrate_is_one_shot_and_waits_for_a_healthy_database(compose: dict[str, Any]) -> None:
    services = compose["services"]
    mig = services["migrate"]
    assert mig["command"] == ["alembic", "upgrade", "head"]
    assert mig["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert mig.get("restart") == "no"
    for name, svc in services.items():
        if name in ("api", "scheduler") or name.startswith("worker-"):
            assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name


def _workers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if n.startswith("worker-gpu")}


def test_gpu_workers_reserve_distinct_devices(compose: dict[str, Any]) -> None:
    workers = _workers(compose)
    assert len(workers) >= 2
    seen: list[str] = []
    for name, svc in workers.items():
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        dev = devices[0]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"], name
        assert len(dev["device_ids"]) == 1, f"{name} must pin exactly one GPU"
        seen.append(str(dev["device_ids"][0]))
        assert svc["command"][:2] == ["farm", "worker"], name
        assert svc.get("hostname") == name, f"{name}: hostname keeps worker ids distinct"
    assert len(set(seen)) == len(seen), f"two workers share a GPU: {seen}"


def test_workers_come_from_one_anchor() -> None:
    # the 2 -> 8 GPU recipe in docs/deploy.md relies on every worker merging the same anchor
    text = COMPOSE.read_text()
    assert "x-gpu-worker: &gpu-worker" in text
    blocks = re.findall(r"^  (worker-gpu\d+):\n    <<: \*gpu-worker$", text, flags=re.M)
    assert len(blocks) == len(re.findall(r"^  worker-gpu\d+:", text, flags=re.M)) >= 2


def test_only_the_scheduler_holds_the_farm_repository(compose: dict[str, Any]) -> None:
    holders = [n for n, s in compose["services"].items()
               if any(str(v).startswith("farm-repo:") for v in s.get("volumes", []))]
    assert holders == ["scheduler"]


def test_no_secret_has_a_default() -> None:
    text = COMPOSE.read_text()
    found = set()
    for m in INTERP.finditer(text):
        name, op = m["name"], m["op"]
        if _is_secret(name):
            found.add(name)
            assert op == ":?", f"${{{name}}} must be required (${{{name}:?...}}), not {m.group(0)!r}"
    assert {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "FARM_API_SECRET"} <= found


def test_secret_environment_values_are_never_literals(compose: dict[str, Any]) -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    for name, svc in raw["services"].items():
        env = svc.get("environment") or {}
        items = env.items() if isinstance(env, dict) else (e.partition("=")[::2] for e in env)
        for key, value in items:
            if not _is_secret(key) or value in (None, ""):
                continue  # None: passed through from the host only when set (optional LLM keys)
            value = str(value)
            assert "${" in value, f"{name}: {key} has a literal value"
            for m in INTERP.finditer(value):
                if _is_secret(m["name"]):
                    assert m["op"] == ":?", f"{name}: {key} falls back to a default"


def test_dockerfile_runs_as_numeric_non_root_with_a_cached_dependency_layer() -> None:
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0].startswith("FROM pytorch/pytorch:") and "cuda" in lines[0]
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), users
    copies = [ln for ln in lines if ln.startswith("COPY ")]
    assert copies[0] == "COPY pyproject.toml ./", "dependencies must install before the source is copied"
    first_source_copy = lines.index("COPY . .")
    assert any("pip install" in ln for ln in lines[:first_source_copy]), "no dependency layer before COPY . ."
    assert "bubblewrap" in DOCKERFILE.read_text()
