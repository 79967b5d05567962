#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py has what it runs): one go on a bare CUDA machine with CUDA
# PyTorch and no network, after `pip install --no-deps --no-build-isolation -e .`.
#
#   benchmarks/gpu_check.sh OUT [more gpu_check.py options]
set -euo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT [options]}
shift
exec python "$(dirname "$0")/gpu_check.py" --out "$out" "$@"
