"""The README's quick start: two commands, each skipping set-up already done, and CI runs the second."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _bash_blocks(section: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert _bash_blocks(quick) == ["bash scripts/app.sh", "bash scripts/test.sh"]
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == ["bash scripts/test.sh"]
    for script in ("app.sh", "test.sh"):
        text = (REPO / "scripts" / script).read_text()
        assert "bash scripts/setup.sh" in text  # each sets up first
    assert "python3 -m pytest" in (REPO / "scripts" / "test.sh").read_text()
    assert "sae-transfer app --run demo" in (REPO / "scripts" / "app.sh").read_text()


def test_setup_is_skipped_when_already_done(tmp_path):
    """A copy of the repository's setup inputs with a matching stamp: setup.sh exits at once,
    touching nothing (no apt, no pip: the PATH below has neither, only bash, coreutils and a
    `sae-transfer` on PATH as the installed project puts it there)."""
    for rel in ("scripts/setup.sh", "requirements.txt", "pyproject.toml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, tmp_path / rel)
    key = hashlib.sha256(b"".join((tmp_path / rel).read_bytes() for rel in ("requirements.txt", "pyproject.toml", "scripts/setup.sh"))).hexdigest()
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "setup.stamp").write_text(key + "\n")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("cat", "sha256sum", "cut", "dirname"):
        os.symlink(shutil.which(tool), bindir / tool)
    (bindir / "sae-transfer").write_text("#!/bin/sh\nexit 0\n")
    (bindir / "sae-transfer").chmod(0o755)
    r = subprocess.run([shutil.which("bash"), "scripts/setup.sh"], cwd=tmp_path, env={"PATH": str(bindir)}, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "already done" in r.stderr
    # a changed requirements file invalidates the stamp: setup would run (here it fails at once: no apt-get/python3 on this PATH)
    (tmp_path / "requirements.txt").write_text("numpy==0\n")
    r = subprocess.run([shutil.which("bash"), "scripts/setup.sh"], cwd=tmp_path, env={"PATH": str(bindir)}, capture_output=True, text=True, timeout=30)
    assert "already done" not in r.stderr and r.returncode != 0
