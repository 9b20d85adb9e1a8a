"""The deployment files: docker-compose.yml (the head) and docker-compose.workers.yml (worker
hosts) against the Compose Specification, Dockerfile.gpu through hadolint, and the promises
docs/deploy.md makes about them (services, one distinct GPU per worker, worker ids unique per
machine, the sandbox's security options, no secret with a default, a compiler in the image). No
Docker engine is needed: everything here is offline."""

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
WORKERS_COMPOSE = ROOT / "docker-compose.workers.yml"
COMPOSE_FILES = [COMPOSE, WORKERS_COMPOSE]
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


@pytest.fixture(scope="module")
def workers_compose() -> dict[str, Any]:
    return yaml.safe_load(WORKERS_COMPOSE.read_text())


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def _is_secret(name: str) -> bool:
    return any(word in name.upper() for word in SECRET_WORDS)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_validates_against_the_compose_spec(path: Path) -> None:
    proc = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
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


# `hostname: ${FARM_HOST...}-gpuN`: every container's worker id is HOSTNAME:gpu0 (worker/identity.py),
# so the hostname must name the machine as well as the GPU, or two machines share one `workers` row
HOSTNAME = re.compile(r"\$\{FARM_HOST(?P<op>:-|:\?)(?P<rest>[^}]*)\}-gpu(?P<n>\d+)")


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_gpu_workers_reserve_distinct_devices(path: Path) -> None:
    workers = _workers(_load(path))
    assert len(workers) >= 2
    seen: list[str] = []
    hostnames: list[str] = []
    for name, svc in workers.items():
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        dev = devices[0]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"], name
        assert len(dev["device_ids"]) == 1, f"{name} must pin exactly one GPU"
        seen.append(str(dev["device_ids"][0]))
        assert svc["command"][:2] == ["farm", "worker"], name
        m = HOSTNAME.fullmatch(str(svc.get("hostname")))
        assert m, f"{name}: hostname must be ${{FARM_HOST...}}-gpuN, got {svc.get('hostname')!r}"
        assert f"worker-gpu{m['n']}" == name, f"{name}: hostname names another GPU"
        hostnames.append(m["n"])
    assert len(set(seen)) == len(seen), f"two workers share a GPU: {seen}"
    assert len(set(hostnames)) == len(hostnames), f"two workers share a hostname: {hostnames}"


def test_head_workers_keep_their_ids_and_worker_hosts_must_name_themselves(
        compose: dict[str, Any], workers_compose: dict[str, Any]) -> None:
    # the head's default keeps the ids (and per-worker compile caches) its workers always had,
    # worker-gpuN:gpu0; a worker host has no default, or it would collide with the head
    for name, svc in _workers(compose).items():
        m = HOSTNAME.fullmatch(svc["hostname"])
        assert m and m["op"] == ":-" and m["rest"] == "worker", name
    for name, svc in _workers(workers_compose).items():
        m = HOSTNAME.fullmatch(svc["hostname"])
        assert m and m["op"] == ":?", f"{name}: FARM_HOST must be required on a worker host"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_workers_come_from_one_anchor(path: Path) -> None:
    # the 2 -> 8 GPU recipe in docs/deploy.md relies on every worker merging the same anchor
    text = path.read_text()
    assert "x-gpu-worker: &gpu-worker" in text
    blocks = re.findall(r"^  (worker-gpu\d+):\n    <<: \*gpu-worker$", text, flags=re.M)
    assert len(blocks) == len(re.findall(r"^  worker-gpu\d+:", text, flags=re.M)) >= 2


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_workers_allow_the_sandbox(path: Path) -> None:
    # bubblewrap needs user namespaces (seccomp, AppArmor) and its own /proc, which the kernel
    # refuses while Docker masks paths under /proc (systempaths); docs/deploy.md
    for name, svc in _workers(_load(path)).items():
        opts = set(svc.get("security_opt", []))
        assert {"seccomp=unconfined", "apparmor=unconfined", "systempaths=unconfined"} <= opts, name
        assert "privileged" not in svc and "cap_add" not in svc, f"{name}: more than the sandbox needs"


def test_worker_hosts_file_holds_only_workers_that_reach_the_head(
        compose: dict[str, Any], workers_compose: dict[str, Any]) -> None:
    # docs/deploy.md sends worker hosts to this file: it must parse on its own (its own anchors),
    # hold nothing that belongs on the head, and name no service it does not define
    services = workers_compose["services"]
    assert set(services) == set(_workers(workers_compose)), "only worker-gpuN services on a worker host"
    head = _workers(compose)["worker-gpu0"]
    for name, svc in services.items():
        assert "depends_on" not in svc, f"{name}: depends_on names services that live on the head"
        env = svc["environment"]
        assert set(env) == set(head["environment"]), f"{name}: settings differ from the head's workers"
        for key in ("FARM_DATABASE_URL", "FARM_BROKER_URL"):
            assert "${FARM_HEAD_ADDR:?" in env[key], f"{name}: {key} must point at the head"
        # everything else the same as the head's workers, so the two files cannot drift apart
        skip = {"depends_on", "environment", "hostname", "deploy"}
        assert {k: v for k, v in svc.items() if k not in skip} == \
            {k: v for k, v in head.items() if k not in skip}, name
    assert set(workers_compose["volumes"]) == {"farm-data", "compile-cache"}
    assert not any(str(v).startswith("farm-repo:") for s in services.values() for v in s.get("volumes", []))


