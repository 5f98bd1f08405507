#!/usr/bin/env bash
# A GPU session in few commands: build the CUDA extension, run the whole test suite on the GPU, the demo
# and the benchmarks. Logs and results go to OUT_DIR.
# Usage: bash scripts/gpu_session.sh OUT_DIR [all|build|test|bench] [extra benchmarks/run.py args]
# "all" needs about 12 minutes on an H100; where one command may run 10 minutes at most, run
# "build test" phases in one command and "build bench" in the next (the build is a no-op when warm).
set -uo pipefail
out=${1:-gpu-session}
phase=${2:-all}
shift $(( $# < 2 ? $# : 2 ))
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
want() { [ "$phase" = all ] || [ "$phase" = "$1" ] || [ "$1" = build ]; }

if want build; then
  { nvidia-smi -L; python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'; date -u; } 2>&1 | tee -a "$out/env.txt"
  start=$(date +%s)
  FUSEDLR_BUILD_CUDA=1 python3 -m pip install --no-build-isolation --no-deps --no-index -e . > "$out/build.log" 2>&1
  echo "build rc=$? in $(( $(date +%s) - start ))s" | tee -a "$out/env.txt"
  python3 -m fusedlr info 2>&1 | tee -a "$out/env.txt"
fi
if want test; then
  timeout 420 python3 -m pytest tests -q -rs -p no:cacheprovider --durations=10 > "$out/tests.log" 2>&1
  echo "tests rc=$?" | tee -a "$out/env.txt"; tail -n 40 "$out/tests.log"
  timeout 60 python3 -m fusedlr demo --steps 200 > "$out/demo.log" 2>&1; tail -n 3 "$out/demo.log"
fi
if want bench; then
  timeout 360 python3 benchmarks/run.py --out "$out" "$@" > "$out/bench.log" 2>&1
  echo "bench rc=$?" | tee -a "$out/env.txt"; tail -n 40 "$out/bench.log"
fi
