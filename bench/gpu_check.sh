#!/usr/bin/env bash
# Every GPU check of the project in one run, for a borrowed CUDA machine with python3, torch and triton
# (installs nothing). In order of what it decides, each phase getting what is left of the time given (a
# slow phase costs the later ones, never the logs of the earlier ones):
#   1. the CUDA tests (tests/gpu: kernels, the compiled Muon update, CUDA inside the bwrap sandbox, the isolated
#      evaluation's exported graph against the compiled model)
#   2. the whole template: default, SDPA's causal kernel for the full-context layers (ATTN_IMPL='mixed', x1.015
#      on the 2026-11-28 H200), FlexAttention with TMA and rows known non-empty (FLEX_OPTIONS), and any
#      GPU_CHECK_CONFIGS ("OPS NAME=VALUE...;..." more entries, e.g. "linear_ce
#      COMPILE_MODE='max-autotune-no-cudagraphs'", minutes of autotuning): tokens/s, MFU, peak VRAM
#   3. one 20-step run scored in-process and by the worker's isolated evaluation (export + a second process):
#      same val_bpb? what does the isolation cost on a GPU?
#   4. three runs (short evaluations) through the device gate with two slots: the device time between timed runs
#   5. one default run under torch.profiler: where the device time of a step goes (profile/*.txt)
#   6. the per-kernel table against eager and torch.compile
# Results go to $OUT (default artifacts/gpu):
#   env.txt summary.txt tests.log step.log train.log isolated.log profile.log profile/ gap.log gap_runs.log gap.json
#   ops.log
# Every bench it runs is also run on the CPU by tests/integration/test_bench_device_scripts.py.
#
#   bench/gpu_check.sh [SECONDS] [STEP_BUDGET]     # defaults: 570 s in all, 15 s of training per step run
#   OUT=$OUT GPU_CHECK_PACK=1 bench/gpu_check.sh 555 15   # on the device tool: one archive + summary.txt back
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-artifacts/gpu}
mkdir -p "$OUT"
deadline=$(( $(date +%s) + ${1:-570} ))
step_budget=${2:-15}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export FARM_PROFILE=h100 FARM_CORPUS=synthetic
export FARM_CACHE_DIR=${FARM_CACHE_DIR:-/tmp/farm-gpu-cache} FARM_DATA_DIR=${FARM_DATA_DIR:-/tmp/farm-gpu-data}
unset TRITON_INTERPRET FARM_KERNELS
# bwrap for the sandbox's CUDA test where the machine has none (the 2026-11-28 H200 had none): unpack it into .bwrap
# (ignored) here, `apt-get download bubblewrap && dpkg -x bubblewrap_*.deb .bwrap`, and name .bwrap in the device
# tool's carry
if [ -x .bwrap/usr/bin/bwrap ]; then export PATH="$PWD/.bwrap/usr/bin:$PATH"; fi

left() { echo $(( deadline - $(date +%s) )); }
note() { echo "$*" | tee -a "$OUT/summary.txt"; }
phase() {  # phase NAME MIN_SECONDS LOG CMD... : run CMD with what is left, or skip it
  local name=$1 need=$2 log=$3 t0 rc remaining
  shift 3
  remaining=$(left)
  if [ "$remaining" -lt "$need" ]; then note "SKIP $name: $remaining s left, it needs $need"; return; fi
  note "== $name at $(date +%T) ($remaining s left)"
  t0=$(date +%s)
  timeout --kill-after=5 $(( remaining - 5 )) "$@" >>"$OUT/$log" 2>&1
  rc=$?
  note "   $name: exit $rc after $(( $(date +%s) - t0 )) s"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'device', torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
} >"$OUT/env.txt" 2>&1
note "$(tail -n 1 "$OUT/env.txt")"

# the h100 profile's data, built on the CPU while the GPU runs the tests (about 20 s)
"$PY" training_template/prepare.py >/tmp/farm-gpu-prepare.log 2>&1 &
prepare_pid=$!

phase "CUDA kernel tests" 60 tests.log env FARM_TEST_CUDA=1 "$PY" -m pytest -q -rfEs -s -p no:cacheprovider tests/gpu
wait "$prepare_pid" || { note "data cache build failed:"; tail -n 5 /tmp/farm-gpu-prepare.log | tee -a "$OUT/summary.txt"; }

step_timeout=$(( step_budget + 170 ))
configs="linear_ce;linear_ce ATTN_IMPL='mixed';linear_ce FLEX_OPTIONS={'USE_TMA':True,'ROWS_GUARANTEED_SAFE':True}"
phase "template: default vs mixed attention vs FlexAttention options" 200 step.log "$PY" bench/kernels.py --no-ops \
  --step --budget "$step_budget" --corpus synthetic --eval-tokens 1048576 --step-timeout "$step_timeout" \
  --log "$OUT/train.log" --configs "$configs${GPU_CHECK_CONFIGS:+;$GPU_CHECK_CONFIGS}"
phase "isolated evaluation vs in-process" 150 isolated.log "$PY" bench/template.py --profile h100 --synthetic \
  --budget 1000 --max-steps 20 --eval-tokens 1048576 --isolated --data-dir "$FARM_DATA_DIR" --cache-dir "$FARM_CACHE_DIR"
# three runs of 10 s with short evaluations: about 30 s of start-up (overlapped) + 3 x 15 s on an H200; with the
# profile's full 16 M-token evaluation (24 s a run) and 89 s left, the last two were killed on 2026-11-28
phase "device gap with two slots" 130 gap.log "$PY" bench/gate_gap.py --runs 3 --slots 2 --budget 10 \
  --corpus synthetic --eval-tokens 1048576 --timeout "$(( $(left) - 15 ))" --log "$OUT/gap_runs.log" \
  --json "$OUT/gap.json"
phase "template under torch.profiler" 90 profile.log "$PY" bench/kernels.py --no-ops --step --budget 8 \
  --corpus synthetic --eval-tokens 1048576 --configs linear_ce --step-timeout 200 --torch-profile "$OUT/profile" \
  --log "$OUT/train.log"
phase "per-kernel table" 45 ops.log "$PY" bench/kernels.py --iters 10
note "done at $(date +%T), $(left) s to spare"
# GPU_CHECK_PACK=1: everything in $OUT/gpu_check.tgz beside summary.txt (the device tool brings back 8 files at most)
if [ "${GPU_CHECK_PACK:-0}" = 1 ]; then
  tar czf "/tmp/gpu_check.$$.tgz" -C "$OUT" . && find "$OUT" -mindepth 1 ! -name summary.txt -delete \
    && mv "/tmp/gpu_check.$$.tgz" "$OUT/gpu_check.tgz"
fi
