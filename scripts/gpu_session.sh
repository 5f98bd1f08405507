#!/usr/bin/env bash
# One GPU session in one command: build the CUDA extension, run the whole test suite on the GPU,
# run the demo and the benchmarks. Logs and results go to $1 (default ./gpu-session).
# Usage: bash scripts/gpu_session.sh OUT_DIR [--quick]
set -uo pipefail
out=${1:-gpu-session}; shift || true
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
{ nvidia-smi -L; python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'; } 2>&1 | tee "$out/env.txt"
start=$(date +%s)
FUSEDLR_BUILD_CUDA=1 python3 -m pip install --no-build-isolation --no-deps --no-index -e . > "$out/build.log" 2>&1
echo "build rc=$? in $(( $(date +%s) - start ))s" | tee -a "$out/env.txt"
python3 -m fusedlr info 2>&1 | tee -a "$out/env.txt"
timeout 300 python3 -m pytest tests -q -x -rs -p no:cacheprovider > "$out/tests.log" 2>&1
echo "tests rc=$?" | tee -a "$out/env.txt"; tail -n 30 "$out/tests.log"
timeout 60 python3 -m fusedlr demo --steps 200 > "$out/demo.log" 2>&1; tail -n 3 "$out/demo.log"
timeout 330 python3 benchmarks/run.py --out "$out" "$@" > "$out/bench.log" 2>&1
echo "bench rc=$?" | tee -a "$out/env.txt"; tail -n 40 "$out/bench.log"
