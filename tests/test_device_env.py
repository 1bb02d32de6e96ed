"""benchmarks/device_env.sh, which gpu_check.sh sources so that it runs on the lent GPU machine
(torch and transformers there, no sae_lens / transformer_lens / wandb, no package index). Here the
missing packages are simulated: a sitecustomize on PYTHONPATH hides the named top-level modules
wherever they sit in site-packages, so they are found only in the folders device_env.sh adds."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

HIDE = textwrap.dedent('''
    import importlib.machinery, os, sys

    HIDDEN = set(filter(None, os.environ.get("TEST_HIDDEN_MODULES", "").split(",")))

    class Hide:
        def find_spec(self, name, path=None, target=None):
            if path is not None or name not in HIDDEN:
                return None
            dirs = [p for p in sys.path if "site-packages" not in p]
            spec = importlib.machinery.PathFinder.find_spec(name, dirs)
            if spec is None:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return spec

    sys.meta_path.insert(0, Hide())
''')


def _source(tmp_path: Path, hidden: str, then: str, **env: str) -> subprocess.CompletedProcess:
    hide = tmp_path / "hide"
    hide.mkdir(exist_ok=True)
    (hide / "sitecustomize.py").write_text(HIDE)
    full = {**os.environ, "PYTHONPATH": str(hide), "TEST_HIDDEN_MODULES": hidden,
            "DEVICE_SHIM": str(tmp_path / "shim"), "DEVICE_SITE": str(tmp_path / "site"), **env}
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source benchmarks/device_env.sh; {then}"],
                          cwd=REPO, env=full, capture_output=True, text=True, timeout=300)


def test_without_wandb_a_placeholder_lets_sae_lens_import_and_raises_on_use(tmp_path):
    check = ("import sae_lens, wandb, precompute\n"
             f"assert wandb.__file__.startswith({str(tmp_path / 'shim')!r}), wandb.__file__\n"
             "assert sae_lens.SAE is not None\n"
             "try:\n    wandb.Artifact\nexcept ImportError as e:\n    print('RAISED', e)\n")
    (tmp_path / "check.py").write_text(check)
    proc = _source(tmp_path, "wandb", f"python3 {tmp_path / 'check.py'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RAISED wandb.Artifact: wandb is not installed on this machine" in proc.stdout
    assert "a placeholder that raises on use" in proc.stderr
    # the real wandb is what this machine has: without the hiding, no placeholder is made
    plain = subprocess.run(["bash", "-c", "source benchmarks/device_env.sh; python3 -c 'import wandb; print(wandb.__file__)'"],
                           cwd=REPO, env={**os.environ, "DEVICE_SHIM": str(tmp_path / "shim2")}, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and "site-packages" in plain.stdout and not (tmp_path / "shim2").exists()


def test_without_sae_lens_or_wheels_it_stops_with_a_message_before_any_work(tmp_path):
    (tmp_path / "nowheels").mkdir()
    proc = _source(tmp_path, "sae_lens,transformer_lens", "echo SHOULD-NOT-RUN", DEVICE_WHEELS=str(tmp_path / "nowheels"))
    assert proc.returncode == 2
    assert "SHOULD-NOT-RUN" not in proc.stdout and "Traceback" not in proc.stderr
    assert "sae_lens transformer_lens not installed here" in proc.stderr
    assert "bash benchmarks/device_wheels.sh" in proc.stderr
