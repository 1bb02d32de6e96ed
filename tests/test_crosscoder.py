"""Crosscoders (issue 16): loading both formats against dictionary_learning's formulas, the codec
against the dense model, Latent Scaling on a hand-planted crosscoder with known answers, the
precompute's crosscoder tables against a naive recomputation on the tiny demo pair (with a planted
finetune-only latent: its base decoder row zeroed), the training command, bad inputs, and the app.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from explorer import crosscoder_store as cs
from explorer import rundir, schema
from explorer.crosscoder import CrosscoderCodec, load_crosscoder, save_crosscoder
from explorer.errors import ConfigError, DimensionMismatchError, MissingPathError

REPO = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------ dictionary_learning state dicts


def _dl_state_dict(d=5, f=7, seed=0, batchtopk=True, normalizer=False, code_id=1, prefix=""):
    """A state dict with dictionary_learning's CrossCoder / BatchTopKCrossCoder names and shapes."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "encoder.weight": torch.randn(2, d, f, generator=g),
        "encoder.bias": torch.randn(f, generator=g) * 0.3,
        "decoder.weight": torch.randn(2, f, d, generator=g) * torch.rand(2, f, 1, generator=g),
        "decoder.bias": torch.randn(2, d, generator=g),
        "code_normalization_id": torch.tensor(code_id),
    }
    if batchtopk:
        sd["k"] = torch.tensor(3, dtype=torch.int)
        sd["threshold"] = torch.tensor(0.8)
    if normalizer:
        sd["activation_mean"] = torch.randn(2, d, generator=g)
        sd["activation_std"] = torch.rand(2, d, generator=g) + 0.5
        sd["target_rms"] = torch.tensor(1.0)
        sd["activation_global_scale"] = 1.0 / torch.sqrt((sd["activation_std"] ** 2).sum(-1) + 1e-8)
    return {prefix + k: v for k, v in sd.items()}


def _dl_reference(sd: dict, x: np.ndarray, base_layer: int = 0):
    """dictionary_learning's BatchTopKCrossCoder.encode(use_threshold=True) and decode, in numpy
    (x: [N, 2, d] in the checkpoint's layer order). Returns f [N, f], xhat [N, 2, d]."""
    sd = {k.split("_orig_mod.")[-1]: v.double().numpy() for k, v in sd.items()}
    if "activation_mean" in sd:
        x = (x - sd["activation_mean"]) * sd["activation_global_scale"][None, :, None]
    f = np.maximum(np.einsum("bld,ldf->bf", x, sd["encoder.weight"]) + sd["encoder.bias"], 0)
    if "threshold" in sd:
        norms = np.linalg.norm(sd["decoder.weight"], axis=2)  # [2, f]
        code = {1: norms.sum(0), 2: np.sqrt((sd["decoder.weight"] ** 2).sum(axis=(0, 2))), 4: np.ones(norms.shape[1])}[int(sd.get("code_normalization_id", 1))]
        f = f * ((f * code) > sd["threshold"])
    xhat = np.einsum("bf,lfd->bld", f, sd["decoder.weight"]) + sd["decoder.bias"]
    if "activation_mean" in sd:
        xhat = xhat / (sd["activation_global_scale"][None, :, None] + 1e-8) + sd["activation_mean"]
    return f, xhat


