"""Broken artefacts built from the tiny demo, shared by the bad-input tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def write_narrow_sae(demo: Path, out: Path, d_in: int = 16) -> Path:
    """The demo's base SAE re-saved with a d_in that is not the models' width."""
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(Path(demo) / "saes" / "base_sae"))
    cfg = sae.cfg.to_dict()
    cfg["d_in"] = d_in
    type(sae)(type(sae.cfg).from_dict(cfg)).save_model(str(out))
    return Path(out)


def write_renumbered_tokenizer_model(demo: Path, out: Path, shift: int = 7) -> Path:
    """A copy of the demo finetune whose tokenizer numbers the same strings differently."""
    shutil.copytree(Path(demo) / "finetuned", out)
    tj = Path(out) / "tokenizer" / "tokenizer.json"
    data = json.loads(tj.read_text())
    vocab = data["model"]["vocab"]
    ids = sorted(v for v in vocab.values() if v != 0)
    shifted = {old: ids[(i + shift) % len(ids)] for i, old in enumerate(ids)}
    data["model"]["vocab"] = {k: (v if v == 0 else shifted[v]) for k, v in vocab.items()}
    tj.write_text(json.dumps(data))
    return Path(out)