def test_only_the_scheduler_holds_the_farm_repository(compose: dict[str, Any]) -> None:
    holders = [n for n, s in compose["services"].items()
               if any(str(v).startswith("farm-repo:") for v in s.get("volumes", []))]
    assert holders == ["scheduler"]


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_no_secret_has_a_default(path: Path) -> None:
    text = path.read_text()
    found = set()
    for m in INTERP.finditer(text):
        name, op = m["name"], m["op"]
        if _is_secret(name):
            found.add(name)
            assert op == ":?", f"${{{name}}} must be required (${{{name}:?...}}), not {m.group(0)!r}"
    assert {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "FARM_API_SECRET"} <= found


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_secret_environment_values_are_never_literals(path: Path) -> None:
    raw = _load(path)
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


def _base_image_default() -> str:
    m = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE.read_text(), flags=re.M)
    assert m, "Dockerfile.gpu must take its base as ARG BASE_IMAGE=<default>"
    return m.group(1)


def test_dockerfile_base_is_a_pytorch_cuda_image_chosen_by_one_arg() -> None:
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    default = _base_image_default()
    assert default.startswith("pytorch/pytorch:") and "cuda" in default, default
    assert lines[0] == f"ARG BASE_IMAGE={default}" and lines[1] == "FROM ${BASE_IMAGE}", lines[:2]


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_builds_on_the_dockerfiles_default_base(path: Path) -> None:
    # compose passes FARM_BASE_IMAGE through; unset, it must build what `docker build` builds
    build = _load(path)["x-farm-image"]["build"]
    assert build["dockerfile"] == "Dockerfile.gpu"
    assert build["args"]["BASE_IMAGE"] == f"${{FARM_BASE_IMAGE:-{_base_image_default()}}}"


def test_dockerfile_installs_the_compilers_triton_and_inductor_call() -> None:
    # the pytorch runtime images ship no C/C++ compiler, and train.py compiles (torch.compile,
    # FlexAttention, a Triton kernel): without them every GPU run crashes at its first step
    text = DOCKERFILE.read_text()
    apt = re.search(r"apt-get install [^&]*", text.replace("\\\n", " "))
    assert apt, "no apt-get install in Dockerfile.gpu"
    packages = set(apt.group(0).split())
    assert {"gcc", "g++", "libc6-dev", "git", "bubblewrap", "tini"} <= packages, packages


def test_dockerfile_runs_as_numeric_non_root_with_a_cached_dependency_layer() -> None:
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), users
    copies = [ln for ln in lines if ln.startswith("COPY ")]
    assert copies[0] == "COPY pyproject.toml ./", "dependencies must install before the source is copied"
    first_source_copy = lines.index("COPY . .")
    assert any("pip install" in ln for ln in lines[:first_source_copy]), "no dependency layer before COPY . ."
    assert "bubblewrap" in DOCKERFILE.read_text()


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_workers_pass_through_what_a_worker_hands_its_runs_and_the_docs_say_so(path: Path) -> None:
    """Found by review: FARM_CORPUS (and the climbmix settings) reached no compose worker, since a container sees
    only its `environment` entries, so a farm in containers always trained on the default corpus."""
    from worker.runner import ENV_PASSTHROUGH, PREPARE_PASSTHROUGH

    # FARM_MAX_STEPS caps runs for the tests and benches; compose pins each worker's GPU, FARM_DEVICE would fight it
    wanted = {k for k in (*ENV_PASSTHROUGH, *PREPARE_PASSTHROUGH) if k.startswith("FARM_")} - {
        "FARM_MAX_STEPS", "FARM_DEVICE"}
    assert "FARM_CORPUS" in wanted and "FARM_CLIMBMIX_SHARDS" in wanted
    deploy = " ".join((ROOT / "docs" / "deploy.md").read_text().split())
    said = deploy[deploy.index("and passes through from your shell or `.env` only"):]
    said = said[:said.index("(section 2)")]
    for name, svc in _workers(_load(path)).items():
        passed = {k for k, v in svc["environment"].items() if v is None}
        assert wanted <= passed, f"{name} does not pass through {sorted(wanted - passed)}"
        undocumented = sorted(k for k in passed if f"`{k}`" not in said)
        assert not undocumented, f"docs/deploy.md's list of what compose passes through lacks {undocumented}"
