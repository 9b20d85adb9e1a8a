"""`farm worker`: the environment the Celery worker is exec'd with."""

from __future__ import annotations

import pytest

import cli.worker as cw
import worker.identity


def test_gpu_worker_pins_the_card_nvidia_smi_named(monkeypatch):
    """Found by review: --gpu N is identified by nvidia-smi (PCI order) but CUDA_VISIBLE_DEVICES=N is read in
    CUDA's fastest-first order, so on a mixed host the worker could claim one card and train on another."""
    monkeypatch.setattr(worker.identity, "query_gpu", lambda i: {"gpu_name": "NVIDIA H100 80GB HBM3"})
    seen: dict[str, dict[str, str]] = {}

    def fake_exec(path: str, argv: list[str], env: dict[str, str]) -> None:
        seen["env"] = env
        raise SystemExit(0)

    monkeypatch.setattr(cw.os, "execve", fake_exec)
    with pytest.raises(SystemExit):
        cw.worker(gpu=1, cpu=False, slot=0, hw_class="", name="", prepare=False, slots=0, loglevel="INFO")
    env = seen["env"]
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["FARM_WORKER_HW_CLASS"] == "gpu.h100"
    from worker.runner import ENV_PASSTHROUGH

    assert "CUDA_DEVICE_ORDER" in ENV_PASSTHROUGH  # the candidate's CUDA must count the same way


def test_worker_slots_from_a_dotenv_file_reach_the_worker(monkeypatch, tmp_path):
    """Found by review: FARM_WORKER_SLOTS was read from os.environ alone, so a value in .env (where every other
    setting may live) was ignored by `farm worker`."""
    from farm.settings import reset_settings_cache

    monkeypatch.delenv("FARM_WORKER_SLOTS", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("FARM_WORKER_SLOTS=3\n")
    reset_settings_cache()
    seen: dict[str, dict[str, str]] = {}

    def fake_exec(path: str, argv: list[str], env: dict[str, str]) -> None:
        seen["env"] = env
        raise SystemExit(0)

    monkeypatch.setattr(cw.os, "execve", fake_exec)
    try:
        with pytest.raises(SystemExit):
            cw.worker(gpu=None, cpu=True, slot=0, hw_class="", name="", prepare=False, slots=0, loglevel="INFO")
    finally:
        reset_settings_cache()
    assert seen["env"]["FARM_WORKER_SLOTS"] == "3"
