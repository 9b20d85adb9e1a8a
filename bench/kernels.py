"""Benchmark the template's fused kernels against eager PyTorch and torch.compile.

Per op (forward + backward): time per call and peak memory for eager reference, torch.compile(reference)
and the Triton kernel, with ratios against torch.compile. Then, with --step, the whole template run with
kernels on and off (tokens/s, MFU, peak VRAM from train.py's summary). Prints figures; asserts nothing.

    python bench/kernels.py                      # CUDA, baseline shapes
    python bench/kernels.py --step               # ... plus two full train.py runs (about 2 x 6 minutes)
    python bench/kernels.py --device cpu --small # reduced CPU mode: references only, kernels skipped

Targets on an H100 (docs/kernels.md): lm_head+loss peak memory at least 50 % below torch.compile,
template MFU at least 45 %, peak VRAM under 30 GB.
"""

import argparse
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
    B, T = (2, 64) if small else (128, 2048)  # device batch 128 x 2048 tokens in the baseline
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


SUMMARY_KEYS = ("val_bpb", "training_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M", "num_steps")


def run_template(use_kernels: bool, timeout: int) -> dict[str, float] | str:
    """Run train.py in a scratch copy of the template and parse its `key: value` summary."""
    with tempfile.TemporaryDirectory(prefix="farm-kernel-bench-") as tmp:
        work = Path(tmp) / "template"
        shutil.copytree(TEMPLATE, work, ignore=shutil.ignore_patterns("__pycache__"))
        env = dict(os.environ, FARM_KERNELS="auto" if use_kernels else "0")
        env.pop("TRITON_INTERPRET", None)
        try:
            proc = subprocess.run([sys.executable, "train.py"], cwd=work, env=env, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout} s"
    if proc.returncode != 0:
        return f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}"
    found = dict(re.findall(r"^(\w+):\s+([-\d.eE+]+)\s*$", proc.stdout, flags=re.M))
    return {k: float(found[k]) for k in SUMMARY_KEYS if k in found}


def bench_step(args) -> None:
    print()
    if not (TEMPLATE / "train.py").exists():
        print("TODO whole-step comparison: training_template/train.py does not exist yet; rerun once it does.")
        return
    if args.device != "cuda":
        print("Whole-step comparison skipped: it runs train.py's full time budget, which needs CUDA.")
        return
    if not args.step:
        print("Whole-step comparison not run (add --step: two full train.py runs, kernels on then off).")
        return
    results = {}
    for use in (True, False):
        label = "kernels on" if use else "kernels off"
        print(f"running train.py with {label} ...", flush=True)
        results[label] = run_template(use, args.step_timeout)
    for label, res in results.items():
        if isinstance(res, str):
            print(f"{label}: FAILED ({res})")
            continue
        tok_s = res.get("total_tokens_M", 0) * 1e6 / max(res.get("training_seconds", 0), 1e-9)
        print(f"{label}: tokens/s {tok_s:,.0f}  MFU {res.get('mfu_percent', float('nan')):.2f} %  "
              f"peak VRAM {res.get('peak_vram_mb', float('nan')):,.0f} MB  val_bpb {res.get('val_bpb', float('nan')):.6f}")
    on, off = results.get("kernels on"), results.get("kernels off")
    if isinstance(on, dict) and isinstance(off, dict) and off.get("peak_vram_mb") and off.get("mfu_percent"):
        print(f"on/off: MFU x{on['mfu_percent'] / off['mfu_percent']:.3f}, "
              f"peak VRAM x{on['peak_vram_mb'] / off['peak_vram_mb']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--only", nargs="*", help="substrings of op names to run")
    parser.add_argument("--step", action="store_true", help="also run train.py with kernels on and off")
    parser.add_argument("--step-timeout", type=int, default=900)
    args = parser.parse_args()
    if args.device == "cpu" and not args.small:
        print("--device cpu implies --small")
        args.small = True
    args.iters = args.iters or (3 if args.device == "cpu" else 20)
    bench_ops(args)
    bench_step(args)


if __name__ == "__main__":
    main()
