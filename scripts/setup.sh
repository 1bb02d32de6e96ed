#!/usr/bin/env bash
# One-time setup on a fresh Debian machine (run as root, or with sudo for the apt part).
#   - Debian's Chromium for the browser tests (Playwright drives it; never `playwright install`)
#   - the Debian text packages the demo builder reads English prose from
#   - the pinned Python stack (requirements.txt), then this project itself, editable, which puts
#     the `sae-transfer` command on PATH
# Skipped when it already ran with the same requirements, pyproject and this script
# (.cache/setup.stamp); pass --force to run it anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
STAMP=.cache/setup.stamp
KEY=$(cat requirements.txt pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "${1:-}" != "--force" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] && command -v sae-transfer >/dev/null 2>&1; then
  echo "setup: already done (rm $STAMP or pass --force to redo it)" >&2
  exit 0
fi
APT_PACKAGES="chromium fortunes fortunes-min dict-gcide wordnet-base git-doc python3.11-doc info"
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends $APT_PACKAGES >/dev/null
else
  echo "No apt-get: install Chromium and ($APT_PACKAGES) with your package manager." >&2
fi
python3 -m pip install -q -r requirements.txt
python3 -m pip install -q --no-deps --no-build-isolation -e .
mkdir -p .cache && echo "$KEY" > "$STAMP"