@pytest.mark.parametrize(
    "variant",
    ["crosscoder_pt", "batchtopk_pt", "batchtopk_safetensors", "hub_dir", "compiled_prefix", "normalizer", "base_layer_1", "sae_code_norm", "old_no_code_id"],
)
def test_dictionary_learning_checkpoints_load_and_match_their_formulas(tmp_path, variant):
    from safetensors.torch import save_file

    sd = _dl_state_dict(
        batchtopk=variant != "crosscoder_pt", normalizer=variant == "normalizer", code_id=2 if variant == "sae_code_norm" else 1,
        prefix="_orig_mod." if variant == "compiled_prefix" else "",
    )
    if variant == "old_no_code_id":
        del sd["code_normalization_id"]
    base_layer = 1 if variant == "base_layer_1" else 0
    if variant in ("batchtopk_safetensors",):
        path = tmp_path / "cc.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif variant == "hub_dir":
        path = tmp_path / "hub"
        path.mkdir()
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps({"activation_dim": 5, "dict_size": 7, "num_layers": 2, "k": 3, "code_normalization": "CROSSCODER"}))
    else:
        path = tmp_path / "cc.pt"
        torch.save(sd, path)
    cc = load_crosscoder(path, base_layer=base_layer)
    assert cc.architecture == ("relu" if variant == "crosscoder_pt" else "batchtopk")
    assert (cc.d_in, cc.d_sae) == (5, 7) and cc.source.startswith("dictionary_learning")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 2, 5)) * 2  # in the checkpoint's layer order
    f_ref, xhat_ref = _dl_reference(sd, x, base_layer)
    b, ft = base_layer, 1 - base_layer
    xb, xf = (torch.from_numpy(x[:, i]).float() for i in (b, ft))
    f = cc.encode(xb, xf).double().numpy()
    assert (f > 0).sum() > 0 and ((f > 0) != (f_ref > 0)).sum() == 0
    np.testing.assert_allclose(f, f_ref, rtol=1e-4, atol=1e-5)
    xhat_b, xhat_f = (h.double().numpy() for h in cc.decode(torch.from_numpy(f_ref).float()))
    np.testing.assert_allclose(xhat_b, xhat_ref[:, b], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(xhat_f, xhat_ref[:, ft], rtol=1e-4, atol=1e-4)
    # this project's format writes it back and reads the same crosscoder
    save_crosscoder(cc, tmp_path / "own")
    again = load_crosscoder(tmp_path / "own")
    assert again.source == "this project's format" and again.architecture == cc.architecture
    np.testing.assert_array_equal(again.encode(xb, xf).numpy(), cc.encode(xb, xf).numpy())


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: _write(p / "x.pt", b"not a torch file"), "torch.load\\(weights_only=True\\) refused it"),
        (lambda p: (torch.save({"a": _Evil()}, p / "evil.pt"), p / "evil.pt")[1], "refused it"),
        (lambda p: (torch.save({"encoder.weight": torch.zeros(2, 3, 4)}, p / "m.pt"), p / "m.pt")[1], "lacks \\['encoder.bias'"),
        (lambda p: (torch.save({k: torch.zeros(3, *v.shape[1:]) if v.ndim and v.shape[0] == 2 else v for k, v in _dl_state_dict().items()}, p / "l3.pt"), p / "l3.pt")[1], "3 layers"),
        (lambda p: (torch.save({**_dl_state_dict(), "decoder.bias": torch.zeros(2, 9)}, p / "s.pt"), p / "s.pt")[1], "decoder.bias has shape"),
        (lambda p: (torch.save({**_dl_state_dict(), "code_normalization_id": torch.tensor(5)}, p / "dec.pt"), p / "dec.pt")[1], "decoupled code"),
        (lambda p: (torch.save({**_dl_state_dict(), "W_enc": torch.zeros(1)}, p / "x.pt"), p / "x.pt")[1], "tensors a CrossCoder does not"),
        (lambda p: _write(p / "cc.npz", b"PK"), "unknown file type '.npz'"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "neither cfg.json nor model.safetensors"),
        (lambda p: ((p / "own").mkdir(), (p / "own" / "cfg.json").write_text('{"format": "other"}'), (p / "own" / "crosscoder.safetensors").write_bytes(b"x"))
         and p / "own", "expected 'sae-transfer-explorer/crosscoder/v1'"),
    ],
)
def test_anything_else_is_a_clear_error(tmp_path, make, message, capsys):
    path = make(tmp_path)
    with pytest.raises(ConfigError, match=message) as info:
        load_crosscoder(path)
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)
    assert "pwned" not in capsys.readouterr().out  # the pickle's code never ran


def test_missing_crosscoder_is_a_missing_path(tmp_path):
    with pytest.raises(MissingPathError, match="does not exist"):
        load_crosscoder(tmp_path / "nope")


