"""Benchmark the template's fused kernels against eager PyTorch and torch.compile.

Per op (forward + backward): time per call and peak memory for eager reference, torch.compile(reference)
and the Triton kernel, with ratios against torch.compile. Then, with --step, the whole template run per
kernel configuration (tokens/s, MFU, peak VRAM from train.py's summary). Prints figures; asserts nothing.

    python bench/kernels.py                      # CUDA, baseline shapes
    python bench/kernels.py --step               # ... plus one train.py run per kernel config (none;linear_ce;all)
    python bench/kernels.py --step --budget 30 --corpus synthetic --eval-tokens 4194304   # shorter runs
    python bench/kernels.py --no-ops --step --configs "linear_ce;linear_ce COMPILE_OPTIMIZER=False"  # A/B an edit
    python bench/kernels.py --no-ops --step --configs linear_ce --torch-profile artifacts/prof  # where time goes
    python bench/kernels.py --device cpu --small # reduced CPU mode: references only (--step runs the cpu profile)

Targets on an H100 (docs/kernels.md): lm_head+loss peak memory at least 50 % below torch.compile,
template MFU at least 45 %, peak VRAM under 30 GB.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TEMPLATE = Path(__file__).resolve().parents[1] / "training_template"
sys.path.insert(0, str(TEMPLATE))
import kernels as K  # noqa: E402

SOFTCAP = 15.0


def make_cases(device: str, small: bool):
    """(name, reference fn, kernel fn, input factory, indices needing grad) at baseline or small shapes."""
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    B, T = (2, 64) if small else (128, 2048)  # the reference recipe's device batch, 128 x 2048
    D, H, HD, V = (64, 2, 32, 512) if small else (512, 4, 128, 8192)
    ce_rows = B * T if small else 16 * 2048  # full-batch bf16 logits + fp32 copies would not leave room

    def rand(*shape, dtype=dt, scale=1.0):
        return lambda: (torch.randn(*shape, device=device) * scale).to(dtype)

    def rotary_inputs():
        ang = torch.arange(T, device=device)[:, None] * torch.rand(HD // 2, device=device)[None]
        return [rand(B, T, H, HD)(), ang.cos().to(dt)[None, :, None], ang.sin().to(dt)[None, :, None]]

    def ce_inputs():
        return [rand(ce_rows, V, scale=8.0)(), torch.randint(0, V, (ce_rows,), device=device)]

    def lce_inputs():
        return [rand(B * T, D)(), rand(V, D, dtype=torch.float32, scale=D**-0.5)(),
                torch.randint(0, V, (B * T,), device=device)]

    autocast = device == "cuda"

    def lce(fn):
        def run(x, w, t):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                return fn(x, w, t, SOFTCAP)
        return run

    return [
        ("rms_norm (B,T,D)", K.rms_norm_reference, K.rms_norm, lambda: [rand(B, T, D)()], [0]),
        ("rms_norm qk (B,T,H,hd)", K.rms_norm_reference, K.rms_norm, lambda: [rand(B, T, H, HD)()], [0]),
        ("apply_rotary", K.apply_rotary_reference, K.apply_rotary, rotary_inputs, [0]),
        ("relu_squared (B*T,4D)", K.relu_squared_reference, K.relu_squared, lambda: [rand(B * T, 4 * D)()], [0]),
        ("relu_squared+c_proj", K.relu_squared_linear_reference, K.relu_squared_linear,
         lambda: [rand(B * T, 4 * D)(), rand(D, 4 * D, scale=(4 * D) ** -0.5)()], [0, 1]),
        (f"softcap_ce ({ce_rows},{V})", lambda lg, t: K.softcap_cross_entropy_reference(lg, t, SOFTCAP),
         lambda lg, t: K.softcap_cross_entropy(lg, t, SOFTCAP), ce_inputs, [0]),
        (f"lm_head+softcap_ce ({B * T},{D})x({V})", lce(K.linear_softcap_cross_entropy_reference),
         lce(K.linear_softcap_cross_entropy), lce_inputs, [0, 1]),
    ]


def measure(fn, make_inputs, grad_idx, device: str, iters: int) -> tuple[float, float | None]:
    """Median milliseconds of forward+backward, and peak memory above the inputs (MiB, CUDA only)."""
    def step():
        inputs = make_inputs()
        for i in grad_idx:
            inputs[i].requires_grad_(True)
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
        return inputs

    step()  # warm-up: compilation, autotuning, allocator
    times, peak = [], None
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
            inputs = make_inputs()
            for i in grad_idx:
                inputs[i].requires_grad_(True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            out = fn(*inputs)
            out.backward(torch.ones_like(out))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            peak = max(peak or 0, torch.cuda.max_memory_allocated() - base)
            del inputs, out
        else:
            inputs = make_inputs()
            for i in grad_idx:
                inputs[i].requires_grad_(True)
            start = time.perf_counter()
            out = fn(*inputs)
            out.backward(torch.ones_like(out))
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e3, (peak / 2**20 if peak is not None else None)


def fmt(value, unit=""):
    return "-" if value is None else f"{value:.2f}{unit}"


def bench_ops(args) -> None:
    run_kernels = args.device == "cuda" and K.backend() == "cuda"
    if not run_kernels:
        why = "no CUDA" if args.device != "cuda" else f"backend is {K.backend()!r}"
        print(f"Triton kernels skipped ({why}): timing the eager and compiled references only.")
    print(f"device={args.device} small={args.small} iters={args.iters} torch={torch.__version__}")
    header = f"{'op':40s} {'eager ms':>9s} {'compile ms':>10s} {'kernel ms':>9s} {'k/comp t':>8s} " \
             f"{'eager MiB':>9s} {'comp MiB':>9s} {'kern MiB':>9s} {'k/comp mem':>10s}"
    print(header)
    print("-" * len(header))
    for name, ref, kern, make_inputs, grad_idx in make_cases(args.device, args.small):
        if args.only and not any(s in name for s in args.only):
            continue
        K.set_enabled(False)
        eager = measure(ref, make_inputs, grad_idx, args.device, args.iters)
        comp = (None, None)
        if not args.no_compile:
            torch._dynamo.reset()
            comp = measure(torch.compile(ref), make_inputs, grad_idx, args.device, args.iters)
        kernel = (None, None)
        if run_kernels:
            K.set_enabled(True)
            kernel = measure(kern, make_inputs, grad_idx, args.device, args.iters)
        t_ratio = kernel[0] / comp[0] if kernel[0] and comp[0] else None
        m_ratio = kernel[1] / comp[1] if kernel[1] and comp[1] else None
        print(f"{name:40s} {fmt(eager[0]):>9s} {fmt(comp[0]):>10s} {fmt(kernel[0]):>9s} {fmt(t_ratio, 'x'):>8s} "
              f"{fmt(eager[1]):>9s} {fmt(comp[1]):>9s} {fmt(kernel[1]):>9s} {fmt(m_ratio, 'x'):>10s}",
              flush=True)
    print("k/comp t < 1: kernel faster than torch.compile; k/comp mem < 1: kernel uses less peak memory.")


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def _slug(config: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", config.strip()) or "config"


def run_template(config: str, args) -> dict | str:
    """Run train.py in a scratch copy of the template for one --configs entry, "OPS [NAME=VALUE ...]":
    FARM_KERNELS=OPS, each NAME=VALUE (and every --set) edited into train.py. Its signed result JSON."""
    ops, *edits = config.split()
    with tempfile.TemporaryDirectory(prefix="farm-kernel-bench-") as tmp:
        work = Path(tmp) / "template"
        shutil.copytree(TEMPLATE, work, ignore=shutil.ignore_patterns("__pycache__", "result.json"))
        train = work / "train.py"
        for assignment in [*(args.set or []), *edits]:  # as a candidate would edit the line: the value, comment kept
            name, _, value = assignment.partition("=")
            text, n = re.subn(rf"^{re.escape(name.strip())} = .*?(  # .*)?$",
                              lambda m, line=f"{name.strip()} = {value.strip()}": line + (m.group(1) or ""),
                              train.read_text(), count=1, flags=re.M)
            if n != 1:
                return f"--set {assignment}: no such hyperparameter line in train.py"
            train.write_text(text)
        env = dict(os.environ, FARM_KERNELS=ops if ops != "none" else "0",
                   FARM_RESULT_PATH=str(Path(tmp) / "result.json"))
        env.pop("TRITON_INTERPRET", None)
        if args.torch_profile:
            env["FARM_TORCH_PROFILE"] = str(Path(args.torch_profile).resolve() / f"{_slug(config)}.txt")
        for flag, var in ((args.budget, "FARM_TIME_BUDGET"), (args.eval_tokens, "FARM_EVAL_TOKENS"),
                          (args.corpus, "FARM_CORPUS")):
            if flag is not None:
                env[var] = str(flag)
        try:
            proc = subprocess.run([sys.executable, "train.py"], cwd=work, env=env, capture_output=True,
                                  text=True, timeout=args.step_timeout)
        except subprocess.TimeoutExpired as exc:
            proc = subprocess.CompletedProcess(exc.cmd, -9, _text(exc.stdout), _text(exc.stderr))
        if args.log:
            with open(args.log, "a") as f:
                f.write(f"===== {config} exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n")
        if proc.returncode == -9:
            return f"timed out after {args.step_timeout} s"
        if proc.returncode != 0:
            return f"exit {proc.returncode}: {(proc.stdout + proc.stderr).strip()[-600:]}"
        return json.loads((Path(tmp) / "result.json").read_text())


def bench_step(args) -> bool:
    """The whole-template runs of --step; False when one of them failed."""
    print()
    if not args.step:
        print("Whole-step comparison not run (add --step: one train.py run per --configs entry).")
        return True
    results = {}
    for config in (c.strip() for c in args.configs.split(";") if c.strip()):
        ops, *edits = config.split()
        edits += args.set or []
        print(f"running train.py with FARM_KERNELS={ops}{' and ' + ', '.join(edits) if edits else ''} ...",
              flush=True)
        results[config] = res = run_template(config, args)
        if isinstance(res, str):
            print(f"  FAILED ({res})", flush=True)
            continue
        print(f"  {res['device']}: tokens/s {res['tokens_per_second']:,.0f}  MFU {res['mfu_percent']:.2f} %  "
              f"peak VRAM {res['peak_vram_mb']:,.0f} MiB  val_bpb {res['val_bpb']:.6f}  steps {res['num_steps']}  "
              f"training {res['training_seconds']:.1f} s  startup {res['startup_seconds']:.1f} s  "
              f"eval {res['eval_seconds']:.1f} s", flush=True)
    first = next(iter(results), None)
    base = results.get(first) if first is not None else None
    if isinstance(base, dict):
        for config, res in results.items():
            if config != first and isinstance(res, dict):
                print(f"{config} / {first}: tokens/s {_ratio(res, base, 'tokens_per_second')}, "
                      f"peak VRAM {_ratio(res, base, 'peak_vram_mb')}, "
                      f"val_bpb {res['val_bpb'] - base['val_bpb']:+.6f}")
    failed = [config for config, res in results.items() if isinstance(res, str)]
    if failed:
        print(f"{len(failed)} of {len(results)} runs failed: {'; '.join(failed)}")
    return not failed


def _ratio(res: dict, base: dict, key: str) -> str:
    return f"x{res[key] / base[key]:.3f}" if base[key] else "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--only", nargs="*", help="substrings of op names to run")
    parser.add_argument("--no-ops", action="store_true", help="skip the per-op table")
    parser.add_argument("--step", action="store_true", help="also run train.py once per --configs entry")
    parser.add_argument("--configs", default="none;linear_ce;all",
                        help="';'-separated runs for --step, each 'OPS [NAME=VALUE ...]': a FARM_KERNELS value "
                             "(none, all, or a comma list of ops) and train.py edits; ratios are against the first")
    parser.add_argument("--budget", type=float, help="FARM_TIME_BUDGET for --step (default: the profile's)")
    parser.add_argument("--eval-tokens", type=int, help="FARM_EVAL_TOKENS for --step (default: the profile's)")
    parser.add_argument("--corpus", help="FARM_CORPUS for --step (default: bible)")
    parser.add_argument("--step-timeout", type=int, default=900)
    parser.add_argument("--set", action="append", metavar="NAME=VALUE",
                        help="edit a hyperparameter line of train.py in the run's copy (repeatable)")
    parser.add_argument("--log", help="append each train.py run's output to this file")
    parser.add_argument("--torch-profile", metavar="DIR",
                        help="profile a few timed steps of each --step run (FARM_TORCH_PROFILE) into DIR/CONFIG.txt; "
                             "profiled runs are slower, so their tokens/s are not benchmark figures")
    args = parser.parse_args()
    if args.device == "cpu" and not args.small:
        print("--device cpu implies --small")
        args.small = True
    args.iters = args.iters or (3 if args.device == "cpu" else 20)
    if not args.no_ops:
        bench_ops(args)
    return 0 if bench_step(args) else 1


if __name__ == "__main__":
    sys.exit(main())
