#!/usr/bin/env bash
# Build the isolated venv that B1 runs SAEDashboard in: benchmarks/_work/saedash-venv.
#
#   bash benchmarks/saedashboard_venv.sh            # idempotent: reuses a complete venv
#   bash benchmarks/saedashboard_venv.sh --force    # rebuild from scratch
#
# sae-dashboard 0.8.0 pins transformer-lens<3, transformers<4.57 and sae-lens 6.x, which clash
# with the main environment (transformer-lens 3.9, transformers 5), hence its own venv.
# Order matters:
#   1. torch==2.13.0 first, by exact pin: this machine's pip finds the CPU wheel on disk
#      (/opt/wheels). A looser spec would pull a multi-GB CUDA build from PyPI.
#   2. sae-dashboard==0.8.0 with torch already satisfied.
#   3. uninstall torchvision/torchaudio if a dependency pulled them in (unused, and their
#      binaries are built against another torch).
# Workaround, pyarrow<26: sae-dashboard's transformer-lens 2.x pins numpy<2 (on Python 3.11),
# but pip then picks pyarrow 26, whose compiled module refuses numpy 1.x at import ("pyarrow
# requires NumPy 2.0 or newer"; its metadata does not say so, so the resolver cannot see it).
# datasets (imported by transformer-lens) imports pyarrow, so nothing loads. pyarrow 25.0.1 is
# the newest that imports with numpy 1.26.4.
# The venv is marked complete by a stamp file written last, so an interrupted build is redone.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${SAEDASH_VENV:-$HERE/_work/saedash-venv}"
STAMP="$VENV/.b1-complete"
STAMP_TEXT="torch==2.13.0 sae-dashboard==0.8.0 pyarrow<26 v2"

if [[ "${1:-}" == "--force" ]]; then
    rm -rf "$VENV"
fi
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" ]]; then
    echo "[saedash-venv] reusing $VENV"
    exit 0
fi

rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install "sae-dashboard==0.8.0" "torch==2.13.0" "pyarrow<26"
"${PIP[@]}" uninstall -y torchvision torchaudio 2>/dev/null || true
"$VENV/bin/python" -c "
import importlib.metadata as md
import sae_dashboard.neuronpedia.neuronpedia_runner, sae_dashboard.sae_vis_runner
print('[saedash-venv] ok:', ', '.join(p + ' ' + md.version(p) for p in ('torch', 'sae-dashboard', 'sae-lens', 'transformer-lens', 'transformers', 'numpy', 'pyarrow')))
"
echo "$STAMP_TEXT" > "$STAMP"
echo "[saedash-venv] built $VENV"
