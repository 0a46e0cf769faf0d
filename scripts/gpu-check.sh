#!/usr/bin/env bash
# The GPU checks, prepared as two runs of under 10 minutes each on one GPU host (from the root
# of a checkout; nothing is installed but into /tmp):
#
#   run 1:  scripts/gpu-check.sh full         one whole training epoch fed by DALI (bench/gpu_full.py)
#   run 2:  scripts/gpu-check.sh gpu          bench/gpu.py, then `pytest -m gpu`
#   here:   scripts/gpu-check.sh --cpu-smoke  the rehearsal on a CPU: every branch that runs without a GPU
#   here:   scripts/gpu-check.sh wheels       fetch pytest's wheels into .gpu-wheels/ (carry it along
#                                             when the GPU host has no pytest)
#
# Every run prints what it found (python, torch, CUDA, DALI, pytest), runs each step under its
# own time limit (so the run returns inside 10 minutes with what it has), copies results and
# logs to $OUT when it is set (at most 8 files), and exits non-zero when any step failed or
# could not run: AFFPIPE_REQUIRE_GPU=1 is set for the GPU steps, so no CUDA device, no DALI or a
# failed case is a failure there, never a skip.
#
# Knobs (environment), sized so both runs and a machine's start fit in ~15 minutes together:
# PY (default .venv/bin/python when it exists, else python3); FULL_VIDEOS (run 1's twin: videos
# of the 560, default 150, ~0.8M frames; 560 is the whole ~2.9M-frame epoch, ~8 min) and
# FULL_LIMIT_S (default 330); GPU_LIMIT_S (default 240), GPU_ARGS (flags for bench/gpu.py, default
# "--seconds 3 --repeats 2") and TESTS_LIMIT_S (default 120). A step that outruns its limit is
# killed: its log still comes back, and the run exits non-zero.
# DALI: used when importable; else installed into /tmp/site from parts in /tmp/dali-parts/ (or
# .whl-parts/ in the tree): a tar of dali-wheels/*.whl cut with `split -b 55M` (part-00, part-01, …)
# for hosts that take uploads in pieces; without it run 1 trains on the torch loader (the
# figures are written) and exits non-zero, saying DALI was missing.
#
# What --cpu-smoke cannot exercise (it needs the GPU host):
#   - CUDA itself: a driver new enough for the CUDA 13 build of torch, torch.cuda.is_available();
#   - DALI's mixed (nvJPEG) decoder and GPU warp, its outputs on torch's stream, taken by DLPack;
#   - pinned-memory copies, cudnn autotuning, bf16 autocast and channels_last on the GPU;
#   - the `gpu` tests' bodies (here they are only shown to skip without the switch, fail with it);
#   - installing DALI from uploaded parts (here only the "no parts" and "importable" branches run);
#   - the GPU memory figures, and how long each run takes on the GPU host.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
FULL_VIDEOS=${FULL_VIDEOS:-150}
FULL_LIMIT_S=${FULL_LIMIT_S:-330}
GPU_LIMIT_S=${GPU_LIMIT_S:-240}
GPU_ARGS=${GPU_ARGS---seconds 3 --repeats 2}
TESTS_LIMIT_S=${TESTS_LIMIT_S:-120}
PARTS=${DALI_PARTS:-/tmp/dali-parts}
SITE=/tmp/site
FAILED=()
LOGS=$(mktemp -d)

say() { printf '== %s\n' "$*"; }

# step NAME LIMIT_S EXPECT CMD...: run CMD under a time limit, log to $LOGS/NAME.log; EXPECT is
# "ok" (exit 0 wanted) or "fail" (a non-zero exit wanted: the rehearsal's checks of the switches).
step() {
  local name=$1 limit=$2 expect=$3
  shift 3
  say "$name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$LOGS/$name.log"
  say "$name: exit $rc after $((SECONDS - t0))s"
  if { [ "$expect" = ok ] && [ $rc -ne 0 ]; } || { [ "$expect" = fail ] && [ $rc -eq 0 ]; }; then
    FAILED+=("$name (exit $rc, wanted $expect)")
  fi
  return 0
}

has() { "$PY" -c "import $1" >/dev/null 2>&1; }

