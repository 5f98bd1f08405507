#!/usr/bin/env bash
# The test suite under another torch, in its own venv, on a copy of the tree (so that the extension
# built there never replaces the one of the main run). Prints the time of each phase.
#
#   .ci/other_torch.sh install DIR 2.11.0 cuda    venv + PyPI's torch 2.11 (the CUDA 13 build the GPU
#                                                 machine runs; imports without a driver)
#   .ci/other_torch.sh install DIR 2.6.0 cpu [REQ...]  venv + the oldest supported torch (+ extra
#                                                 requirements, e.g. pins that torch's era needs)
#   .ci/other_torch.sh test DIR [pytest args]     copy the tree, build the extension (for "cuda": the
#                                                 CUDA kernels for sm_90, nvcc found by setup.py, no
#                                                 CUDA_HOME), import fusedlr._C, run the suite
#
# "install" is network-bound: .ci/run starts it in the background while the main suite runs.
# PyPI's Linux torch wheels depend on the CUDA libraries (GBs), which torch needs to import even
# on a CPU machine; pip's cache (~/.cache/pip) makes a second run faster.
set -euo pipefail
action=${1:?usage: other_torch.sh install DIR VERSION cpu|cuda | test DIR [pytest args]}
dir=${2:?usage: other_torch.sh install DIR VERSION cpu|cuda | test DIR [pytest args]}
root=$(cd "$(dirname "$0")/.." && pwd)
phase_start=$(date +%s)
phase() { local now; now=$(date +%s); echo "[$(cat "$dir/label")] $1: $((now - phase_start))s"; phase_start=$now; }

if [ "$action" = install ]; then
  version=${3:?torch version}
  kind=${4:?cpu or cuda}
  shift 4
  rm -rf "$dir" && mkdir -p "$dir"
  echo "torch $version/$kind" > "$dir/label"
  echo "$kind" > "$dir/kind"
  python -m venv "$dir/venv"
  "$dir/venv/bin/python" -m pip install -q "torch==$version" ninja setuptools wheel "$@"
  phase "install torch"
  exit 0
fi

shift 2
py="$dir/venv/bin/python"
kind=$(cat "$dir/kind")
rm -rf "$dir/src" && mkdir "$dir/src"
git -C "$root" ls-files -co --exclude-standard -z | tar -C "$root" --null -T - -cf - | tar -C "$dir/src" -xf -
cd "$dir/src"
if [ "$kind" = cuda ]; then
  export FUSEDLR_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  unset CUDA_HOME CUDA_PATH
else
  export FUSEDLR_BUILD_CUDA=0
fi
if ! FUSEDLR_BUILD_EXT=1 MAX_JOBS=${MAX_JOBS:-2} "$py" -m pip install -v --no-build-isolation -e ".[test]" \
  > "$dir/build.log" 2>&1; then
  tail -n 60 "$dir/build.log"
  exit 1
fi
grep -E "^fusedlr: (no )?CUDA folder" "$dir/build.log" | sort -u || true
KIND=$kind "$py" - <<'EOF'
import os

import torch

import fusedlr._C
from fusedlr import extension

cuda = extension.has_kernel("cuda")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); fusedlr._C: {fusedlr._C.__file__}; CUDA kernels: {cuda}")
assert cuda == (os.environ["KIND"] == "cuda"), "the extension was not built as asked"
EOF
phase "build + import fusedlr._C"

"$py" -m pytest -q -p no:cacheprovider "$@"
phase "test suite"
