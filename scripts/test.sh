#!/usr/bin/env bash
# Quick start, 2 of 2: set up (skipped when done) and run the test suite. CI runs exactly this.
#   bash scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m pytest "$@"