report_env() {
  say "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1))"
  "$PY" - <<'EOF' 2>&1
import importlib
import torch
print("torch", torch.__version__, "| CUDA build", torch.version.cuda, "| cuda available:", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no device")
for mod in ("nvidia.dali", "cv2", "pyarrow", "numpy", "tqdm", "pytest", "torchvision"):
    try:
        print(f"{mod}: {getattr(importlib.import_module(mod), '__version__', 'present')}")
    except Exception as exc:
        print(f"{mod}: MISSING ({type(exc).__name__})")
EOF
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
  return 0
}

use_site() { mkdir -p "$SITE"; export PYTHONPATH="$SITE:$PYTHONPATH"; }

# DALI: importable, or installed from complete uploaded parts, or absent (returns 1).
ensure_dali() {
  has nvidia.dali && { say "DALI importable"; return 0; }
  mkdir -p "$PARTS"
  if [ -z "${SMOKE:-}" ] && compgen -G ".whl-parts/part-*" >/dev/null; then mv .whl-parts/part-* "$PARTS"/; fi
  if ! compgen -G "$PARTS/part-*" >/dev/null; then
    say "DALI not importable and no parts in $PARTS: the DALI cases cannot run"
    return 1
  fi
  say "DALI: installing from $(ls "$PARTS" | wc -l) part(s) in $PARTS"
  if cat "$PARTS"/part-* | tar -x -C /tmp && use_site \
     && "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" /tmp/dali-wheels/*.whl; then
    has nvidia.dali && { say "DALI installed"; return 0; }
  fi
  say "DALI: the parts in $PARTS did not install (incomplete upload?)"
  return 1
}

ensure_pytest() {
  has pytest && return 0
  if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
    use_site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .gpu-wheels/*.whl && has pytest && return 0
  fi
  say "pytest is not importable and .gpu-wheels/ holds no wheels for it (scripts/gpu-check.sh wheels, then carry .gpu-wheels)"
  return 1
}

gpu_tests() { grep -rl --include='*.py' 'pytest.mark.gpu' tests | sort; }

collect() {  # results and logs to $OUT (at most 8 files come back)
  [ -n "${OUT:-}" ] || return 0
  local dir
  for dir in "$@"; do
    [ -f "$dir/results.json" ] && cp "$dir/results.json" "$OUT/$(basename "$dir").json"
    [ -f "$dir/results.md" ] && cp "$dir/results.md" "$OUT/$(basename "$dir").md"
  done
  tar -C "$LOGS" -czf "$OUT/logs.tar.gz" . 2>/dev/null
  local f
  for f in "$LOGS"/*.log; do  # each log as a file too, while fewer than 8 files are there
    [ -f "$f" ] && [ "$(ls "$OUT" | wc -l)" -lt 8 ] && cp "$f" "$OUT"/
  done
  return 0
}

finish() {
  if [ ${#FAILED[@]} -eq 0 ]; then say "all steps passed"; exit 0; fi
  say "FAILED: ${#FAILED[@]} step(s)"
  printf '   %s\n' "${FAILED[@]}"
  exit 1
}

run_full() {
  report_env
  local backend=dali
  if ! ensure_dali; then backend=torch; FAILED+=("dali: not available, the epoch ran on the torch loader"); fi
  step gpu_full "$FULL_LIMIT_S" ok env AFFPIPE_REQUIRE_GPU=1 "$PY" -m affpipe.bench.gpu_full --out bench/gpu-full \
    --videos "$FULL_VIDEOS" --backend "$backend" --markdown BENCHMARKS.md
  collect bench/gpu-full
  finish
}

run_gpu() {
  report_env
  ensure_dali || true  # bench/gpu.py fails its DALI rows itself under AFFPIPE_REQUIRE_GPU
  # shellcheck disable=SC2086
  step gpu_bench "$GPU_LIMIT_S" ok env AFFPIPE_REQUIRE_GPU=1 "$PY" -m affpipe.bench.gpu --out bench/gpu \
    --markdown BENCHMARKS.md $GPU_ARGS
  if ensure_pytest; then
    # shellcheck disable=SC2046
    step gpu_tests "$TESTS_LIMIT_S" ok env AFFPIPE_REQUIRE_GPU=1 "$PY" -m pytest -q -p no:cacheprovider -m gpu $(gpu_tests)
  else
    FAILED+=("gpu_tests: pytest missing")
  fi
  collect bench/gpu
  finish
}

run_cpu_smoke() {
  export SMOKE=1  # nested runs leave .whl-parts/ where it is
  report_env
  local work
  work=$(mktemp -d)
  cp BENCHMARKS.md "$work/BENCHMARKS.md"
  # the "no DALI, no parts" branch, with DALI hidden (tests/nodali) and an empty parts folder
  PYTHONPATH="$ROOT/tests/nodali:$PYTHONPATH" PARTS="$work/no-parts" ensure_dali && FAILED+=("ensure_dali: found DALI where it was hidden")
  ensure_dali || say "(DALI absent here: the DALI rows will say so)"
  ensure_pytest || FAILED+=("pytest missing")
  step gpu_full_smoke 300 ok "$PY" -m affpipe.bench.gpu_full --out "$work/gpu-full" --cpu-smoke --markdown "$work/BENCHMARKS.md"
  step gpu_full_smoke_torch 300 ok "$PY" -m affpipe.bench.gpu_full --out "$work/gpu-full-torch" --cpu-smoke --backend torch
  step gpu_bench_smoke 300 ok "$PY" -m affpipe.bench.gpu --out "$work/gpu" --cpu-smoke --markdown "$work/BENCHMARKS.md"
  # shellcheck disable=SC2046
  step gpu_tests_skip 300 ok "$PY" -m pytest -q -p no:cacheprovider -m gpu $(gpu_tests)
  if "$PY" -c "import torch, sys; sys.exit(torch.cuda.is_available())"; then
    # without CUDA the switch must turn every GPU step into a failure
    # shellcheck disable=SC2046
    step gpu_tests_required 300 fail env AFFPIPE_REQUIRE_GPU=1 "$PY" -m pytest -q -p no:cacheprovider -m gpu $(gpu_tests)
    step gpu_full_required 120 fail env AFFPIPE_REQUIRE_GPU=1 "$PY" -m affpipe.bench.gpu_full --out "$work/r1" --cpu-smoke
    step gpu_bench_required 120 fail env AFFPIPE_REQUIRE_GPU=1 "$PY" -m affpipe.bench.gpu --out "$work/r2" --cpu-smoke
    # the two GPU runs themselves, end to end: each must fail at once here (nothing is written)
    step run1_without_cuda 120 fail env OUT= PY="$PY" "$0" full
    step run2_without_cuda 300 fail env OUT= PY="$PY" "$0" gpu
  fi
  collect "$work/gpu-full" "$work/gpu"
  rm -rf "$work"
  finish
}

fetch_wheels() {
  mkdir -p .gpu-wheels
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .gpu-wheels \
    pytest pluggy iniconfig packaging
  ls -l .gpu-wheels
}

case "${1:-}" in
  full) run_full ;;
  gpu) run_gpu ;;
  --cpu-smoke) run_cpu_smoke ;;
  wheels) fetch_wheels ;;
  *) sed -n '2,9p' "$0"; exit 2 ;;
esac
