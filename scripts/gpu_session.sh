#!/usr/bin/env bash
# A GPU session in two device commands of at most 9 minutes each, leaving at most 8 files in OUT_DIR:
#   bash scripts/gpu_session.sh OUT_DIR build test              # build, every test (+ the demo)
#   bash scripts/gpu_session.sh OUT_DIR build sanitize bench    # memcheck + racecheck, benchmarks
# Files: env.txt build.log tests.log sanitize.log bench.log + the benchmark results (json, md, png).
# The build is a no-op when the machine is still warm. Extra arguments after the phases go to
# benchmarks/run.py. The CUDA folder (nvcc, compute-sanitizer) is found by setup.py (--cuda-home).
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT_DIR PHASE... [-- benchmark args]}
shift
phases=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do phases+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
cuda_home=$(python3 setup.py --cuda-home 2>>"$out/env.txt")
log() { echo "$*" | tee -a "$out/env.txt"; }

for phase in "${phases[@]}"; do
  start=$(date +%s)
  case $phase in
    build)
      { nvidia-smi -L; python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'; date -u; } 2>&1 | tee -a "$out/env.txt"
      FUSEDLR_BUILD_EXT=1 FUSEDLR_BUILD_CUDA=1 timeout 240 python3 -m pip install -v --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1
      log "build rc=$?"
      python3 -m fusedlr info 2>&1 | tee -a "$out/env.txt"
      ;;
    test)
      timeout 420 python3 -m pytest tests -q -rs -p no:cacheprovider --durations=10 > "$out/tests.log" 2>&1
      log "tests rc=$?"
      timeout 40 python3 -m fusedlr demo --steps 200 >> "$out/tests.log" 2>&1
      log "demo rc=$?"
      tail -n 30 "$out/tests.log"
      ;;
    sanitize)
      sanitizer="$cuda_home/bin/compute-sanitizer"
      [ -x "$sanitizer" ] || sanitizer="$cuda_home/compute-sanitizer/compute-sanitizer"
      for tool in memcheck racecheck; do
        echo "=== $tool" >> "$out/sanitize.log"
        timeout 120 "$sanitizer" --tool "$tool" --error-exitcode 9 python3 scripts/sanitizer_case.py >> "$out/sanitize.log" 2>&1
        log "$tool rc=$?"
      done
      grep -E "ERROR SUMMARY|RACECHECK SUMMARY|ok$" "$out/sanitize.log"
      ;;
    bench)
      timeout 300 python3 benchmarks/run.py --time-limit-s 240 --out "$out" "$@" > "$out/bench.log" 2>&1
      log "bench rc=$?"
      tail -n 30 "$out/bench.log"
      ;;
    *) echo "unknown phase $phase (build, test, sanitize, bench)"; exit 2 ;;
  esac
  log "$phase: $(($(date +%s) - start))s"
done
