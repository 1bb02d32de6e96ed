"""The live probe and the pages on Hugging Face pairs (tests/hf_models.py): bf16 on the CPU, a
TransformerBridge pair against Hugging Face's own greedy generation, token display, the device
setting, and the hook kind named on the Overview."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from explorer import models as M
from explorer import probe as P
from explorer.hooks import hook_kind

REPO = Path(__file__).resolve().parent.parent
PROMPT = "A café in Köln: def f(x):\n    return x + 1\n"


def _pair(hf_models, family="gpt2", finetuned="finetuned", sae="gpt2_relu", **kw):
    fam = getattr(hf_models, family)
    return M.load_pair(M.ModelSpec(path=str(fam["base"])), M.ModelSpec(path=str(fam[finetuned])), M.SAESpec(path=str(hf_models.saes[sae])), **kw)


def test_probe_in_bf16_is_close_to_float32_and_shows_whole_characters(hf_models):
    p32, p16 = _pair(hf_models), _pair(hf_models, dtype="bfloat16")
    assert next(p16.base.parameters()).dtype == torch.bfloat16
    r32, r16 = P.probe(p32, PROMPT), P.probe(p16, PROMPT)
    assert r16.prompt.token_ids == r32.prompt.token_ids
    assert "".join(r32.prompt.token_strs[1:]) == PROMPT  # "é" and "ö" read whole although each is two byte tokens
    assert "" in r32.prompt.token_strs and any("span several tokens" in n for n in r32.prompt.notices)
    assert all(t.startswith(f"id {i} · piece ") for t, i in zip(r32.prompt.token_titles, r32.prompt.token_ids))
    a, b = r32.reconstruction.set_index(["sae", "model"]), r16.reconstruction.set_index(["sae", "model"])
    np.testing.assert_allclose(b["ce_clean"], a["ce_clean"], rtol=0.03)
    np.testing.assert_allclose(b["mse"], a["mse"], rtol=0.15)
    assert r16.hook_acts["base"].dtype == np.float32


def test_finetune_predictions_are_named_by_its_own_tokenizer(hf_models):
    pair = _pair(hf_models, finetuned="finetuned_added")
    ids = np.array([[[3001, 5]]])  # [variants, positions, k]
    frame = P._predictions_frame({"base": pair.base.tokenizer, "finetuned": pair.finetuned.tokenizer}, ("clean",), [("finetuned", ids, np.ones(ids.shape))])
    assert frame["token_str"].tolist()[0] == "<|im_end|>"  # an added token the base tokenizer does not have
    result = P.probe(pair, "hello there")
    assert set(result.predictions.model) == {"base", "finetuned"}


def test_bridge_pair_probes_and_steers_like_hugging_face(hf_models, tmp_path):
    """GPTBigCode loads as a TransformerBridge (no key-value cache): the unsteered continuation is
    Hugging Face's own greedy generation."""
    from transformers import AutoModelForCausalLM

    from tests.hf_models import LLAMA_HOOK, hook_activations, texts, write_sae

    fam = hf_models.bigcode
    sae = write_sae(tmp_path / "sae", hook_activations(fam["base"], LLAMA_HOOK, texts()["english"]), LLAMA_HOOK, d_sae=32)
    pair = M.load_pair(M.ModelSpec(path=str(fam["base"])), M.ModelSpec(path=str(fam["finetuned"])), M.SAESpec(path=str(sae)))
    assert type(pair.base).__name__ == "TransformerBridge"
    prompt = P.prepare_prompt(pair, "def f(x):\n    return")
    result = P.probe(pair, prompt)
    assert np.isfinite(result.reconstruction[["ce_clean", "ce_spliced", "ce_zero_ablated"]].to_numpy()).all()
    steered = P.steer(pair, prompt, sae="base_sae", feature_id=0, coef=0.0, n_new_tokens=6)
    hf = AutoModelForCausalLM.from_pretrained(str(fam["base"]), attn_implementation="eager")
    hf.eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt.token_ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, prompt.n_tokens :].tolist()
    row = steered.continuations.set_index("model").loc["base"]
    assert row.unsteered_ids == ref and row.steered_ids == ref  # coefficient 0: no change


def test_live_probe_loads_the_runs_dtype_on_the_chosen_device(hf_models, monkeypatch):
    from webapp import live

    g = hf_models.gpt2
    manifest = {
        "config": {
            "hook": "blocks.1.hook_resid_post",
            "models": {"dtype": "bfloat16", "processing": "none", "base": {"path": str(g["base"])}, "finetuned": {"path": str(g["finetuned"])}},
            "saes": {"base_sae": {"path": str(hf_models.saes["gpt2_relu"])}},
            "thresholds": {"min_matching_id_share": 0.99},
        },
        "inputs": {"config_dir": "configs"},
    }
    key = json.loads(live.pair_key(manifest))
    assert key["dtype"] == "bfloat16" and key["processing"] == "none" and key["root"] == str(REPO / "configs") and key["device"] == "auto"
    if not torch.cuda.is_available():
        monkeypatch.setenv(live.DEVICE_ENV, "cuda")
        from explorer.errors import ConfigError

        with pytest.raises(ConfigError, match="live probe cannot load this run's models: device 'cuda': this machine has no CUDA GPU"):
            live.get_pair(live.pair_key(manifest))
    monkeypatch.setenv(live.DEVICE_ENV, "cpu")
    pair = live.get_pair(live.pair_key(manifest))
    assert next(pair.base.parameters()).dtype == torch.bfloat16 and pair.loading["device"] == "cpu"


def test_hook_kinds():
    assert hook_kind("blocks.6.hook_resid_post") .residual and hook_kind("blocks.0.hook_resid_pre").label == "residual stream"
    assert hook_kind("blocks.1.hook_mlp_out").label == "MLP out" and not hook_kind("blocks.1.hook_mlp_out").residual
    assert hook_kind("blocks.1.hook_attn_out").label == "attention out"
    assert hook_kind("blocks.1.attn.hook_z").label.startswith("attention hook_z")
    assert not hook_kind(None).residual


@pytest.mark.parametrize("hook, title, study_t", [("blocks.1.hook_resid_pre", "Residual stream similarity", True), ("blocks.1.hook_mlp_out", "MLP out similarity", False)])
def test_overview_names_the_hook_kind(tmp_path, monkeypatch, hook, title, study_t):
    from streamlit.testing.v1 import AppTest

    from explorer import rundir, schema
    from explorer.synthetic import make_run

    run = make_run(tmp_path / "runs" / "k", n_features=20, seed=1)
    manifest = json.loads((run / schema.MANIFEST).read_text())
    manifest["config"]["hook"] = hook
    manifest.pop("schema_version", None)
    rundir.write_manifest(run, manifest)
    monkeypatch.setenv("SAE_EXPLORER_RUNS_DIR", str(tmp_path / "runs"))
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.query_params["run"] = "k"
    at.run()
    assert not at.exception
    assert any(s.value.startswith(title) for s in at.subheader), [s.value for s in at.subheader]
    captions = " ".join(c.value for c in at.caption).replace("\\", "")  # the Markdown source: inert escapes punctuation
    assert ("mean cosine 0.669 for Gemma-2b" in captions) == study_t
    assert ("Study T's residual-stream cosines do not compare" in captions) == (not study_t)
