"""Foundation: the demo builder, local loading, the tokenizer comparison and every loading error."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from explorer import models as M
from explorer.errors import (
    ConfigError,
    DimensionMismatchError,
    HookNotFoundError,
    MissingPathError,
    TokenizerMismatchError,
    UnknownModelError,
    UnknownSAEError,
)

HOOK = "blocks.1.hook_resid_pre"


def _specs(demo: Path):
    return dict(
        base=M.ModelSpec(path=str(demo / "base")),
        finetuned=M.ModelSpec(path=str(demo / "finetuned")),
        base_sae=M.SAESpec(path=str(demo / "saes" / "base_sae")),
        finetuned_sae=M.SAESpec(path=str(demo / "saes" / "finetuned_sae")),
    )


# ------------------------------------------------------------------ unit: no model loaded


def test_compare_vocabularies_hand_checked():
    base = {"a": 0, "b": 1, "c": 2, "d": 3}
    fin = {"a": 0, "b": 2, "c": 1, "e": 3}
    cmp = M.compare_vocabularies(base, fin)
    assert cmp.n_shared_strings == 3  # a b c
    assert cmp.n_matching_ids == 1  # only a
    assert cmp.only_in_base == ["d"] and cmp.only_in_finetuned == ["e"]
    assert cmp.same_string_different_id == [("b", 1, 2), ("c", 2, 1)]
    # union = 5 strings, 1 with the same id
    assert cmp.matching_id_share == pytest.approx(1 / 5)
    with pytest.raises(TokenizerMismatchError, match="20.0000% of tokens"):
        M.check_tokenizers(cmp, 0.99)
    M.check_tokenizers(M.compare_vocabularies(base, dict(base)), 0.99)


def test_spec_validation_messages():
    with pytest.raises(ConfigError, match="exactly one of"):
        M.ModelSpec()
    with pytest.raises(ConfigError, match="exactly one of"):
        M.ModelSpec(name="gpt2", path="x")
    with pytest.raises(ConfigError, match="hf_model"):
        M.ModelSpec(path="x", hf_model="y")
    with pytest.raises(ConfigError, match="unknown key"):
        M.ModelSpec.from_dict({"nmae": "gpt2"})
    with pytest.raises(ConfigError, match="both"):
        M.SAESpec(release="gemma-2b-res-jb")
    with pytest.raises(ConfigError, match="not both"):
        M.SAESpec(path="x", release="r", sae_id="i")
    spec = M.ModelSpec(name="gemma-2b", hf_model="shahdishank/gemma-2b-it-finetune-python-codes")
    assert M.ModelSpec.from_dict(spec.to_dict()) == spec
    sae = M.SAESpec(release="gemma-2b-res-jb", sae_id="blocks.6.hook_resid_post")
    assert M.SAESpec.from_dict(sae.to_dict()) == sae


def test_unknown_hub_names_fail_before_any_download():
    with pytest.raises(UnknownModelError, match="does not know the model 'not-a-real-model'"):
        M.load_model(M.ModelSpec(name="not-a-real-model"))
    with pytest.raises(UnknownSAEError, match="no release"):
        M.load_sae(M.SAESpec(release="no-such-release", sae_id="x"))
    with pytest.raises(UnknownSAEError, match="has no SAE"):
        M.load_sae(M.SAESpec(release="gemma-2b-res-jb", sae_id="blocks.99.hook_resid_post"))


def test_missing_paths(tmp_path):
    with pytest.raises(MissingPathError, match="does not exist"):
        M.load_model(M.ModelSpec(path=str(tmp_path / "nope")))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(MissingPathError, match="lacks model.safetensors"):
        M.load_model(M.ModelSpec(path=str(tmp_path / "half")))
    with pytest.raises(MissingPathError, match="does not exist"):
        M.load_sae(M.SAESpec(path=str(tmp_path / "nope")))
    with pytest.raises(MissingPathError, match="lacks cfg.json"):
        M.load_sae(M.SAESpec(path=str(tmp_path / "half")))


# ------------------------------------------------------------------ integration: tiny demo pair


def test_tiny_demo_builder_writes_a_complete_pair(tiny_demo):
    for sub in ("base", "finetuned"):
        meta = json.loads((tiny_demo / sub / "config.json").read_text())
        assert meta["format"] == M.LOCAL_MODEL_FORMAT
        tok_cfg = json.loads((tiny_demo / sub / "tokenizer" / "tokenizer_config.json").read_text())
        assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    for sae in ("base_sae", "finetuned_sae"):
        cfg = json.loads((tiny_demo / "saes" / sae / "cfg.json").read_text())
        assert cfg["metadata"]["hook_name"] == HOOK
        assert (tiny_demo / "saes" / sae / "sae_weights.safetensors").exists()
    corpus = pq.read_table(tiny_demo / "eval_corpus.parquet").to_pandas()
    assert set(corpus["source"]) == {"english", "python"}
    report = json.loads((tiny_demo / "REPORT.json").read_text())
    assert {(r["sae"], r["model"], r["source"]) for r in report["sae_evals"]} == {
        (s, m, src) for s in ("base_sae", "finetuned_sae") for m in ("base", "finetuned") for src in ("english", "python")
    }
    assert not (tiny_demo.parent / "demo.partial").exists()


def test_held_out_split_is_disjoint_and_deterministic():
    from precompute.demo import split_documents

    docs = [(f"doc{i}", "x") for i in range(500)]
    train, held = split_documents(docs, 0.1, seed=0)
    assert {n for n, _ in train}.isdisjoint({n for n, _ in held})
    assert len(train) + len(held) == 500 and 20 < len(held) < 80
    assert split_documents(docs, 0.1, seed=0) == (train, held)


def test_local_model_roundtrip(tiny_demo):
    model = M.load_model(M.ModelSpec(path=str(tiny_demo / "base")))
    saved = load_file(str(tiny_demo / "base" / "model.safetensors"))
    state = model.state_dict()
    for k, v in saved.items():
        assert torch.equal(state[k], v), k
    assert not model.training
    corpus = pq.read_table(tiny_demo / "eval_corpus.parquet")
    tokens = torch.tensor(corpus.column("token_ids").to_pylist()[:2])
    assert tokens[0, 0].item() == model.tokenizer.bos_token_id
    loss = model(tokens, return_type="loss").item()
    assert math.isfinite(loss)
    # the prompt path TransformerLens uses must give the same ids as the corpus tokenizer
    text = "def f(x):\n    return x"
    assert model.to_tokens(text)[0, 1:].tolist() == model.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_load_pair_checks_everything(tiny_demo):
    pair = M.load_pair(**_specs(tiny_demo))
    assert pair.hook == HOOK
    assert set(pair.saes) == {"base_sae", "finetuned_sae"}
    assert pair.tokenizer_comparison.matching_id_share == 1.0
    assert M.width_at_hook(pair.base, HOOK) == pair.base.cfg.d_model
    assert M.width_at_hook(pair.base, "blocks.0.mlp.hook_post") == pair.base.cfg.d_mlp


def test_hook_not_in_model(tiny_demo):
    with pytest.raises(HookNotFoundError, match="blocks.7.hook_resid_pre"):
        M.load_pair(**_specs(tiny_demo), hook="blocks.7.hook_resid_pre")


def test_sae_width_mismatch(tiny_demo, tmp_path):
    from sae_lens import StandardSAE, StandardSAEConfig

    d_model = json.loads((tiny_demo / "base" / "config.json").read_text())["tl_config"]["d_model"]
    sae = StandardSAE(StandardSAEConfig(d_in=d_model + 3, d_sae=8))
    sae.save_model(str(tmp_path / "wrong_sae"))
    specs = _specs(tiny_demo)
    specs["base_sae"] = M.SAESpec(path=str(tmp_path / "wrong_sae"))
    with pytest.raises(DimensionMismatchError, match=f"d_in={d_model + 3}.*width {d_model}"):
        M.load_pair(**specs, hook=HOOK)
    # an SAE at a hook of another width (the MLP) is caught too
    specs = _specs(tiny_demo)
    with pytest.raises(DimensionMismatchError):
        M.load_pair(**specs, hook="blocks.0.mlp.hook_post")


def test_tokenizer_mismatch(tiny_demo, tmp_path):
    from precompute.demo import train_tokenizer

    other = tmp_path / "other_finetune"
    shutil.copytree(tiny_demo / "finetuned", other)
    shutil.rmtree(other / "tokenizer")
    texts = ["Olá, tudo bem? Esta é uma frase em português. " * 50, "Obrigado e até logo! " * 50]
    train_tokenizer(texts, 512, other / "tokenizer")
    specs = _specs(tiny_demo)
    specs["finetuned"] = M.ModelSpec(path=str(other))
    with pytest.raises(TokenizerMismatchError, match="do not match"):
        M.load_pair(**specs)


def test_corrupt_local_config(tiny_demo, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_demo / "base", bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        M.load_model(M.ModelSpec(path=str(bad)))


# ------------------------------------------------------------------ the shipped demo pair


def test_shipped_demo_learned_and_is_small(shipped_demo):
    report = json.loads((shipped_demo / "REPORT.json").read_text())
    loss = report["heldout_loss"]
    ln_vocab = math.log(report["config"]["vocab_size"])
    assert loss["base"]["english"] < 0.6 * ln_vocab  # far below the untrained ln(vocab)
    assert loss["finetuned"]["python"] < loss["base"]["python"] - 0.5  # the finetune learned Python
    total = sum(p.stat().st_size for p in shipped_demo.rglob("*") if p.is_file())
    assert total < 30 * 2**20
    for row in report["sae_evals"]:
        assert 0 < row["l0"] < 100 and row["explained_variance"] > 0.5


def test_shipped_demo_report_loss_is_reproducible(shipped_demo):
    """Recompute the base model's held-out English loss from the shipped weights and corpus."""
    import numpy as np

    from precompute.demo import heldout_loss

    model = M.load_model(M.ModelSpec(path=str(shipped_demo / "base")))
    corpus = pq.read_table(shipped_demo / "eval_corpus.parquet").to_pandas()
    seqs = [list(t) for t in corpus.loc[corpus["source"] == "english", "token_ids"]]
    report = json.loads((shipped_demo / "REPORT.json").read_text())
    assert np.isclose(heldout_loss(model, seqs), report["heldout_loss"]["base"]["english"], atol=2e-3)
