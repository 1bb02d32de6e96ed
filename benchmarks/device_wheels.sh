#!/usr/bin/env bash
# Wheels for a machine that has torch, transformers, numpy, scipy, pyarrow, numba (and their needs)
# but not this project's interpretability stack, and no package index: the lent GPU machine.
# Run it here, where pip reaches an index; it writes .whl/ (in .gitignore) for `run --carry .whl`,
# and benchmarks/device_env.sh (sourced by gpu_check.sh) installs them there with no index.
#   bash benchmarks/device_wheels.sh                  # CPython 3.12, manylinux x86_64 (the device image)
#   PYTHON_VERSION=3.11 bash benchmarks/device_wheels.sh
# The versions are requirements.txt's pins, and for their needs the versions installed here (the
# ones the test suite passes with). wandb is left out, and with it its needs (pydantic, platformdirs):
# its wheel (20 MB, a compiled core) does not fit the device machine's 64 MiB carry with this tree,
# and nothing here uses it; device_env.sh puts a placeholder in its place.
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${PYTHON_VERSION:-3.12}
pin() { grep -E "^$1==" requirements.txt | sed -E 's/[[:space:]]*#.*//' | tr -d ' '; }
have() { python3 -c "import importlib.metadata as m, sys; print(sys.argv[1] + '==' + m.version(sys.argv[1]))" "$1"; }
SPECS="$(pin sae-lens) $(pin transformer-lens) $(pin datasets)"
for dist in better-abc simple-parsing docstring_parser multiprocess dill; do
  SPECS="$SPECS $(have "$dist")" || { echo "device_wheels: $dist is not installed here; run scripts/setup.sh first" >&2; exit 2; }
done
rm -rf .whl && mkdir -p .whl
PLATFORMS=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS="$PLATFORMS --platform $p"
done
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp $PLATFORMS -d .whl $SPECS
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
limit=$((64 * 1024 * 1024))
printf 'device_wheels: %d wheels, %.1f MB; tracked tree %.1f MB; together %.1f of %.1f MB a call carries\n' \
  "$(ls .whl/*.whl | wc -l)" "$(echo "$wheels / 1000000" | bc -l)" "$(echo "$tree / 1000000" | bc -l)" \
  "$(echo "($wheels + $tree) / 1000000" | bc -l)" "$(echo "$limit / 1000000" | bc -l)"
if [ $((wheels + tree)) -ge $limit ]; then
  echo "device_wheels: the tree and the wheels exceed what one call carries" >&2; exit 1
fi
