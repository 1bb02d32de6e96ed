#!/usr/bin/env bash
# Every benchmark of benchmarks/RESULTS.md, one after the other, with the commands quoted there.
# Run on an otherwise idle machine (about 15 minutes on 2 cores; B1 builds SAEDashboard's venv
# on first use, a few minutes more). Results land in benchmarks/results/*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
run() { echo "== $*"; uptime; "$@"; }
run python3 benchmarks/b2_physical_limit.py --reps 3 --out benchmarks/results/b2.json
run python3 benchmarks/b1_vs_saedashboard.py --reps 3 --threads 1 --out benchmarks/results/b1.json
run python3 benchmarks/b5_probe_latency.py --threads 1,2 --out benchmarks/results/b5.json
run python3 benchmarks/b4_store_latency.py --real data/runs/demo --n 200 --out benchmarks/results/b4.json
run python3 benchmarks/b3_memory.py --reps 1 --out benchmarks/results/b3.json
run python3 benchmarks/b6_time_to_content.py --cold 2 --warm 3 --out benchmarks/results/b6.json
uptime
