#!/usr/bin/env bash
# The test suite under another torch, in its own venv, on a copy of the tree (so that the extension
# built here never replaces the one of the main run). Prints the time of each phase.
#
#   .ci/other_torch.sh 2.11.0 cuda   the GPU machine's stack: PyPI's CUDA 13 build of torch 2.11
#                                    (imports without a driver), the CUDA extension built for sm_90
#                                    with nvcc found by setup.py (no CUDA_HOME), then the suite
#   .ci/other_torch.sh 2.6.0 cpu     the oldest supported torch: the CPU extension, then the suite
#
# PyPI's Linux torch wheels depend on the CUDA libraries (GBs); for "cpu" they are installed too,
# since torch refuses to import without them. pip's cache (~/.cache/pip) makes a second run faster.
set -euo pipefail
version=${1:?usage: other_torch.sh TORCH_VERSION cpu|cuda}
kind=${2:?usage: other_torch.sh TORCH_VERSION cpu|cuda}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/fusedlr-torch-$version-XXXX")
trap 'rm -rf "$work"' EXIT
phase_start=$(date +%s)
phase() { local now; now=$(date +%s); echo "[torch $version/$kind] $1: $((now - phase_start))s"; phase_start=$now; }

python -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q "torch==$version" ninja setuptools wheel
phase "install torch"

mkdir "$work/src"
git -C "$root" ls-files -co --exclude-standard -z | tar -C "$root" --null -T - -cf - | tar -C "$work/src" -xf -
cd "$work/src"
if [ "$kind" = cuda ]; then
  export FUSEDLR_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  unset CUDA_HOME CUDA_PATH
else
  export FUSEDLR_BUILD_CUDA=0
fi
if ! FUSEDLR_BUILD_EXT=1 MAX_JOBS=${MAX_JOBS:-2} "$py" -m pip install -v --no-build-isolation -e ".[test]" \
  > "$work/build.log" 2>&1; then
  tail -n 60 "$work/build.log"
  exit 1
fi
grep -E "^fusedlr: (no )?CUDA folder" "$work/build.log" | sort -u
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

"$py" -m pytest -q -p no:cacheprovider
phase "test suite"
