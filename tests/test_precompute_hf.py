"""The precompute on Hugging Face models as users bring them (tests/hf_models.py): the example
config, bf16 against float32, a finetune with added tokens, hooks that are not the residual
stream, SAE normalization, TransformerBridge and SentencePiece-style models, and checks that
fail before any work."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from explorer import rundir, schema
from precompute.__main__ import main

REPO = Path(__file__).resolve().parent.parent
N_SEQ, CTX = 24, 32


def _run(cfg_path: Path, runs: Path, *extra: str) -> int:
    return main(["run", "--config", str(cfg_path), "--runs-dir", str(runs), "--no-progress", "--device", "cpu", *extra])


def config_text(run_id: str, base: Path, finetuned: Path, sae: Path, corpus: Path, *, finetuned_sae: Path | None = None,
                top: str = "", models: str = "", n_seq: int = N_SEQ) -> str:
    fin = f'[saes.finetuned_sae]\npath = "{finetuned_sae}"\n' if finetuned_sae else ""
    return f"""run_id = "{run_id}"
{top}
[models]
{models}
[models.base]
path = "{base}"
[models.finetuned]
path = "{finetuned}"
[saes.base_sae]
path = "{sae}"
{fin}[corpus]
path = "{corpus}"
[sample]
n_tokens = {n_seq * CTX}
context_size = {CTX}
batch_size = 8
seed = 1
[examples]
n_top = 4
n_quantile_bins = 2
n_per_quantile_bin = 2
quantile_sample = 8
"""


def table(run_dir: Path, name: str):
    return pq.read_table(run_dir / name).to_pandas()


def test_example_config_runs_with_paths_relative_to_its_folder(hf_models, tmp_path, capsys):
    """configs/example_hf.toml as shipped, except the sample size, in a folder laid out as it expects
    (../models/...): the paths resolve against the config's folder, the stored config keeps them as written."""
    models = tmp_path / "models"
    (models / "saes").mkdir(parents=True)
    for name, src in (("base", hf_models.gpt2["base"]), ("finetuned", hf_models.gpt2["finetuned"]), ("saes/base_sae", hf_models.saes["gpt2_relu"]), ("corpus.parquet", hf_models.corpus)):
        (models / name).symlink_to(src)
    text = (REPO / "configs" / "example_hf.toml").read_text()
    text = re.sub(r"n_tokens = \d+", f"n_tokens = {N_SEQ * CTX}", text)
    text = re.sub(r"context_size = \d+", f"context_size = {CTX}", text)
    (tmp_path / "configs").mkdir()
    cfg = tmp_path / "configs" / "example_hf.toml"
    cfg.write_text(text)
    assert _run(cfg, tmp_path / "runs") == 0
    err = capsys.readouterr().err
    assert "[precompute] corpus: " in err and "sequences available" in err
    man = rundir.open_run(tmp_path / "runs" / "my-finetune")
    assert man["config"]["models"]["base"] == {"path": "../models/base"}  # as written
    assert man["inputs"]["config_dir"] == str((tmp_path / "configs").resolve())
    load = man["loading"]
    assert {m["loader"] for m in load["models"].values()} == {"HookedTransformer"}
    assert load["processing"] == {k: False for k in load["processing"]} and load["dtype"] == "float32" and load["device"] == "cpu"
    assert load["saes"]["base_sae"]["hook_name"] == "blocks.1.hook_resid_post" and man["config"]["hook"] == "blocks.1.hook_resid_post"
    assert man["corpus"]["format"] == "parquet" and man["corpus"]["column"] == "text"
    feats = table(tmp_path / "runs" / "my-finetune", "features.parquet")
    assert len(feats) == 96 and np.isfinite(feats.logit_similarity).any()
    vocab = table(tmp_path / "runs" / "my-finetune", "vocab.parquet")
    assert len(vocab) == 3000 and set(vocab.columns) == set(schema.VOCAB.names)


@pytest.fixture(scope="module")
def gpt2_runs(hf_models, tmp_path_factory):
    """The GPT-2 pair in float32 and in bfloat16 (on the CPU), the accumulators' inputs recorded."""
    from precompute import accumulators as A

    seen: list[tuple] = []
    orig = A.QualityStats.update

    def spy(self, x, x_hat, l0, counted, outlier, losses, *rest, moments=None):
        seen.append((moments.x.dtype, *(a.dtype for pair in losses.values() for a in pair)))
        return orig(self, x, x_hat, l0, counted, outlier, losses, *rest, moments=moments)

    d = tmp_path_factory.mktemp("gpt2_runs")
    g = hf_models.gpt2
    out = {}
    A.QualityStats.update = spy
    try:
        for dtype in ("float32", "bfloat16"):
            cfg = d / f"{dtype}.toml"
            cfg.write_text(config_text(dtype, g["base"], g["finetuned"], hf_models.saes["gpt2_relu"], hf_models.corpus, finetuned_sae=hf_models.saes["gpt2_topk"]))
            seen.clear()
            assert _run(cfg, d / "runs", "--dtype", dtype) == 0
            out[dtype] = (d / "runs" / dtype, list(seen))
    finally:
        A.QualityStats.update = orig
    return out


