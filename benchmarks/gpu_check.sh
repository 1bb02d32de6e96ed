#!/usr/bin/env bash
# The GPU path: the precompute at gemma-2-2b size (26 layers, d_model 2304, SAEs of 16k, bf16, both
# models, about 1M tokens) on one GPU, in at most 5 minutes. See benchmarks/gpu_check.py.
#   bash benchmarks/gpu_check.sh               # on cuda
#   bash benchmarks/gpu_check.sh --cpu-smoke   # every step at the tiny size on the CPU (tests)
# On a machine without this project's stack and without a package index (the lent GPU machine),
# first run `bash benchmarks/device_wheels.sh` where pip works and carry .whl there: the
# environment step below (benchmarks/device_env.sh) installs those wheels before any work.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/device_env.sh
source benchmarks/device_env.sh
exec python3 benchmarks/gpu_check.py "$@"