def test_codec_sparse_encode_decode_equal_the_dense_model(tmp_path):
    torch.save(_dl_state_dict(d=6, f=40, seed=3, normalizer=True), tmp_path / "c.pt")
    cc = load_crosscoder(tmp_path / "c.pt")
    g = torch.Generator().manual_seed(0)
    xb, xf = torch.randn(300, 6, generator=g) * 3, torch.randn(300, 6, generator=g) * 3
    dense = cc.encode(xb, xf)
    codec = CrosscoderCodec(cc)
    t, j, v = codec.encode_sparse(xb, xf)
    nz = torch.nonzero(dense > 0)
    assert len(t) > 100
    assert torch.equal(torch.stack([t, j], 1), nz) and torch.equal(v, dense[nz[:, 0], nz[:, 1]])
    for m, ref in enumerate(cc.decode(dense)):
        np.testing.assert_allclose(cc.denormalize(codec.decode_sparse(t, j, v, 300, m), m).numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
    rows = np.array([[0, 5, 299], [7, 7, 8]])
    lat = np.array([int(j[0]), 3])
    got = codec.encode_at(xb, xf, rows, lat)
    # the same dot products, summed in another order by BLAS (a row subset): equal to float32 rounding
    np.testing.assert_allclose(got, dense.numpy()[rows, lat[:, None]], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ Latent Scaling, hand-planted


def test_latent_scaling_on_a_hand_planted_crosscoder():
    """Five latents over four orthonormal directions e0..e3, activations built so that the
    crosscoder reconstructs the finetuned model exactly and the base model but for its e3 part,
    and the answers are known by hand:

      latent 0  d_B = 0,  d_F = e0; e0 only in x_F           real finetune-only: nu_eps = 0, nu_r = 0
      latent 1  d_B = 0,  d_F = e1; e1 in both, read on F      latent decoupling (its base twin is
      latent 3  d_B = e1, d_F = 0;  the base twin, read on B     latent 3): nu_eps = 0, nu_r = 1
      latent 4  d_B = 0,  d_F = e3; e3 in both, no base latent complete shrinkage: nu_eps = 1, nu_r = 0
      latent 2  d_B = d_F = e2 (shared)                         nu_eps = nu_r = 1
    """
    from explorer.crosscoder import Crosscoder
    from precompute.crosscoder_stats import CrosscoderStats

    d, n = 4, 400
    e = np.eye(d)
    W_enc = np.zeros((2, d, 5))
    W_dec = np.zeros((2, 5, d))
    W_enc[1, :, 0], W_dec[1, 0] = e[0], e[0]
    W_enc[1, :, 1], W_dec[1, 1] = e[1], e[1]
    W_enc[0, :, 3], W_dec[0, 3] = e[1], e[1]
    W_enc[:, :, 2], W_dec[:, 2] = 0.5 * e[2], e[2]
    W_enc[1, :, 4], W_dec[1, 4] = e[3], e[3]
    rng = np.random.default_rng(0)
    a = rng.exponential(size=(n, 4)) * (rng.random((n, 4)) < 0.4)  # coefficients of e0..e3, sparse
    x_f = a @ e
    x_b = a[:, 1:2] * e[1] + a[:, 2:3] * e[2] + a[:, 3:4] * e[3]
    t32 = lambda z: torch.tensor(z, dtype=torch.float32)  # noqa: E731
    cc = Crosscoder(W_enc=t32(W_enc), b_enc=torch.zeros(5), W_dec=t32(W_dec), b_dec=torch.zeros(2, d), architecture="relu")
    codec = CrosscoderCodec(cc)
    xb, xf = t32(x_b), t32(x_f)
    h_b, h_f = cc.decode(cc.encode(xb, xf))
    np.testing.assert_allclose(h_f.numpy(), x_f, atol=1e-6)  # the finetuned model exactly,
    np.testing.assert_allclose(h_b.numpy(), x_b - a[:, 3:4] * e[3], atol=1e-6)  # the base model but for e3
    stats = CrosscoderStats(5, d, 4, 8, 0)
    t, j, v = codec.encode_sparse(xb, xf)
    recon = [codec.decode_sparse(t, j, v, n, m) for m in range(2)]
    resid = [x - r for x, r in zip((xb, xf), recon)]
    proj_err, proj_rec = stats._projections(cc, t, j, recon, resid)
    stats.scaling.update(j.numpy().astype(np.int64), v.numpy().astype(np.float64), proj_err, proj_rec)
    out = stats.scaling.finalize(W_dec)
    expect = {0: (0, 0), 1: (0, 1), 4: (1, 0), 2: (1, 1)}
    for latent, (nu_e, nu_r) in expect.items():
        assert out["nu_error"][latent] == pytest.approx(nu_e, abs=1e-6), latent
        assert out["nu_recon"][latent] == pytest.approx(nu_r, abs=1e-6), latent
    assert out["beta_error"][1, 0, 0] == pytest.approx(1, abs=1e-6)  # the finetuned fit of a real latent is 1
    # latent 3 (base-only) has no finetuned decoder: Minder's ratios are undefined, the mirror's are known
    assert np.isnan(out["nu_error"][3])
    assert out["nu_error_mirror"][3] == pytest.approx(0, abs=1e-6) and out["nu_recon_mirror"][3] == pytest.approx(1, abs=1e-6)


# ------------------------------------------------------------------ the precompute on the tiny demo

PLANTED_SEQ = 64


@pytest.fixture(scope="module")
def planted(tiny_demo, tiny_crosscoder, tmp_path_factory):
    """The tiny crosscoder with the most active latent's base decoder row zeroed, and a run with it."""
    from tests.test_precompute import tiny_config_text, write_tiny_corpus

    d = tmp_path_factory.mktemp("planted")
    cc = load_crosscoder(tiny_crosscoder)
    train = json.loads((tiny_crosscoder / "training.json").read_text())
    corpus = write_tiny_corpus(tiny_demo, d / "corpus.parquet")
    # the latent with the largest decoder norm product fires often in the tiny run: plant it
    p = int(torch.argmax(cc.W_dec.norm(dim=2).prod(0)))
    cc.W_dec[0, p] = 0
    save_crosscoder(cc, d / "planted_cc", {"hook": cc.meta.get("hook")})
    cfg = d / "cfg.toml"
    cfg.write_text(tiny_config_text(tiny_demo, corpus, run_id="planted", n_seq=PLANTED_SEQ, extra=f'[crosscoder]\npath = "{d / "planted_cc"}"\nn_top = 5\n'))
    from precompute import prepare as prepare_mod
    from precompute import run as run_mod
    from precompute.config import RunConfig

    run_dir = run_mod.run(RunConfig.from_toml(cfg), runs_dir=d / "runs", progress=False)
    prep = prepare_mod.prepare(RunConfig.from_toml(cfg))
    return {"dir": run_dir, "prep": prep, "p": p, "cc": prep.crosscoder, "train": train, "runs": d / "runs"}


@pytest.fixture(scope="module")
def naive(planted):
    """Every activation of the sample at once: hooked forwards, the dense crosscoder, float64."""
    prep, cc = planted["prep"], planted["cc"]
    hook = prep.cfg.hook
    tokens = prep.sample.tokens
    counted = ~np.isin(tokens, prep.special_ids)
    xs = {}
    bs = prep.cfg.sample.batch_size
    with torch.inference_mode():  # the stream's batches, so that the activations are bitwise the stream's
        for m, model in (("base", prep.pair.base), ("finetuned", prep.pair.finetuned)):
            parts = []
            for b in range(prep.n_batches):
                _, cache = model.run_with_cache(torch.from_numpy(tokens[b * bs : (b + 1) * bs].astype(np.int64)), names_filter=[hook])
                parts.append(cache[hook].reshape(-1, cache[hook].shape[-1]))
            xs[m] = torch.cat(parts)
        rows = bs * tokens.shape[1]
        f = torch.cat([cc.encode(xs["base"][i : i + rows], xs["finetuned"][i : i + rows]) for i in range(0, len(xs["base"]), rows)])
        f = f.numpy().astype(np.float64)
        xhat = [h.numpy().astype(np.float64) for h in cc.decode(torch.from_numpy(f).float())]
        xn = [cc.normalize(xs[m], i).numpy().astype(np.float64) for i, m in enumerate(("base", "finetuned"))]
    cf = counted.reshape(-1)
    f[~cf] = 0
    return {"f": f, "x": {m: xs[m].numpy().astype(np.float64) for m in xs}, "xhat": xhat, "xn": xn, "counted": cf,
            "tokens": tokens, "W_dec": cc.W_dec.double().numpy(), "b_dec": cc.b_dec.double().numpy()}


def _lat(planted) -> pd.DataFrame:
    return pq.read_table(planted["dir"] / "crosscoder.parquet").to_pandas()


def test_run_lists_the_crosscoder_tables(planted):
    man = rundir.open_run(planted["dir"])
    assert schema.CROSSCODER_TABLES <= set(man["files"])
    for name in schema.CROSSCODER_TABLES:
        assert pq.read_schema(planted["dir"] / name).names == schema.TABLES[name].names
    s = man["summary"]["crosscoder"]
    assert s["d_sae"] == planted["cc"].d_sae and s["source"] == "this project's format" and s["architecture"] == "batchtopk"
    assert man["config"]["crosscoder"]["n_top"] == 5 and "crosscoder" in man["inputs"]


def test_latent_statistics_match_naive(planted, naive):
    lat = _lat(planted)
    f, cf = naive["f"], naive["counted"]
    n = cf.sum()
    W = naive["W_dec"]
    norms = np.linalg.norm(W, axis=2)
    np.testing.assert_allclose(lat.dec_norm_base, norms[0], rtol=1e-12)
    np.testing.assert_allclose(lat.dec_norm_finetuned, norms[1], rtol=1e-12)
    with np.errstate(invalid="ignore", divide="ignore"):
        np.testing.assert_allclose(lat.relative_norm, norms[1] / (norms[0] + norms[1]), rtol=1e-12)
        np.testing.assert_allclose(lat.dec_cos, (W[0] * W[1]).sum(1) / (norms[0] * norms[1]), rtol=1e-9)
    np.testing.assert_allclose(lat.density, (f > 0).sum(0) / n)
    np.testing.assert_allclose(lat.mean_act, f.sum(0) / n, rtol=1e-5)
    alive = (f > 0).any(0)
    np.testing.assert_allclose(lat.mean_active_act[alive], f.sum(0)[alive] / (f > 0).sum(0)[alive], rtol=1e-5)
    np.testing.assert_allclose(lat.max_act, f.max(0), rtol=1e-6)
    for j in range(f.shape[1]):
        pos = f[:, j][f[:, j] > 0]
        expected = np.bincount(np.clip(np.searchsorted(schema.ACT_HIST_EDGES, pos, side="right") - 1, 0, schema.N_ACT_HIST_BINS - 1), minlength=schema.N_ACT_HIST_BINS)
        np.testing.assert_array_equal(lat.act_hist[j], expected)
    assert alive.sum() > f.shape[1] // 2, "the tiny crosscoder should have live latents"


def test_latent_scaling_matches_least_squares(planted, naive):
    """beta by np.linalg.lstsq on the stacked vectors of every firing token, per latent and target."""
    lat = _lat(planted)
    f, W = naive["f"], naive["W_dec"]
    xhat_n = [naive["f"] @ W[m] + naive["b_dec"][m] for m in range(2)]  # normalised space
    checked = 0
    for j in range(f.shape[1]):
        on = f[:, j] > 0
        if not on.any():
            assert np.isnan(lat.nu_error[j])
            continue
        v = W[1, j]
        design = (f[on, j][:, None] * v[None, :]).reshape(-1, 1)
        betas = {}
        for m, name in enumerate(("base", "finetuned")):
            err = naive["xn"][m][on] - (xhat_n[m][on] - f[on, j][:, None] * W[m, j][None, :])
            betas["error", name] = np.linalg.lstsq(design, err.reshape(-1), rcond=None)[0][0]
            betas["recon", name] = np.linalg.lstsq(design, xhat_n[m][on].reshape(-1), rcond=None)[0][0]
        for kind in ("error", "recon"):
            for name in ("base", "finetuned"):
                assert lat[f"beta_{kind}_{name}"][j] == pytest.approx(betas[kind, name], rel=1e-4, abs=1e-6), (j, kind, name)
        assert lat.nu_error[j] == pytest.approx(betas["error", "base"] / betas["error", "finetuned"], rel=1e-3, abs=1e-6)
        assert lat.nu_recon[j] == pytest.approx(betas["recon", "base"] / betas["recon", "finetuned"], rel=1e-3, abs=1e-6)
        checked += 1
    assert checked > 10


def test_planted_latent_comes_out_finetune_only(planted, naive):
    """Base decoder row zeroed: relative norm 1, no share of the base reconstruction, in the
    finetune-only band at any threshold, and its Latent Scaling ratios are the least-squares ones:
    beta_recon on the base is the fit of f_p d_p^F to the base reconstruction, which no longer
    contains the latent (expected values by numpy, printed in the assertion message)."""
    lat = _lat(planted)
    p = planted["p"]
    row = lat.iloc[p]
    f, W = naive["f"], naive["W_dec"]
    on = f[:, p] > 0
    assert on.sum() > 20, "the planted latent must fire"
    assert row.relative_norm == 1.0 and row.dec_norm_base == 0 and np.isnan(row.dec_cos)
    assert row.density_base == 0 and row.density_finetuned == row.density > 0
    v = W[1, p]
    xhat_b = f @ W[0] + naive["b_dec"][0]
    xhat_f = f @ W[1] + naive["b_dec"][1]
    fit = lambda y: float((f[on, p][:, None] * y[on]).sum(0) @ v / ((v @ v) * (f[on, p] ** 2).sum()))  # noqa: E731
    nu_r = fit(xhat_b) / fit(xhat_f)
    nu_e = fit(naive["xn"][0] - xhat_b) / fit(naive["xn"][1] - xhat_f + f[:, p : p + 1] * v)  # own share: 0 on base
    assert row.nu_recon == pytest.approx(nu_r, rel=1e-4), f"expected nu_r {nu_r:.6f}"
    assert row.nu_error == pytest.approx(nu_e, rel=1e-4), f"expected nu_eps {nu_e:.6f}"
    assert np.isnan(row.nu_error_mirror)  # no base direction to fit
    for thr in (0.83, 0.99, 1.0):
        bands = cs.Bands(0.1, 0.4, 0.6, thr)
        page, total = cs.band_page(lat, "finetune_only", bands, "density", True, 1000, 0)
        assert p in set(page.feature_id)
    man = rundir.open_run(planted["dir"])
    assert man["summary"]["crosscoder"]["bands_alive"]["finetune_only"] >= 1
    # its examples write nothing into the base model
    ex = cs.latent_examples(planted["dir"], [p])
    assert len(ex) and all(max(a) == 0 for a in ex.acts_base) and any(max(a) > 0 for a in ex.acts_finetuned)


def test_top_examples_and_windows_match_naive(planted, naive):
    ex = cs.latent_examples(planted["dir"], range(planted["cc"].d_sae))
    top = ex[ex.kind == "top"]
    f, cf = naive["f"], naive["counted"]
    ctx = naive["tokens"].shape[1]
    n_top = planted["prep"].cfg.crosscoder.n_top
    g = np.arange(len(f))
    for j in range(f.shape[1]):
        firing = np.nonzero((f[:, j] > 0) & cf)[0]
        order = sorted(firing, key=lambda t: (-np.float32(f[t, j]), g[t]))[:n_top]
        rows = top[top.feature_id == j].sort_values("rank")
        assert (rows.seq_id * ctx + rows.position).tolist() == [int(t) for t in order]
    lat = _lat(planted).set_index("feature_id")
    tokens = naive["tokens"]
    fr = f.reshape(tokens.shape[0], ctx, -1)
    before, after = planted["prep"].cfg.examples.window_before, planted["prep"].cfg.examples.window_after
    for r in ex.sample(min(200, len(ex)), random_state=0).itertuples():
        ws, n = int(r.window_start), len(r.acts)
        assert ws == max(0, r.position - before) and ws + n == min(ctx, r.position + after + 1)
        np.testing.assert_array_equal(r.token_ids, tokens[r.seq_id, ws : ws + n])
        np.testing.assert_allclose(r.acts, fr[r.seq_id, ws : ws + n, r.feature_id], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r.acts_finetuned, np.asarray(r.acts) * lat.dec_norm_finetuned[r.feature_id], rtol=1e-6)
        assert r.acts[r.position - ws] == r.activation
    q = ex[ex.kind == "quantile"]
    assert len(q) and (q.activation >= q.bin_low - 1e-6).all() and (q.activation <= q.bin_high + 1e-6).all()


def test_nearest_features_and_links_match_brute_force(planted):
    lat = _lat(planted)
    prep, cc = planted["prep"], planted["cc"]
    links = pq.read_table(planted["dir"] / "crosscoder_links.parquet").to_pandas()
    for s, m in (("base_sae", 0), ("finetuned_sae", 1)):
        w = prep.pair.saes[s].W_dec.detach().double().numpy()
        w = w / np.linalg.norm(w, axis=1, keepdims=True)
        dd = cc.decoder_in_model_space(m).double().numpy()
        nz = np.linalg.norm(dd, axis=1) > 0
        du = dd / np.where(nz, np.linalg.norm(dd, axis=1), 1)[:, None]
        cos = du @ w.T  # [latents, features]
        for j in range(cc.d_sae):
            ids = list(lat[f"nearest_{s}_ids"][j])
            if not nz[j]:
                assert ids == []
                continue
            assert ids == np.argsort(-cos[j], kind="stable")[: len(ids)].tolist() and len(ids) == 5
            np.testing.assert_allclose(lat[f"nearest_{s}_cos"][j], cos[j, ids], rtol=1e-4, atol=1e-5)
        sub = links[links.sae == s]
        for i in range(w.shape[0]):
            got = sub[sub.feature_id == i].sort_values("rank")
            live = np.flatnonzero(nz)
            want = live[np.argsort(-cos[live, i], kind="stable")[:3]]
            assert got.latent_id.tolist() == want.tolist()
        if not nz[planted["p"]] and s == "base_sae":
            assert planted["p"] not in set(sub.latent_id)  # a zero row is nobody's neighbour


def test_metrics_match_naive(planted, naive):
    met = pq.read_table(planted["dir"] / "crosscoder_metrics.parquet").to_pandas().set_index(["model", "outliers"])
    prep, cc = planted["prep"], planted["cc"]
    cf = naive["counted"]
    tokens = torch.from_numpy(naive["tokens"].astype(np.int64))
    for i, (m, model) in enumerate((("base", prep.pair.base), ("finetuned", prep.pair.finetuned))):
        row = met.loc[(m, "included")]
        x, xh = naive["x"][m][cf], naive["xhat"][i][cf]
        sse = ((x - xh) ** 2).sum()
        assert row.explained_variance == pytest.approx(1 - sse / ((x - x.mean(0)) ** 2).sum(), rel=1e-5)
        assert row.mse == pytest.approx(sse / len(x), rel=1e-5)
        assert row.l0 == pytest.approx((naive["f"][cf] > 0).sum(1).mean(), rel=1e-9)
        xh_all = torch.from_numpy(naive["xhat"][i].reshape(*naive["tokens"].shape, -1)).float()
        x_all = torch.from_numpy(naive["x"][m].reshape(*naive["tokens"].shape, -1)).float()
        new = torch.where(torch.from_numpy(cf.reshape(naive["tokens"].shape))[..., None], xh_all, x_all)
        with torch.inference_mode():
            loss = model.run_with_hooks(tokens, return_type="loss", loss_per_token=True, fwd_hooks=[(prep.cfg.hook, lambda a, hook: new)]).numpy()
        assert row.ce_spliced == pytest.approx(loss[cf.reshape(naive["tokens"].shape)[:, :-1]].mean(), abs=1e-4)


def test_store_bands_and_histogram(planted):
    lat = cs.latents(planted["dir"])
    bands = cs.Bands(0.2, 0.4, 0.6, 0.8)
    counts = cs.band_counts(lat, bands)
    live = lat.density > 0
    assert counts["finetune_only"] == int(((lat.relative_norm >= 0.8) & live).sum())
    assert counts["shared"] == int(((lat.relative_norm >= 0.4) & (lat.relative_norm <= 0.6) & live).sum())
    h = cs.relative_norm_histogram(lat, 10)
    assert h["count"].sum() == live.sum() and len(h) == 10
    pts = cs.scatter_points(lat, bands)
    assert set(pts.band) <= {"finetune_only", "shared"} and np.isfinite(pts.nu_error).all()


# ------------------------------------------------------------------ config and command line


def test_bad_crosscoder_configs_fail_before_any_work(planted, tiny_demo, tmp_path):
    from precompute.__main__ import main
    from precompute.config import RunConfig

    corpus = tmp_path / "c.parquet"
    corpus.write_bytes((planted["dir"] / "tokens.parquet").read_bytes())
    with pytest.raises(ConfigError, match="unknown key"):
        RunConfig.from_toml(_cfg(tmp_path, tiny_demo, corpus, 'path = "x"\ncolour = 1'))
    with pytest.raises(ConfigError, match="bands need"):
        RunConfig.from_toml(_cfg(tmp_path, tiny_demo, corpus, 'path = "x"\nbase_only_max = 0.7'))
    with pytest.raises(ConfigError, match="base_layer"):
        RunConfig.from_toml(_cfg(tmp_path, tiny_demo, corpus, 'path = "x"\nbase_layer = 2'))
    # a missing crosscoder, and one of another width: one line, exit 2, no run directory
    torch.save(_dl_state_dict(d=7), tmp_path / "wide.pt")
    for path, message in ((tmp_path / "nope", "does not exist"), (tmp_path / "wide.pt", "d_in=7")):
        cfg = _cfg(tmp_path, tiny_demo, corpus, f'path = "{path}"')
        assert main(["run", "--config", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--no-progress"]) == 2
        assert not (tmp_path / "runs" / "bad").exists()
    with pytest.raises(DimensionMismatchError, match="d_in=7"):
        from precompute.prepare import prepare

        prepare(RunConfig.from_toml(_cfg(tmp_path, tiny_demo, corpus, f'path = "{tmp_path / "wide.pt"}"')))


def _cfg(tmp_path: Path, tiny_demo: Path, corpus: Path, section: str) -> Path:
    from tests.test_precompute import tiny_config_text

    p = tmp_path / "bad.toml"
    p.write_text(tiny_config_text(tiny_demo, corpus, run_id="bad", n_seq=8) + "[crosscoder]\n" + section + "\n")
    return p


def test_training_command_outputs(tiny_demo, tiny_crosscoder, tmp_path):
    from precompute.crosscoder_train import main

    cfg = json.loads((tiny_crosscoder / "cfg.json").read_text())
    assert cfg["format"] == "sae-transfer-explorer/crosscoder/v1" and cfg["architecture"] == "batchtopk" and cfg["hook"] == "blocks.1.hook_resid_pre"
    data = json.loads((tiny_crosscoder / "training.json").read_text())
    curve, info = data["curve"], data["info"]
    assert curve[0]["step"] == 0 and curve[-1]["step"] == info["config"]["tokens"] // info["config"]["batch_tokens"] - 1
    assert curve[-1]["loss"] < curve[0]["loss"]  # it learned
    for m in ("base", "finetuned"):
        assert 0 < info["eval"][m]["explained_variance"] <= 1
    report = json.loads((tiny_demo / "REPORT.json").read_text())
    assert report["crosscoder"]["train_seconds"] == info["train_seconds"]
    md = (tiny_demo / "REPORT.md").read_text()
    assert md.count("## Crosscoder") == 1 and "| base | all |" in md
    assert main(["--report-only", "--demo", str(tiny_demo), "--out", str(tiny_crosscoder)]) == 0
    assert (tiny_demo / "REPORT.md").read_text().count("## Crosscoder") == 1  # replaced, not appended
    # seeded: a second training gives the same weights
    from safetensors.torch import load_file

    copy = tmp_path / "demo"
    import shutil

    shutil.copytree(tiny_demo, copy, ignore=shutil.ignore_patterns("crosscoder"))
    assert main(["--tiny", "--demo", str(copy), "--out", str(copy / "cc")]) == 0
    a, b = load_file(str(tiny_crosscoder / "crosscoder.safetensors")), load_file(str(copy / "cc" / "crosscoder.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["--demo", str(tmp_path / "nothing")]) == 2


# ------------------------------------------------------------------ the app


@pytest.fixture
def app(planted, monkeypatch, tmp_path_factory):
    from streamlit.testing.v1 import AppTest

    from explorer.synthetic import make_run

    runs = planted["runs"]
    if not (runs / "synth").exists():
        make_run(runs / "synth", n_features=30, seed=1)
    monkeypatch.setenv("SAE_EXPLORER_RUNS_DIR", str(runs))

    def make(page: str, **params) -> AppTest:
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
        at.query_params.update({k: str(v) for k, v in params.items()})
        at.run()
        at.switch_page(page)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    return make


def _html(at) -> str:
    return "\n".join(h.proto.body for h in at.get("html"))


def test_crosscoder_page(app, planted):
    at = app("pages/7_crosscoder.py", run="planted")
    assert not at.error, [e.value for e in at.error]
    assert at.title[0].value == "Crosscoder"
    lat = cs.latents(planted["dir"])
    d = cs.Bands.from_config(rundir.open_run(planted["dir"])["config"]["crosscoder"])
    counts = cs.band_counts(lat, d)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["finetune-only"] == f"{counts['finetune_only']:,}" and metrics["shared"] == f"{counts['shared']:,}"
    met = cs.metrics(planted["dir"]).set_index(["model", "outliers"])
    assert metrics["FVE, base"] == f"{met.loc[('base', 'included'), 'explained_variance']:.3f}"
    assert [s.value for s in at.slider] == [(d.base_only_max, d.finetune_only_min), (d.shared_min, d.shared_max)]
    body = _html(at)
    assert f"latent {planted['p']}" in "\n".join(str(b.proto) for b in at.get("page_link"))  # the planted latent is listed
    assert 'data-model="base"' in body and 'data-model="finetuned"' in body


def test_crosscoder_page_bands_and_latent_from_the_url(app, planted):
    p = planted["p"]
    at = app("pages/7_crosscoder.py", run="planted", finetune_only_min="0.95", base_only_max="0.05", latent=p)
    assert not at.error, [e.value for e in at.error]
    lat = cs.latents(planted["dir"])
    d = cs.Bands.from_config(rundir.open_run(planted["dir"])["config"]["crosscoder"])
    bands = cs.Bands(0.05, d.shared_min, d.shared_max, 0.95)
    assert {m.label: m.value for m in at.metric}["finetune-only"] == f"{cs.band_counts(lat, bands)['finetune_only']:,}"
    assert at.slider[0].value == (0.05, 0.95)
    assert any(h.value == f"Latent {p}" for h in at.subheader)
    # moving a slider writes the URL
    at.slider[0].set_value((0.1, 0.9)).run()
    assert at.query_params["finetune_only_min"] in (["0.9"], "0.9") and at.query_params["base_only_max"] in (["0.1"], "0.1")


@pytest.mark.parametrize("params,message", [({"finetune_only_min": "lots"}, "is not a number"), ({"shared_min": "7"}, "outside \\[0, 1\\]"), ({"latent": "99999"}, "not a latent")])
def test_crosscoder_page_bad_params_are_friendly(app, params, message):
    import re

    from tests.helpers import md_text

    at = app("pages/7_crosscoder.py", run="planted", **params)
    assert any(re.search(message, md_text(e.value)) for e in at.error), [e.value for e in at.error]  # as shown: the message is inert text


def test_crosscoder_page_on_a_run_without_one(app):
    at = app("pages/7_crosscoder.py", run="synth")
    assert not at.error and any("no crosscoder" in i.value for i in at.info)


def test_feature_page_links_back_to_the_crosscoder(app, planted):
    links = pq.read_table(planted["dir"] / "crosscoder_links.parquet").to_pandas()
    row = links[(links.sae == "finetuned_sae") & (links["rank"] == 0)].iloc[0]
    at = app("pages/3_feature.py", run="planted", sae="finetuned_sae", feature=int(row.feature_id))
    assert not at.error, [e.value for e in at.error]
    pl = [b.proto for b in at.get("page_link")]
    mine = [x for x in pl if "7_crosscoder" in x.page or "crosscoder" in x.page]
    assert mine and f"latent {int(row.latent_id)}" in mine[0].label


# ------------------------------------------------------------------ the shipped crosscoder


def test_shipped_crosscoder_fits_the_demo_and_its_report_reproduces(shipped_demo):
    """data/demo/crosscoder loads, fits the demo pair's hook, is small, and its last curve point
    (FVE on the first evaluation sequences of each source) is recomputed from the shipped files."""
    from precompute.crosscoder_train import Activations, eval_sequences, evaluate

    path = shipped_demo / "crosscoder"
    cc = load_crosscoder(path)
    assert (cc.d_in, cc.d_sae, cc.architecture) == (128, 2048, "batchtopk") and cc.meta["hook"] == "blocks.1.hook_resid_pre"
    assert sum(p.stat().st_size for p in path.iterdir()) < 5 * 2**20
    data = json.loads((path / "training.json").read_text())
    report = json.loads((shipped_demo / "REPORT.json").read_text())["crosscoder"]
    assert report["eval"] == data["info"]["eval"] and "## Crosscoder" in (shipped_demo / "REPORT.md").read_text()
    last = data["curve"][-1]
    got = evaluate(cc, Activations(shipped_demo), eval_sequences(shipped_demo, data["info"]["config"]["eval_sequences"]))
    assert got["base"]["explained_variance"] == pytest.approx(last["eval_fve_base"], abs=1e-4)
    assert got["finetuned"]["explained_variance"] == pytest.approx(last["eval_fve_finetuned"], abs=1e-4)
    assert min(last["eval_fve_base"], last["eval_fve_finetuned"]) > 0.7


def test_the_in_memory_links_index_answers_what_the_file_reads_answer():
    """webapp's LinksIndex (loaded once per run) against cs.feature_links (two filtered reads per
    feature) for every feature of both SAEs of the shipped run."""
    run = Path(__file__).resolve().parent.parent / "data" / "runs" / "demo"
    idx = cs.LinksIndex(run)
    d_sae = json.loads((run / "manifest.json").read_text())["d_sae"]
    n_linked = 0
    for sae in ("base_sae", "finetuned_sae"):
        for fid in range(0, int(d_sae[sae]), 7):
            want = cs.feature_links(run, sae, fid)
            got = idx.links(sae, fid)
            n_linked += len(got) > 0
            pd.testing.assert_frame_equal(got.reset_index(drop=True), want[got.columns].reset_index(drop=True), check_dtype=False)
    assert n_linked > 100
