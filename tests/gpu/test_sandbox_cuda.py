"""A candidate in the worker's bubblewrap sandbox still sees the GPU (bwrap's fresh /dev has no /dev/nvidia*:
worker/sandbox.py binds them back). Skipped without CUDA, and where bwrap cannot run."""

import shutil
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from worker.sandbox import Mounts, bwrap_argv  # noqa: E402

pytestmark = pytest.mark.gpu


def test_cuda_is_visible_inside_the_sandbox(tmp_path):
    if not shutil.which("bwrap"):
        pytest.skip("bwrap is not installed on this machine")
    probe = bwrap_argv(["true"], Mounts(workdir=tmp_path))
    ok = subprocess.run(probe, capture_output=True, text=True, timeout=60)
    if ok.returncode != 0:
        pytest.skip(f"bwrap cannot run here: {ok.stderr.strip()[-200:]}")
    code = "import torch; x = torch.ones(4, device='cuda'); print(torch.cuda.device_count(), float(x.sum()))"
    r = subprocess.run(bwrap_argv([sys.executable, "-c", code], Mounts(workdir=tmp_path)),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    count, total = r.stdout.split()
    assert int(count) >= 1 and float(total) == 4.0
