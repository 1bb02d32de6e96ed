# Sourced by benchmarks/gpu_check.sh (bash): makes this project runnable on a machine that has
# torch, transformers, numpy, scipy, pyarrow and numba but not the rest of requirements.txt, and
# no package index (the lent GPU machine's image). On a machine set up with scripts/setup.sh every
# step below finds what it needs and does nothing but put the repository on PYTHONPATH.
#  1. The repository root on PYTHONPATH: the benchmarks' child processes import precompute.
#  2. sae_lens or transformer_lens missing: install $DEVICE_WHEELS/*.whl (default .whl/, written by
#     bash benchmarks/device_wheels.sh where pip reaches an index) into $DEVICE_SITE (default
#     /tmp/site), no index, no deps; stop with a message if there are none.
#  3. wandb still missing (its wheel does not fit the device's carry): a placeholder package named
#     wandb, in its own folder on PYTHONPATH, whose every attribute raises ImportError naming
#     itself. sae_lens imports wandb at the top of its training modules and uses it only while
#     training, which nothing here does; any use fails loudly instead of logging nowhere.
_device_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$_device_root${PYTHONPATH:+:$PYTHONPATH}"
_device_changed=""
_device_missing() {  # which of the named top-level modules cannot be found (no import: cheap)
  python3 - "$@" <<'PY'
import importlib.util, sys
def found(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
print(" ".join(m for m in sys.argv[1:] if not found(m)))
PY
}
_device_absent=$(_device_missing sae_lens transformer_lens)
if [ -n "$_device_absent" ]; then
  _device_wheels=${DEVICE_WHEELS:-$_device_root/.whl}
  if ! compgen -G "$_device_wheels/*.whl" >/dev/null; then
    echo "device_env: $_device_absent not installed here and $_device_wheels holds no wheels." >&2
    echo "  Install requirements.txt (bash scripts/setup.sh), or where pip reaches an index run" >&2
    echo "  'bash benchmarks/device_wheels.sh' and carry .whl to this machine." >&2
    return 2 2>/dev/null || exit 2
  fi
  DEVICE_SITE=${DEVICE_SITE:-/tmp/site}
  echo "device_env: installing $(ls "$_device_wheels"/*.whl | wc -l) wheels from $_device_wheels into $DEVICE_SITE" >&2
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$DEVICE_SITE" "$_device_wheels"/*.whl || { echo "device_env: installing .whl failed" >&2; return 2 2>/dev/null || exit 2; }
  export PYTHONPATH="$DEVICE_SITE:$PYTHONPATH"; _device_changed=1
fi
if [ -n "$(_device_missing wandb)" ]; then
  _device_shim=${DEVICE_SHIM:-/tmp/device_shim}
  mkdir -p "$_device_shim/wandb"
  cat > "$_device_shim/wandb/__init__.py" <<'PY'
"""Placeholder for wandb on a machine without it (benchmarks/device_env.sh). Not wandb."""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise ImportError(
        f"wandb.{name}: wandb is not installed on this machine; benchmarks/device_env.sh put this "
        "placeholder here so that sae_lens imports. Training with wandb logging needs the real package."
    )
PY
  echo "device_env: wandb is not installed; a placeholder that raises on use is at $_device_shim/wandb" >&2
  export PYTHONPATH="$_device_shim:$PYTHONPATH"; _device_changed=1
fi
if [ -n "$_device_changed" ] && ! _device_err=$(python3 -c "import sae_lens, transformer_lens, precompute" 2>&1); then
  echo "device_env: this project still does not import here:" >&2
  echo "$_device_err" | tail -3 >&2
  return 2 2>/dev/null || exit 2
fi
unset -f _device_missing; unset _device_root _device_absent _device_wheels _device_shim _device_err _device_changed
