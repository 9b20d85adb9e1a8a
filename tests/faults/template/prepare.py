"""Fault-test harness: the worker contract of training_template/prepare.py (nonce from FARM_NONCE_FD,
signed JSON at FARM_RESULT_PATH, the `---` summary, exit 0) with no torch, so a run costs its
budget and nothing else, and `pick()` so the mutation proposer can work on train.py."""

import hashlib
import hmac
import json
import os
import sys
import time

_T0 = time.time()


def _read_nonce():
    raw = os.environ.pop("FARM_NONCE_FD", None)
    if raw is None:
        return ""
    with os.fdopen(int(raw), "r") as f:
        return f.readline().strip()


def result_digest(payload, nonce):
    body = {k: v for k, v in payload.items() if k != "digest"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hmac.new(nonce.encode(), canonical.encode(), hashlib.sha256).hexdigest()


_NONCE = _read_nonce()
TIME_BUDGET = float(os.environ.get("FARM_TIME_BUDGET", "1"))
SEED = int(os.environ.get("FARM_SEED", "0"))
PROFILE = os.environ.get("FARM_PROFILE", "cpu")


def pick(**values):
    return values[PROFILE]


def progress_line(step, pct, loss):
    print(f"step {step:05d} ({pct:.1f}%) | loss: {loss:.6f} | dt: 10ms", flush=True)


def finish(val_bpb, *, steps=10, training_seconds=None, startup_seconds=0.05):
    now = time.time()
    result = {"status": "ok", "val_bpb": val_bpb, "test_bpb": val_bpb + 0.01,
              "training_seconds": training_seconds if training_seconds is not None else TIME_BUDGET,
              "total_seconds": now - _T0, "startup_seconds": startup_seconds, "eval_seconds": 0.01,
              "peak_vram_mb": 0.0, "mfu_percent": 0.0, "total_tokens_m": 0.5, "num_steps": steps,
              "num_params_m": 0.1, "depth": 2, "device": "cpu (fault harness)", "torch_version": "none",
              "profile": PROFILE, "seed": SEED, "nonce": _NONCE}
    result["digest"] = result_digest(result, _NONCE)
    with open(os.environ.get("FARM_RESULT_PATH", "result.json"), "w") as f:
        json.dump(result, f)
    print("\n---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print(f"training_seconds: {result['training_seconds']:.1f}")
    print(f"total_seconds:    {result['total_seconds']:.1f}")
    print(f"num_steps:        {steps}")
    print("depth:            2", flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    print("fault harness: nothing to prepare")
