#!/usr/bin/env bash
# Quick start, 1 of 2: set up (skipped when done) and start the explorer on the shipped demo run.
#   bash scripts/app.sh [--port N]      -> http://127.0.0.1:8501/overview?run=demo
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec sae-transfer app --run demo "$@"
