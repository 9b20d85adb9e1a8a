"""A tiny stand-in for training_template/prepare.py with the same worker contract and no torch:
nonce from FARM_NONCE_FD, signed JSON at FARM_RESULT_PATH, the `---` summary, exit 0. A copy that declares the
isolated evaluation (the marker line of farm/harness.py appended: tests/workerkit.py isolated_fake_template) exports
at finish() when the worker sets FARM_EVAL_EXPORT, and `prepare.py --evaluate FILE` scores the export, taking the
export's `eval_sleep` seconds to do it."""

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


def progress_line(step, pct, loss):
    print(f"step {step:05d} ({pct:.1f}%) | loss: {loss:.6f} | dt: 10ms", end="\r", flush=True)


def _write_result(result):
    result["digest"] = result_digest(result, _NONCE)
    with open(os.environ.get("FARM_RESULT_PATH", "result.json"), "w") as f:
        json.dump(result, f)


def finish(val_bpb, *, steps=10, training_seconds=None, startup_seconds=0.05, eval_sleep=0.0):
    now = time.time()
    export = os.environ.get("FARM_EVAL_EXPORT")
    result = {"status": "ok", "val_bpb": val_bpb, "test_bpb": val_bpb + 0.01,
              "training_seconds": training_seconds if training_seconds is not None else TIME_BUDGET,
              "total_seconds": now - _T0, "startup_seconds": startup_seconds, "eval_seconds": 0.01,
              "peak_vram_mb": 0.0, "mfu_percent": 0.0, "total_tokens_m": 0.5, "num_steps": steps,
              "num_params_m": 0.1, "depth": 2, "device": "cpu (fake)", "torch_version": "none",
              "profile": PROFILE, "seed": SEED, "nonce": _NONCE}
    if export:  # the model goes to the isolated evaluation, which scores it
        with open(export, "w") as f:
            json.dump({"val_bpb": val_bpb, "eval_sleep": eval_sleep}, f)
        result["evaluation"] = "exported"
        for key in ("val_bpb", "test_bpb"):
            del result[key]
    _write_result(result)
    print("\n---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print(f"training_seconds: {result['training_seconds']:.1f}")
    print(f"total_seconds:    {result['total_seconds']:.1f}")
    print(f"num_steps:        {steps}")
    print("depth:            2", flush=True)
    sys.stdout.flush()
    os._exit(0)


def evaluate(path):
    with open(path) as f:
        model = json.load(f)
    print("fake evaluation: scoring the export", flush=True)
    time.sleep(float(model["eval_sleep"]))
    _write_result({"status": "ok", "val_bpb": model["val_bpb"], "test_bpb": model["val_bpb"] + 0.01,
                   "eval_seconds": float(model["eval_sleep"]), "evaluation": "isolated", "profile": PROFILE,
                   "seed": SEED, "nonce": _NONCE})
    print(f"val_bpb:          {model['val_bpb']:.6f}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--evaluate"]:
        evaluate(sys.argv[2])
    else:
        print("fake prepare: nothing to download")