def test_bf16_run_completes_close_to_float32_and_accumulates_in_float32(gpt2_runs):
    (d32, seen32), (d16, seen16) = gpt2_runs["float32"], gpt2_runs["bfloat16"]
    # the activations' reductions in float64 (numpy on the CPU, torch on a GPU), the losses handed over in float32
    assert seen16 and all(str(types[0]).endswith("float64") and all(t == np.float32 for t in types[1:]) for types in seen16 + seen32)
    m32, m16 = rundir.open_run(d32), rundir.open_run(d16)
    assert m16["loading"]["dtype"] == "bfloat16" and m16["config"]["models"]["dtype"] == "bfloat16"
    q32 = table(d32, "metrics.parquet").set_index(["sae", "model", "outliers"])
    q16 = table(d16, "metrics.parquet").set_index(["sae", "model", "outliers"]).loc[q32.index]
    for col, rel in (("ce_clean", 0.02), ("ce_spliced", 0.03), ("ce_zero_ablated", 0.02), ("mse", 0.1), ("l0", 0.1)):
        np.testing.assert_allclose(q16[col], q32[col], rtol=rel, err_msg=col)
    f32, f16 = table(d32, "features.parquet"), table(d16, "features.parquet")
    assert np.corrcoef(f32.density_base, f16.density_base)[0, 1] > 0.95
    r32, r16 = table(d32, "resid_summary.parquet"), table(d16, "resid_summary.parquet")
    np.testing.assert_allclose(r16["mean"], r32["mean"], rtol=0.05)


def test_added_tokens_run_uses_the_shared_vocabulary(hf_models, tmp_path):
    g = hf_models.gpt2
    cfg = tmp_path / "added.toml"
    cfg.write_text(config_text("added", g["base"], g["finetuned_added"], hf_models.saes["gpt2_relu"], hf_models.corpus))
    assert _run(cfg, tmp_path / "runs") == 0
    man = rundir.open_run(tmp_path / "runs" / "added")
    v = man["loading"]["vocabulary"]
    assert (v["n_base"], v["n_finetuned"], v["n_shared"]) == (3000, 3002, 3000)
    assert "shared vocabulary" in v["logits_on"] and v["added_at_end"]["tokens"] == ["<|im_start|>", "<|im_end|>"]
    feats = table(tmp_path / "runs" / "added", "features.parquet")
    ids = np.concatenate([np.concatenate(feats[c].to_list()) for c in ("logit_pos_ids_finetuned", "logit_neg_ids_finetuned")])
    assert ids.max() < 3000 and np.isfinite(feats.logit_similarity).all()


def test_vocabulary_problems_fail_before_the_stream(hf_models, tmp_path, capsys):
    """Token ids that only the larger vocabulary has: refused at prepare, nothing written."""
    import pyarrow as pa

    g = hf_models.gpt2
    corpus = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"token_ids": pa.array([[0] + [5] * (CTX - 2) + [3001]] * N_SEQ, pa.list_(pa.int32()))}), corpus)
    cfg = tmp_path / "v.toml"
    cfg.write_text(config_text("v", g["finetuned_added"], g["base"], hf_models.saes["gpt2_relu"], corpus))
    assert _run(cfg, tmp_path / "runs") == 2
    assert "token id 3001" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_hook_mismatch_fails_before_work_unless_allowed(hf_models, tmp_path, capsys):
    g = hf_models.gpt2
    base = config_text("hm", g["base"], g["finetuned"], hf_models.saes["gpt2_relu"], hf_models.corpus)
    cfg = tmp_path / "hm.toml"
    cfg.write_text(base.replace('run_id = "hm"', 'run_id = "hm"\nhook = "blocks.0.hook_resid_post"'))
    assert _run(cfg, tmp_path / "runs") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: base_sae was trained at 'blocks.1.hook_resid_post'") and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
    cfg.write_text(base.replace('run_id = "hm"', 'run_id = "hm"\nhook = "blocks.0.hook_resid_post"\nallow_hook_mismatch = true'))
    assert _run(cfg, tmp_path / "runs") == 0
    man = rundir.open_run(tmp_path / "runs" / "hm")
    assert man["config"]["hook"] == "blocks.0.hook_resid_post" and any("allow_hook_mismatch" in w for w in man["loading"]["warnings"])


def test_mlp_out_hook_runs_without_logits(hf_models, tmp_path):
    g = hf_models.gpt2
    cfg = tmp_path / "mlp.toml"
    cfg.write_text(config_text("mlp", g["base"], g["finetuned"], hf_models.saes["gpt2_mlp"], hf_models.corpus))
    assert _run(cfg, tmp_path / "runs") == 0
    man = rundir.open_run(tmp_path / "runs" / "mlp")
    assert man["config"]["hook"] == "blocks.1.hook_mlp_out"
    feats = table(tmp_path / "runs" / "mlp", "features.parquet")
    assert feats.logit_similarity.isna().all()  # the decoder does not write into the residual stream directly
    q = table(tmp_path / "runs" / "mlp", "metrics.parquet")
    assert np.isfinite(q.ce_spliced).all() and (q.l0 > 0).all()


def test_layer_norm_sae_is_run_with_its_normalization(hf_models, tmp_path):
    """normalize_activations = "layer_norm": the stream uses the SAE's own encode/decode (not the fast
    path), so the run's MSE is the naive one of sae(x) on the counted tokens."""
    import torch
    from sae_lens import SAE

    from precompute.sae_codec import SaeCodec
    from tests.hf_models import GPT2_HOOK, hook_activations, write_sae

    acts = hook_activations(hf_models.gpt2["base"], GPT2_HOOK, ["hello world"] * 50)
    sae_dir = write_sae(tmp_path / "ln_sae", acts, GPT2_HOOK, d_sae=48, normalize_activations="layer_norm")
    sae = SAE.load_from_disk(str(sae_dir))
    codec = SaeCodec(sae)
    assert not codec.fast
    x = acts[:40]
    with torch.no_grad():
        _, _, _, x_hat = codec.encode_decode(x)
        ref = sae.decode(sae.encode(x))
        plain = x @ sae.W_enc  # what ignoring the normalization would give differs
    torch.testing.assert_close(x_hat, ref)
    assert not torch.allclose(plain, sae.encode(x))
    g = hf_models.gpt2
    cfg = tmp_path / "ln.toml"
    cfg.write_text(config_text("ln", g["base"], g["finetuned"], sae_dir, hf_models.corpus, n_seq=8))
    assert _run(cfg, tmp_path / "runs") == 0
    run = tmp_path / "runs" / "ln"
    man = rundir.open_run(run)
    assert man["loading"]["saes"]["base_sae"]["normalize_activations"] == "layer_norm"
    tokens = np.stack(table(run, "tokens.parquet").token_ids.to_list())
    from explorer.models import ModelSpec, load_model

    model = load_model(ModelSpec(path=str(g["base"])))
    store = {}
    with torch.no_grad():
        model.run_with_hooks(torch.tensor(tokens, dtype=torch.long), return_type=None, fwd_hooks=[(GPT2_HOOK, lambda a, hook: store.setdefault("x", a))])
        xs = store["x"].reshape(-1, store["x"].shape[-1])
        counted = torch.tensor(~np.isin(tokens, man["special_token_ids"]).reshape(-1))
        xs = xs[counted]
        mse = ((sae.decode(sae.encode(xs)) - xs) ** 2).sum(-1).mean().item()
    row = table(run, "metrics.parquet").query("sae == 'base_sae' and model == 'base' and outliers == 'included'").iloc[0]
    assert row.mse == pytest.approx(mse, rel=1e-4)


def test_sae_context_and_bos_warnings_are_printed_and_recorded(hf_models, tmp_path, capsys):
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(hf_models.saes["gpt2_relu"]))
    sae.cfg.metadata.context_size, sae.cfg.metadata.prepend_bos = 128, False
    sae.save_model(str(tmp_path / "sae"))
    g = hf_models.gpt2
    cfg = tmp_path / "w.toml"
    cfg.write_text(config_text("w", g["base"], g["finetuned"], tmp_path / "sae", hf_models.corpus, n_seq=8))
    assert _run(cfg, tmp_path / "runs") == 0
    err = capsys.readouterr().err
    warnings = rundir.open_run(tmp_path / "runs" / "w")["loading"]["warnings"]
    for text in ("trained on contexts of 128 tokens; this run uses 32", "trained with prepend_bos=False"):
        assert any(text in w for w in warnings) and text in err


@pytest.mark.parametrize("family, sae_key", [("llama", "llama"), ("bigcode", None)])
def test_other_families_run(hf_models, tmp_path, family, sae_key):
    """A Llama pair (RMSNorm, rotary, SentencePiece-style tokens) and a TransformerBridge-only pair."""
    from tests.hf_models import LLAMA_HOOK, hook_activations, texts, write_sae

    pair = getattr(hf_models, family)
    sae = hf_models.saes.get(sae_key) if sae_key else write_sae(tmp_path / "sae", hook_activations(pair["base"], LLAMA_HOOK, texts()["english"]), LLAMA_HOOK, d_sae=48)
    cfg = tmp_path / f"{family}.toml"
    cfg.write_text(config_text(family, pair["base"], pair["finetuned"], sae, hf_models.corpus, n_seq=12))
    assert _run(cfg, tmp_path / "runs") == 0
    run = tmp_path / "runs" / family
    man = rundir.open_run(run)
    loader = {m["loader"] for m in man["loading"]["models"].values()}
    assert loader == ({"TransformerBridge"} if family == "bigcode" else {"HookedTransformer"})
    q = table(run, "metrics.parquet")
    assert np.isfinite(q[["ce_clean", "ce_spliced", "ce_zero_ablated", "mse"]].to_numpy()).all()
    if family == "llama":
        vocab = table(run, "vocab.parquet").set_index("token_piece")
        assert vocab.loc["\u2581the", "token_str"] == " the"  # SentencePiece's ▁ shown as a space
        assert vocab.loc["<0xC3>", "token_bytes"] == b"\xc3"


def test_cuda_without_a_gpu_is_a_clear_error(hf_models, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    g = hf_models.gpt2
    cfg = tmp_path / "c.toml"
    cfg.write_text(config_text("c", g["base"], g["finetuned"], hf_models.saes["gpt2_relu"], hf_models.corpus))
    assert main(["run", "--config", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: device 'cuda': this machine has no CUDA GPU") and "Traceback" not in err
    assert main(["run", "--config", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--dtype", "float8"]) == 2
    assert "--dtype must be one of" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_hook_z_sae_runs_on_flattened_heads(hf_models, tmp_path):
    """An SAE at attn.hook_z (d_in = n_heads * d_head): the run's MSE is the naive one of the SAE
    on the flattened per-head outputs, and the spliced loss is finite."""
    import torch

    from explorer.models import ModelSpec, load_model
    from tests.hf_models import _pack, texts, write_sae

    hook = "blocks.1.attn.hook_z"
    g = hf_models.gpt2
    model = load_model(ModelSpec(path=str(g["base"])))
    seqs = torch.tensor(_pack(model.tokenizer, texts()["english"], 32)[:32])
    store = {}
    with torch.no_grad():
        model.run_with_hooks(seqs, return_type=None, fwd_hooks=[(hook, lambda a, hook: store.setdefault("z", a))])
    z = store["z"].flatten(2).reshape(-1, store["z"].shape[2] * store["z"].shape[3])
    sae_dir = write_sae(tmp_path / "z_sae", z, hook, d_sae=40)
    cfg = tmp_path / "z.toml"
    cfg.write_text(config_text("z", g["base"], g["finetuned"], sae_dir, hf_models.corpus, n_seq=8))
    assert _run(cfg, tmp_path / "runs") == 0
    run = tmp_path / "runs" / "z"
    man = rundir.open_run(run)
    assert man["config"]["hook"] == hook
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(sae_dir))
    sae.turn_off_forward_pass_hook_z_reshaping()
    tokens = torch.tensor(np.stack(table(run, "tokens.parquet").token_ids.to_list()), dtype=torch.long)
    store.clear()
    with torch.no_grad():
        model.run_with_hooks(tokens, return_type=None, fwd_hooks=[(hook, lambda a, hook: store.setdefault("z", a))])
        xs = store["z"].flatten(2).reshape(-1, z.shape[1])
        xs = xs[torch.tensor(~np.isin(tokens.numpy(), man["special_token_ids"]).reshape(-1))]
        mse = ((sae.decode(sae.encode(xs)) - xs) ** 2).sum(-1).mean().item()
    q = table(run, "metrics.parquet")
    row = q.query("sae == 'base_sae' and model == 'base' and outliers == 'included'").iloc[0]
    assert row.mse == pytest.approx(mse, rel=1e-4) and np.isfinite(q.ce_spliced).all()
