"""Integration tests of the precompute on a tiny real demo pair: every table against a naive
recomputation (all activations of the sample held at once, plain TransformerLens hooked forwards,
numpy), against SAELens's own `run_evals`, and sharded / merged against one pass.

Interrupt-and-resume is in test_crash.py; bad configs in test_precompute_errors.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from explorer import rundir, schema
from explorer.errors import ConfigError
from precompute import calibration, forward, hook_cache, pass_state
from precompute import prepare as prepare_mod
from precompute import run as run_mod
from precompute.accumulators import priority
from precompute.config import RunConfig

N_SEQ = 96
CTX = 32
BATCH = 16
N_TOP = 6
N_QBINS, N_PER, Q_SAMPLE = 4, 3, 20
BEFORE, AFTER = 5, 2
OUTLIER_FACTOR = 1.25  # low, so that the tiny models have outlier tokens and the "excluded" path runs


def write_tiny_corpus(tiny_demo: Path, out: Path, n_seq: int = 150, ctx: int = CTX) -> Path:
    """A token_ids corpus of stdlib source ('python') and module docstrings ('english'), packed with BOS."""
    import importlib

    from precompute.demo import pack
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_demo / "base" / "tokenizer"), local_files_only=True)
    names = ["textwrap", "json.decoder", "string", "shlex", "fractions", "difflib", "calendar", "heapq", "bisect", "pprint", "glob", "fnmatch"]
    mods = [importlib.import_module(n) for n in names]
    import inspect

    english = [(n, m.__doc__ or "") for n, m in zip(names, mods)] + [(f"doc{i}", (f.__doc__ or "")) for i, f in enumerate(vars(str).values()) if callable(f)]
    python = [(n, inspect.getsource(m)) for n, m in zip(names, mods)]
    en = pack(tok, english * 3, ctx)[: n_seq // 2]
    py = pack(tok, python, ctx)[: n_seq - len(en)]
    rows = [("english", s) for s in en] + [("python", s) for s in py]
    assert len(rows) == n_seq
    pq.write_table(
        pa.table({"source": [r[0] for r in rows], "token_ids": pa.array([r[1] for r in rows], pa.list_(pa.int32()))}), out
    )
    return out


def tiny_config_text(tiny_demo: Path, corpus: Path, run_id: str = "ref", n_seq: int = N_SEQ, extra: str = "", two_saes: bool = True, twin: bool | None = None) -> str:
    fin = f'[saes.finetuned_sae]\npath = "{tiny_demo}/saes/finetuned_sae"\n' if two_saes else ""
    if two_saes if twin is None else twin:  # the base SAE's seed twin (the null baseline of born/lost)
        fin += f'[saes.base_sae_twin]\npath = "{tiny_demo}/saes/base_sae_twin"\n'
    return f"""run_id = "{run_id}"
[models.base]
path = "{tiny_demo}/base"
[models.finetuned]
path = "{tiny_demo}/finetuned"
[saes.base_sae]
path = "{tiny_demo}/saes/base_sae"
{fin}[corpus]
path = "{corpus}"
[sample]
n_tokens = {n_seq * CTX}
context_size = {CTX}
batch_size = {BATCH}
seed = 3
[thresholds]
outlier_norm_factor = {OUTLIER_FACTOR}
[examples]
n_top = {N_TOP}
n_quantile_bins = {N_QBINS}
n_per_quantile_bin = {N_PER}
quantile_sample = {Q_SAMPLE}
window_before = {BEFORE}
window_after = {AFTER}
{extra}"""


@pytest.fixture(scope="module")
def corpus(tiny_demo, tmp_path_factory) -> Path:
    return write_tiny_corpus(tiny_demo, tmp_path_factory.mktemp("corpus") / "corpus.parquet")


@pytest.fixture(scope="module")
def ref(tiny_demo, corpus, tmp_path_factory, tiny_crosscoder):
    """One uninterrupted single-pass run (with a crosscoder: every table), and its prepared inputs."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # the CLI default
    d = tmp_path_factory.mktemp("ref")
    cfg_path = d / "ref.toml"
    cfg_path.write_text(tiny_config_text(tiny_demo, corpus, extra=f'[crosscoder]\npath = "{tiny_crosscoder}"\n'))
    cfg = RunConfig.from_toml(cfg_path)
    run_dir = run_mod.run(cfg, runs_dir=d / "runs", progress=False, checkpoint_every=2)
    prep = prepare_mod.prepare(cfg)
    return {"dir": run_dir, "prep": prep, "cfg_path": cfg_path, "manifest": rundir.open_run(run_dir)}


def table(run_dir: Path, name: str):
    return pq.read_table(run_dir / name).to_pandas()


# ----------------------------------------------------------------------------------------------
# The naive reference: every activation of the sample at once, plain hooked forwards.


@pytest.fixture(scope="module")
def naive(ref):
    prep = ref["prep"]
    hook = prep.cfg.hook
    tokens_np = prep.sample.tokens
    counted = ~np.isin(tokens_np, prep.special_ids)
    thr = ref["manifest"]["calibration"]["outlier_threshold"]
    out = {"counted": counted, "tokens": tokens_np, "x": {}, "acts": {}, "loss": {}, "outlier": {}}
    models = {"base": prep.pair.base, "finetuned": prep.pair.finetuned}
    with torch.inference_mode():
        for m, model in models.items():
            xs, clean, zero = [], [], []
            for b in range(prep.n_batches):  # the stream's batches, so activations are bitwise comparable
                tok = torch.from_numpy(tokens_np[b * BATCH : (b + 1) * BATCH].astype(np.int64))
                _, cache = model.run_with_cache(tok, names_filter=[hook])
                xs.append(cache[hook])
                clean.append(model(tok, return_type="loss", loss_per_token=True))
                zero.append(model.run_with_hooks(tok, return_type="loss", loss_per_token=True, fwd_hooks=[(hook, lambda a, hook: torch.zeros_like(a))]))
            x = torch.cat(xs)
            out["x"][m] = x.numpy().astype(np.float64)
            out["loss"][(m, "clean")] = torch.cat(clean).numpy()
            out["loss"][(m, "zero")] = torch.cat(zero).numpy()
            outlier = np.linalg.norm(out["x"][m], axis=-1) > thr[m]
            out["outlier"][m] = outlier
            for s, sae in prep.pair.saes.items():
                acts = torch.cat([sae.encode(xs[b]) for b in range(len(xs))])
                x_hat = torch.cat([sae.decode(sae.encode(xs[b])) for b in range(len(xs))])
                out["acts"][(s, m)] = (acts.numpy() * counted[..., None]).reshape(-1, acts.shape[-1]).astype(np.float64)
                out["x_hat", s, m] = x_hat.numpy().astype(np.float64)
                for variant, keep in (("included", counted), ("excluded", counted & ~outlier)):
                    keep_t = torch.from_numpy(keep)[..., None]
                    losses = []
                    for b in range(len(xs)):
                        sl = slice(b * BATCH, (b + 1) * BATCH)
                        new = torch.where(keep_t[sl], x_hat[sl], xs[b])
                        tok = torch.from_numpy(tokens_np[sl].astype(np.int64))
                        losses.append(model.run_with_hooks(tok, return_type="loss", loss_per_token=True, fwd_hooks=[(hook, lambda a, hook, new=new: new)]))
                    out["loss"][(s, m, variant)] = torch.cat(losses).numpy()
    g = (np.arange(N_SEQ)[:, None] * CTX + np.arange(CTX)[None, :]).reshape(-1)
    out["g"] = g
    out["counted_flat"] = counted.reshape(-1)
    return out


# ----------------------------------------------------------------------------------------------


def test_run_is_complete_and_valid(ref):
    man = ref["manifest"]
    assert man["schema_version"] == schema.SCHEMA_VERSION and man["complete"] is True
    assert set(man["files"]) == set(schema.TABLES)
    assert set(man) == set(schema.MANIFEST_DOCS)  # every manifest key is documented
    assert man["n_tokens"] == N_SEQ * CTX and man["n_sequences"] == N_SEQ
    assert man["config"] == ref["prep"].cfg.to_dict()
    assert man["act_hist_edges"] == schema.ACT_HIST_EDGES.tolist()
    assert man["tokenizer_check"]["matching_id_share"] == 1.0
    for pkg in ("torch", "sae-lens", "transformer-lens"):
        assert man["packages"][pkg]
    assert not (ref["dir"] / pass_state.CHECKPOINT_DIR).exists()
    # every file's rows as in the manifest, every column as in the schema
    for name, entry in man["files"].items():
        t = pq.read_table(ref["dir"] / name)
        assert t.num_rows == entry["rows"] and t.schema.names == schema.TABLES[name].names
    for name, size in (("features.parquet", schema.FEATURES_ROW_GROUP_SIZE), ("examples.parquet", schema.EXAMPLES_ROW_GROUP_SIZE)):
        md = pq.ParquetFile(ref["dir"] / name).metadata
        assert md.row_group(0).num_rows == min(size, md.num_rows)


def test_tokens_are_the_sample(ref, naive):
    t = table(ref["dir"], "tokens.parquet")
    assert t.seq_id.tolist() == list(range(N_SEQ))
    np.testing.assert_array_equal(np.stack(t.token_ids.to_numpy()), naive["tokens"])
    assert set(t.source) == {"english", "python"}


def test_calibration_matches_naive(ref, naive):
    cal = ref["manifest"]["calibration"]
    n = min(calibration.CALIBRATION_SEQUENCES, N_SEQ)
    for m in ("base", "finetuned"):
        norms = np.linalg.norm(naive["x"][m][:n], axis=-1)[naive["counted"][:n]]
        assert cal["mean_norm"][m] == pytest.approx(norms.mean(), rel=1e-6)
        assert cal["outlier_threshold"][m] == pytest.approx(OUTLIER_FACTOR * norms.mean(), rel=1e-6)
    assert naive["outlier"]["base"][naive["counted"]].any(), "the test needs outlier tokens"


def test_metrics_match_naive(ref, naive):
    met = table(ref["dir"], "metrics.parquet").set_index(["sae", "model", "outliers"])
    counted = naive["counted"]
    for (s, m, variant), row in met.iterrows():
        mask = counted if variant == "included" else counted & ~naive["outlier"][m]
        x = naive["x"][m]
        x_hat = naive["x_hat", s, m]
        acts = naive["acts"][(s, m)].reshape(N_SEQ, CTX, -1)
        err = ((x - x_hat) ** 2).sum(-1)
        assert row.n_tokens == mask.sum()
        assert row.l0 == pytest.approx((acts > 0).sum(-1)[mask].mean(), rel=1e-12)
        assert row.mse == pytest.approx(err[mask].mean(), rel=1e-5)
        evs = []
        for b in range(N_SEQ // BATCH):  # SAELens: the mean is over the batch's tokens
            sl = slice(b * BATCH, (b + 1) * BATCH)
            xm, em = x[sl][mask[sl]], err[sl][mask[sl]]
            evs.append(1 - em / ((xm - xm.mean(0)) ** 2).sum(-1))
        # renamed: this is sae_lens's `explained_variance_legacy` (was `explained_variance`)
        assert row.explained_variance_legacy == pytest.approx(np.concatenate(evs).mean(), rel=1e-5)
        xa = x[mask]
        # sae_lens's current `explained_variance`: one ratio pooled over the tokens
        total_var = (xa**2).sum(-1).mean() - (xa.mean(0) ** 2).sum()
        assert row.explained_variance == pytest.approx(1 - err[mask].mean() / total_var, rel=1e-9)
        assert row.pooled_r2 == pytest.approx(1 - err[mask].sum() / ((xa - xa.mean()) ** 2).sum(), rel=1e-5)
        ce_mask = mask[:, :-1]
        clean = naive["loss"][(m, "clean")][ce_mask].mean()
        zero = naive["loss"][(m, "zero")][ce_mask].mean()
        spliced = naive["loss"][(s, m, variant)][ce_mask].mean()
        # the spliced/zero losses here come from full hooked forwards, the run's from start_at_layer
        assert row.ce_clean == pytest.approx(clean, abs=1e-5)
        assert row.ce_zero_ablated == pytest.approx(zero, abs=1e-5)
        assert row.ce_spliced == pytest.approx(spliced, abs=1e-5)
        assert row.ce_delta == pytest.approx(spliced - clean, abs=2e-5)
        assert row.ce_recovered == pytest.approx((zero - spliced) / (zero - clean), abs=1e-3 / abs(zero - clean))
        assert row.outlier_fraction == pytest.approx((counted & naive["outlier"][m]).sum() / counted.sum())
        assert row.n_nonfinite_clean == row.n_nonfinite_spliced == row.n_nonfinite_zero_ablated == 0
    # outliers change the excluded rows
    assert (met.xs("excluded", level="outliers").n_tokens < met.xs("included", level="outliers").n_tokens).all()


def test_resid_similarity_matches_naive(ref, naive):
    xb, xf = naive["x"]["base"], naive["x"]["finetuned"]
    cos = (xb * xf).sum(-1) / (np.linalg.norm(xb, axis=-1) * np.linalg.norm(xf, axis=-1))
    l2 = np.linalg.norm(xb - xf, axis=-1)
    pos = table(ref["dir"], "resid_position.parquet")
    np.testing.assert_allclose(pos.mean_cosine, cos.mean(0), rtol=1e-5)
    np.testing.assert_allclose(pos.mean_l2, l2.mean(0), rtol=1e-5)
    assert pos.n_tokens.tolist() == [N_SEQ] * CTX
    summ = table(ref["dir"], "resid_summary.parquet").set_index("metric")
    for metric, v in (("cosine", cos), ("l2", l2), ("seq_mean_cosine", cos.mean(1)), ("seq_mean_l2", l2.mean(1))):
        assert summ.loc[metric, "n"] == v.size
        assert summ.loc[metric, "mean"] == pytest.approx(v.mean(), rel=1e-5)
        assert summ.loc[metric, "std"] == pytest.approx(v.std(), rel=1e-3, abs=1e-7)
        assert summ.loc[metric, "max"] == pytest.approx(v.max(), rel=1e-5)
    hist = table(ref["dir"], "resid_histograms.parquet")
    l2_max = ref["manifest"]["resid_l2_range"][1]
    for metric, v, rng in (("cosine", cos, (-1, 1)), ("l2", l2, (0, l2_max)), ("seq_mean_l2", l2.mean(1), (0, l2_max))):
        h = hist[hist.metric == metric]
        assert len(h) == schema.RESID_HIST_BINS
        counts, edges = np.histogram(np.clip(v, *rng), bins=schema.RESID_HIST_BINS, range=rng)
        np.testing.assert_allclose(h.bin_left, edges[:-1])
        # values within float32 rounding of a bin edge may fall on either side: allow that much
        assert np.abs(h["count"].to_numpy() - counts).sum() <= 2
        assert h["count"].sum() == v.size


def _naive_hist(values: np.ndarray) -> np.ndarray:
    e = schema.ACT_HIST_EDGES
    pos = values[values > 0]
    idx = np.clip(np.searchsorted(e, pos, side="right") - 1, 0, len(e) - 2)
    return np.bincount(idx, minlength=len(e) - 1)


def test_features_match_naive(ref, naive):
    feats = table(ref["dir"], "features.parquet")
    cf = naive["counted_flat"]
    eps = ref["prep"].cfg.thresholds.act_error_eps
    for s in ("base_sae", "finetuned_sae"):
        f = feats[feats.sae == s].set_index("feature_id")
        d = len(f)
        a = {m: naive["acts"][(s, m)][cf] for m in ("base", "finetuned")}
        for m in ("base", "finetuned"):
            acts = a[m]
            np.testing.assert_allclose(f[f"density_{m}"], (acts > 0).mean(0), rtol=1e-12)
            np.testing.assert_allclose(f[f"mean_act_{m}"], acts.mean(0), rtol=1e-6)
            np.testing.assert_allclose(f[f"max_act_{m}"], acts.max(0), rtol=1e-7)
            with np.errstate(invalid="ignore"):
                np.testing.assert_allclose(f[f"mean_active_act_{m}"], acts.sum(0) / (acts > 0).sum(0), rtol=1e-6)
            dens = (acts > 0).mean(0)
            status = np.where((acts > 0).sum(0) == 0, "dead", np.where(dens < 1e-5, "ultralow", np.where(dens > 0.1, "dense", "regular")))
            assert f[f"status_{m}"].tolist() == status.tolist()
            for i in range(d):
                np.testing.assert_array_equal(f[f"act_hist_{m}"].iloc[i], _naive_hist(acts[:, i]))
        alive_b, alive_f = (a["base"] > 0).any(0), (a["finetuned"] > 0).any(0)
        expected = np.where(alive_b & alive_f, "both_alive", np.where(alive_b, "died", np.where(alive_f, "woke", "both_dead")))
        assert f.cross_class.tolist() == expected.tolist()
        for i in range(d):
            x, y = a["base"][:, i], a["finetuned"][:, i]
            if x.std() == 0 or y.std() == 0:
                assert np.isnan(f.act_similarity.iloc[i])
            else:
                assert f.act_similarity.iloc[i] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-6)
            assert f.act_error.iloc[i] == pytest.approx(np.abs(np.log10(x + eps) - np.log10(y + eps)).mean(), rel=1e-5, abs=1e-9)


def test_logits_and_neighbours_match_direct_computation(ref):
    prep = ref["prep"]
    feats = table(ref["dir"], "features.parquet")
    rng = np.random.default_rng(0)
    for s, sae in prep.pair.saes.items():
        f = feats[feats.sae == s].set_index("feature_id")
        w = sae.W_dec.detach().numpy().astype(np.float64)
        lb = w @ prep.pair.base.W_U.detach().numpy().astype(np.float64)
        lf = w @ prep.pair.finetuned.W_U.detach().numpy().astype(np.float64)
        for i in rng.choice(len(f), 10, replace=False):
            assert f.logit_similarity.iloc[i] == pytest.approx(np.corrcoef(lb[i], lf[i])[0, 1], abs=1e-6)
            for m, lg in (("base", lb), ("finetuned", lf)):
                assert list(f[f"logit_pos_ids_{m}"].iloc[i]) == np.argsort(-lg[i], kind="stable")[:10].tolist()
                assert list(f[f"logit_neg_ids_{m}"].iloc[i]) == np.argsort(lg[i], kind="stable")[:10].tolist()
                np.testing.assert_allclose(f[f"logit_pos_values_{m}"].iloc[i], np.sort(lg[i])[::-1][:10], rtol=1e-5)
        unit = w / np.linalg.norm(w, axis=1, keepdims=True)
        cos = unit @ unit.T
        np.fill_diagonal(cos, -np.inf)
        for i in rng.choice(len(f), 10, replace=False):
            assert list(f.nn_feature_ids.iloc[i]) == np.argsort(-cos[i], kind="stable")[:10].tolist()
            np.testing.assert_allclose(f.nn_cosines.iloc[i], np.sort(cos[i])[::-1][:10], rtol=1e-5)


def test_top_examples_match_naive(ref, naive):
    ex = table(ref["dir"], "examples.parquet")
    top = ex[ex.kind == "top"]
    cf, g = naive["counted_flat"], naive["g"]
    for (s, m), acts in naive["acts"].items():
        sub = top[(top.sae == s) & (top.model == m)]
        for i in range(acts.shape[1]):
            firing = np.nonzero((acts[:, i] > 0) & cf)[0]
            order = sorted(firing, key=lambda t: (-acts[t, i], g[t]))[:N_TOP]
            rows = sub[sub.feature_id == i].sort_values("rank")
            assert (rows.seq_id * CTX + rows.position).tolist() == [int(g[t]) for t in order]
            np.testing.assert_array_equal(rows.activation.to_numpy(), acts[order, i].astype(np.float32))


def test_quantile_examples_match_naive(ref, naive):
    ex = table(ref["dir"], "examples.parquet")
    q = ex[ex.kind == "quantile"]
    cf, g = naive["counted_flat"], naive["g"]
    seed = ref["prep"].cfg.sample.seed
    for (s, m), acts in naive["acts"].items():
        sub = q[(q.sae == s) & (q.model == m)]
        for i in range(acts.shape[1]):
            firing = np.nonzero((acts[:, i] > 0) & cf)[0]
            pri = dict(zip(firing.tolist(), priority(seed, g[firing], np.full(len(firing), i)).tolist()))
            sample = sorted(firing, key=lambda t: (pri[t], g[t]))[:Q_SAMPLE]
            by_act = sorted(sample, key=lambda t: (np.float32(acts[t, i]), g[t]))
            expected = []
            if by_act:
                n_eff = max(1, min(N_QBINS, len(by_act) // N_PER))
                for b, chunk in enumerate(np.array_split(np.array(by_act), n_eff)):
                    picks = sorted(chunk.tolist(), key=lambda t: (pri[t], g[t]))[:N_PER]
                    expected += [(b, r, int(g[t])) for r, t in enumerate(picks)]
            rows = sub[sub.feature_id == i]
            got = list(zip(rows.bin.astype(int), rows["rank"].astype(int), (rows.seq_id * CTX + rows.position).astype(int)))
            assert got == expected


def test_example_windows_hold_both_models_activations(ref, naive):
    ex = table(ref["dir"], "examples.parquet")
    assert ex.token_ids.map(len).max() <= BEFORE + 1 + AFTER
    rng = np.random.default_rng(1)
    for j in rng.choice(len(ex), 300, replace=False):
        r = ex.iloc[j]
        ws, n = int(r.window_start), len(r.token_ids)
        assert ws == max(0, r.position - BEFORE) and ws + n == min(CTX, r.position + AFTER + 1)
        np.testing.assert_array_equal(r.token_ids, naive["tokens"][r.seq_id, ws : ws + n])
        for m in ("base", "finetuned"):
            acts = naive["acts"][(r.sae, m)].reshape(N_SEQ, CTX, -1)
            np.testing.assert_allclose(r[f"acts_{m}"], acts[r.seq_id, ws : ws + n, r.feature_id], rtol=1e-6, atol=1e-9)
        assert r[f"acts_{r.model}"][r.position - ws] == pytest.approx(r.activation, rel=1e-6)
    # sorted by (sae, feature_id) so one feature's rows sit in few row groups
    key = list(zip(ex.sae.map(schema.SAES.index), ex.feature_id))
    assert key == sorted(key)


def naive_pair_scores(prep, naive, other: str) -> dict:
    """Every candidate matching score of base_sae (on base) x `other` (finetuned_sae on finetuned,
    or the twin on base) from the dense activations, numpy only; and the alive masks."""
    from sae_lens import SAE

    cf = naive["counted_flat"]
    a = naive["acts"][("base_sae", "base")][cf]
    if other == "finetuned_sae":
        b = naive["acts"][("finetuned_sae", "finetuned")][cf]
        sae_b = prep.pair.saes["finetuned_sae"]
    else:
        sae_b = prep.twin
        x = naive["x"]["base"].reshape(-1, naive["x"]["base"].shape[-1])
        with torch.inference_mode():
            b = sae_b.encode(torch.from_numpy(x.astype(np.float32))).numpy().astype(np.float64)[cf]
    da = a.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(a.T, b.T)[:da, da:]
        cof = np.full((da, b.shape[1]), np.nan)
        for i in range(da):
            for j in range(b.shape[1]):
                u = (a[:, i] > 0) | (b[:, j] > 0)
                if u.sum() > 1 and a[u, i].std() > 0 and b[u, j].std() > 0:
                    cof[i, j] = np.corrcoef(a[u, i], b[u, j])[0, 1]
    unit = lambda w: w / np.linalg.norm(w, axis=1, keepdims=True)  # noqa: E731
    sa = prep.pair.saes["base_sae"]
    dec = unit(sa.W_dec.detach().numpy().astype(np.float64)) @ unit(sae_b.W_dec.detach().numpy().astype(np.float64)).T
    enc = unit(sa.W_enc.detach().numpy().T.astype(np.float64)) @ unit(sae_b.W_enc.detach().numpy().T.astype(np.float64)).T
    base = {"act_corr": corr, "cofire_corr": cof, "dec_cos": dec, "enc_cos": enc}
    scores = {k: v for k, v in base.items()}
    scores["act_corr+dec_cos"] = 0.5 * np.nan_to_num(corr) + 0.5 * dec
    scores["cofire_corr+dec_cos"] = 0.5 * np.nan_to_num(cof) + 0.5 * dec
    for k in ("act_corr", "cofire_corr"):
        scores[k] = np.nan_to_num(scores[k])
    return {"base": base, "scores": scores, "alive_a": (a > 0).any(0), "alive_b": (b > 0).any(0)}


def _alive_best(score, alive_a, alive_b):
    """Best partner per row among alive columns (-1 for dead rows), its score (NaN for dead rows)."""
    masked = np.where(alive_a[:, None] & alive_b[None, :], score, -np.inf)
    best = masked.argmax(1)
    return np.where(alive_a, best, -1), np.where(alive_a, masked.max(1), np.nan)


def test_matching_matches_naive(ref, naive):
    """Best matches, the assignment and matches.parquet against a numpy recomputation, on the
    run's matching score, among alive features only (dead ones have no match and no partner)."""
    from scipy.optimize import linear_sum_assignment

    prep = ref["prep"]
    summ = ref["manifest"]["summary"]["matching"]
    nv = naive_pair_scores(prep, naive, "finetuned_sae")
    corr, dec = nv["base"]["act_corr"], nv["base"]["dec_cos"]
    score = nv["scores"][summ["score"]]
    alive_a, alive_b = nv["alive_a"], nv["alive_b"]
    da = len(alive_a)
    feats = table(ref["dir"], "features.parquet")
    fa = feats[feats.sae == "base_sae"].set_index("feature_id")
    fb = feats[feats.sae == "finetuned_sae"].set_index("feature_id")
    best_a, best_sa = _alive_best(score, alive_a, alive_b)
    best_b, _ = _alive_best(score.T, alive_b, alive_a)
    assert fa.match_feature_id.fillna(-1).astype(int).tolist() == best_a.tolist()
    assert fb.match_feature_id.fillna(-1).astype(int).tolist() == best_b.tolist()
    np.testing.assert_allclose(fa.match_score, best_sa, atol=1e-6)
    ia = np.flatnonzero(alive_a)
    np.testing.assert_allclose(fa.match_act_corr.to_numpy()[ia], corr[ia, best_a[ia]], atol=1e-6)
    for k in ("cofire_corr", "dec_cos", "enc_cos"):
        np.testing.assert_allclose(fa[f"match_{k}"].to_numpy()[ia], nv["base"][k][ia, best_a[ia]], atol=1e-6)
    ra, rb = np.flatnonzero(alive_a), np.flatnonzero(alive_b)
    rows, cols = linear_sum_assignment(score[np.ix_(ra, rb)], maximize=True)
    asg = fa.assigned_feature_id
    assert asg[~alive_a].isna().all()  # dead features are never assigned
    got_total = sum(score[i, int(j)] for i, j in zip(fa.index[asg.notna()], asg.dropna()))
    assert got_total == pytest.approx(score[ra[rows], rb[cols]].sum(), abs=1e-6)  # an optimal assignment
    assert sorted(asg.dropna().astype(int)) == sorted(rb[cols])  # one-to-one
    paired = asg.dropna().astype(int)
    assert (fb.assigned_feature_id.loc[paired.to_numpy()].to_numpy() == paired.index.to_numpy()).all()
    mt = table(ref["dir"], "matches.parquet")
    for k in ("act_corr", "cofire_corr", "dec_cos", "enc_cos"):
        np.testing.assert_allclose(mt[k], nv["base"][k][mt.base_feature_id, mt.finetuned_feature_id], atol=1e-6)
    np.testing.assert_allclose(mt.score, score[mt.base_feature_id, mt.finetuned_feature_id], atol=1e-6)
    assert mt.assigned.sum() == min(len(ra), len(rb))
    assert alive_a[mt.base_feature_id].all() and alive_b[mt.finetuned_feature_id].all()
    lost = (best_sa[alive_a] < summ["threshold"]).sum()
    assert summ["n_lost"] == lost and summ["n_alive_base_sae"] == alive_a.sum()


def test_twin_baseline_and_score_choice_match_naive(ref, naive):
    """The seed-twin baseline: born/lost counts over the threshold for the real pair and the twin,
    the AUC of each score (the twin's assigned pairs, on that score, against random pairs), and
    the auto choice of the best score; all against numpy."""
    from scipy.optimize import linear_sum_assignment

    from precompute.baseline import THRESHOLDS, random_pair_keys

    prep = ref["prep"]
    summ = ref["manifest"]["summary"]["matching"]
    base = table(ref["dir"], "baseline.parquet")
    sep = table(ref["dir"], "score_separation.parquet")
    real, twin = naive_pair_scores(prep, naive, "finetuned_sae"), naive_pair_scores(prep, naive, schema.TWIN)
    aucs = {}
    for kind in schema.MATCH_SCORES:
        rows = base[base.score == kind].sort_values("threshold")
        np.testing.assert_allclose(rows.threshold, THRESHOLDS)
        for nv, suffix in ((real, ""), (twin, "_twin")):
            _, best_a = _alive_best(nv["scores"][kind], nv["alive_a"], nv["alive_b"])
            _, best_b = _alive_best(nv["scores"][kind].T, nv["alive_b"], nv["alive_a"])
            n_lost = [(best_a[nv["alive_a"]] < t).sum() for t in THRESHOLDS]
            n_born = [(best_b[nv["alive_b"]] < t).sum() for t in THRESHOLDS]
            assert rows[f"n_lost{suffix}"].tolist() == n_lost and rows[f"n_born{suffix}"].tolist() == n_born
            np.testing.assert_allclose(rows[f"lost_rate{suffix}"], np.array(n_lost) / nv["alive_a"].sum())
        np.testing.assert_allclose(rows.excess_lost, rows.lost_rate - rows.lost_rate_twin)
        # AUC: assigned twin pairs on this score vs random pairs
        sc, aa, ab = twin["scores"][kind], twin["alive_a"], twin["alive_b"]
        ra, rb = np.flatnonzero(aa), np.flatnonzero(ab)
        r, c = linear_sum_assignment(sc[np.ix_(ra, rb)], maximize=True)
        pos = sc[ra[r], rb[c]]
        keys = random_pair_keys(*sc.shape, prep.cfg.sample.seed)
        ki, kj = keys // sc.shape[1], keys % sc.shape[1]
        keep = aa[ki] & ab[kj]
        neg = sc[ki[keep], kj[keep]]
        aucs[kind] = np.mean([(p > neg).mean() + 0.5 * (p == neg).mean() for p in pos])
        got = sep[(sep.score == kind)]
        assert got.auc.iloc[0] == pytest.approx(aucs[kind], abs=1e-9)
        assert summ["auc"][kind] == pytest.approx(aucs[kind], abs=1e-9)
        assert got[got.group == "assigned"]["count"].sum() == len(pos) and got[got.group == "random"]["count"].sum() == len(neg)
    best = max(schema.MATCH_SCORES, key=lambda k: (aucs[k], -schema.MATCH_SCORES.index(k)))
    assert summ["score"] == best and "AUC" in summ["score_reason"]
    # the twin's best match per base feature, on the chosen score
    fa = table(ref["dir"], "features.parquet").query("sae == 'base_sae'").set_index("feature_id")
    ids, sc = _alive_best(twin["scores"][best], twin["alive_a"], twin["alive_b"])
    assert fa.twin_match_feature_id.fillna(-1).astype(int).tolist() == ids.tolist()
    np.testing.assert_allclose(fa.twin_match_score, sc, atol=1e-6)


def test_start_at_layer_loss_equals_hooked_forward(ref):
    prep = ref["prep"]
    tok = torch.from_numpy(prep.sample.tokens[:8].astype(np.int64))
    for hook in ("blocks.1.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"):
        fast = forward.ModelRunner(prep.pair.finetuned, hook)
        slow = forward.ModelRunner(prep.pair.finetuned, hook, fast=False)
        assert fast.fast and fast.own_head and not slow.fast and not slow.own_head
        with torch.inference_mode():
            _, x = fast.clean(tok)
            new = x + torch.randn_like(x)
            np.testing.assert_allclose(fast.loss_with(tok, new).numpy(), slow.loss_with(tok, new).numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(fast.acts(tok).numpy(), x.numpy(), rtol=0, atol=0)


def test_sae_lens_run_evals_agree(ref):
    """L0, explained variance and CE recovered against SAELens's own evals on the same tokens.

    Same sequences, same batches (batch_size_prompts = our batch size), same special-token
    exclusion. Tolerances: L0 is a mean of integer counts; SAELens takes it in float32 (relative
rounding ~1e-8 over a few thousand tokens), we in float64, so 1e-6 relative. Explained
    variance: SAELens computes it in float32 per batch, we in float64, 1e-4 absolute covers that.
    CE: SAELens uses full hooked forwards, we start at the hook's layer; the losses agree to
    ~1e-6, and CE recovered divides their differences by (zero - clean), so we allow
    1e-4 / |zero - clean|.
    """
    import datasets
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.training.activations_store import ActivationsStore

    prep = ref["prep"]
    met = table(ref["dir"], "metrics.parquet").set_index(["sae", "model", "outliers"])
    seqs = prep.sample.tokens.astype(np.int64).tolist()
    n_batches = len(seqs) // BATCH
    models = {"base": prep.pair.base, "finetuned": prep.pair.finetuned}
    for (s, m) in [("base_sae", "base"), ("base_sae", "finetuned"), ("finetuned_sae", "finetuned")]:
        sae = prep.pair.saes[s]
        store = ActivationsStore.from_sae(
            models[m], sae, dataset=datasets.Dataset.from_dict({"input_ids": seqs}), streaming=False, context_size=CTX,
            store_batch_size_prompts=BATCH, n_batches_in_buffer=2, train_batch_size_tokens=BATCH * CTX, device="cpu",
        )
        first = store.get_batch_tokens(BATCH)
        np.testing.assert_array_equal(first.numpy(), prep.sample.tokens[:BATCH])  # same tokens, same order
        store.reset_input_dataset()
        eval_cfg = EvalConfig(
            batch_size_prompts=BATCH, n_eval_reconstruction_batches=n_batches, n_eval_sparsity_variance_batches=n_batches,
            compute_ce_loss=True, compute_sparsity_metrics=True, compute_variance_metrics=True, compute_kl=False,
            compute_l2_norms=False, compute_featurewise_density_statistics=False, compute_featurewise_weight_based_metrics=False,
        )
        got, _ = run_evals(sae, store, models[m], ActivationScaler(), eval_config=eval_cfg, exclude_special_tokens=True)
        row = met.loc[(s, m, "included")]
        assert row.l0 == pytest.approx(got["sparsity"]["l0"], rel=1e-6)
        # both of sae_lens's definitions, under its names (the legacy column was `explained_variance`)
        assert row.explained_variance_legacy == pytest.approx(got["reconstruction_quality"]["explained_variance_legacy"], abs=1e-4)
        assert row.explained_variance == pytest.approx(got["reconstruction_quality"]["explained_variance"], abs=1e-4)
        assert row.mse == pytest.approx(got["reconstruction_quality"]["mse"], rel=1e-5)
        perf = got["model_performance_preservation"]
        assert row.ce_clean == pytest.approx(perf["ce_loss_without_sae"], abs=1e-5)
        assert row.ce_spliced == pytest.approx(perf["ce_loss_with_sae"], abs=1e-5)
        assert row.ce_zero_ablated == pytest.approx(perf["ce_loss_with_ablation"], abs=1e-5)
        assert row.ce_recovered == pytest.approx(perf["ce_loss_score"], abs=1e-4 / abs(row.ce_zero_ablated - row.ce_clean))


# ----------------------------------------------------------------------------------------------
# Shards


def assert_runs_equal(a: Path, b: Path, exact_floats: bool = False) -> None:
    """Every table equal: ints, strings, lists of ints and example selections exactly; floats to
    float64 rounding (sums added in another order), or bitwise with exact_floats."""
    for name in schema.TABLES:
        if not (a / name).exists():
            assert not (b / name).exists()
            continue
        ta, tb = pq.read_table(a / name), pq.read_table(b / name)
        assert ta.schema == tb.schema and ta.num_rows == tb.num_rows, name
        for col in ta.schema.names:
            ca, cb = ta.column(col).combine_chunks(), tb.column(col).combine_chunks()
            typ = ca.type.value_type if pa.types.is_list(ca.type) else ca.type
            if pa.types.is_floating(typ):
                va = np.array(ca.to_pylist() if not pa.types.is_list(ca.type) else [x for row in ca.to_pylist() for x in (row or [])], dtype=float)
                vb = np.array(cb.to_pylist() if not pa.types.is_list(cb.type) else [x for row in cb.to_pylist() for x in (row or [])], dtype=float)
                if exact_floats:  # bitwise, NaN equal to NaN (Arrow's equals calls NaN != NaN)
                    assert np.array_equal(va, vb, equal_nan=True), f"{name}.{col}"
                else:
                    np.testing.assert_allclose(va, vb, rtol=1e-9, atol=1e-12, err_msg=f"{name}.{col}")
                assert ca.null_count == cb.null_count
            else:
                assert ca.equals(cb), f"{name}.{col}"


def test_shards_merge_to_the_single_pass(ref, tmp_path):
    from precompute.__main__ import main

    runs = tmp_path / "runs"
    for i in range(3):
        assert main(["run", "--config", str(ref["cfg_path"]), "--runs-dir", str(runs), "--shard", f"{i}/3", "--no-progress"]) == 0
        assert not (runs / "ref" / schema.MANIFEST).exists()  # a shard alone is not a run
    assert main(["merge", "ref", "--runs-dir", str(runs), "--no-progress"]) == 0
    merged = runs / "ref"
    rundir.open_run(merged)
    assert not (merged / pass_state.SHARDS_DIR).exists()
    assert_runs_equal(ref["dir"], merged)
    # the merge filled the windows from the shards' kept hook activations, not a second pass
    timing = rundir.open_run(merged)["timing"]
    assert timing["window_batches_from_stream"] > 0 and timing["window_batches_recomputed"] == 0


def test_windows_from_kept_hook_activations_equal_a_second_pass(ref, tmp_path, monkeypatch):
    """The stream keeps both models' hook activations on disk for the windows; with the cache off
    (or over its budget) finalize runs the models again: the tables are bitwise the same."""
    t = ref["manifest"]["timing"]
    assert t["window_batches_from_stream"] == ref["prep"].n_batches and t["window_batches_recomputed"] == 0
    assert not (ref["dir"] / pass_state.CHECKPOINT_DIR).exists()  # the cache went with the checkpoint
    monkeypatch.setenv(hook_cache.HOOK_CACHE_MB_ENV, "0")
    cfg = RunConfig.from_toml(ref["cfg_path"])
    off = run_mod.run(cfg, runs_dir=tmp_path / "off", progress=False)
    t = rundir.open_run(off)["timing"]
    assert t["window_batches_from_stream"] == 0 and t["window_batches_recomputed"] == ref["prep"].n_batches
    assert_runs_equal(ref["dir"], off, exact_floats=True)
    # a budget of about two batches: the rest are recomputed, and nothing changes
    per_batch = ref["prep"].cfg.sample.batch_size * ref["prep"].cfg.sample.context_size * int(ref["prep"].pair.base.cfg.d_model) * 4 * 2
    monkeypatch.setenv(hook_cache.HOOK_CACHE_MB_ENV, str(2.5 * per_batch / 2**20))
    part = run_mod.run(cfg, runs_dir=tmp_path / "part", progress=False)
    t = rundir.open_run(part)["timing"]
    assert t["window_batches_from_stream"] == 2 and t["window_batches_recomputed"] == ref["prep"].n_batches - 2
    assert_runs_equal(ref["dir"], part, exact_floats=True)


def test_merge_refuses_missing_shards(ref, tmp_path, capsys):
    from precompute.__main__ import main

    runs = tmp_path / "runs"
    assert main(["run", "--config", str(ref["cfg_path"]), "--runs-dir", str(runs), "--shard", "1/2", "--no-progress"]) == 0
    assert main(["merge", "ref", "--runs-dir", str(runs)]) == 2
    assert "missing [0]" in capsys.readouterr().err
    assert not (runs / "ref" / schema.MANIFEST).exists()


def test_candidate_matching_mode(ref, tiny_demo, corpus, tmp_path):
    """Beyond max_all_pairs_d_sae, correlations are accumulated for candidate pairs only; they equal
    the all-pairs values for those pairs, and the assignment is one-to-one."""
    cfg_path = tmp_path / "cand.toml"
    cfg_path.write_text(tiny_config_text(tiny_demo, corpus, run_id="cand", extra="[matching]\nmax_all_pairs_d_sae = 16\nn_candidates = 4\n"))
    run_dir = run_mod.run(RunConfig.from_toml(cfg_path), runs_dir=tmp_path / "runs", progress=False)
    man = rundir.open_run(run_dir)
    assert man["summary"]["matching"]["mode"] == "candidates"
    cand = table(run_dir, "matches.parquet")
    full = table(ref["dir"], "matches.parquet")
    d = 64
    assert len(cand) <= 2 * 4 * d
    # every candidate pair's correlation equals the all-pairs run's value for it
    from precompute.weights import unit_rows

    saes = ref["prep"].pair.saes
    wa, wb = unit_rows(saes["base_sae"].W_dec).numpy(), unit_rows(saes["finetuned_sae"].W_dec).numpy()
    top_a = np.argsort(-(wa @ wb.T), axis=1)[:, :4]
    for i in range(d):
        assert set(top_a[i]) <= set(cand[cand.base_feature_id == i].finetuned_feature_id)
    both = cand.merge(full, on=["base_feature_id", "finetuned_feature_id"], suffixes=("", "_full"))
    assert len(both) > 0
    np.testing.assert_allclose(both.act_corr, both.act_corr_full, atol=1e-9)
    assigned = cand[cand.assigned]
    assert assigned.base_feature_id.is_unique and assigned.finetuned_feature_id.is_unique
    feats = table(run_dir, "features.parquet")
    fa = feats[feats.sae == "base_sae"]
    # every feature alive on its model has a match among its candidates (dead ones: none, by the alive-only rule)
    alive = fa.count_base > 0
    assert (fa.match_feature_id[alive].notna()).all() and fa.match_feature_id[~alive].isna().all()


def test_single_sae_run_has_no_matching(tiny_demo, corpus, tmp_path):
    cfg_path = tmp_path / "one.toml"
    cfg_path.write_text(tiny_config_text(tiny_demo, corpus, run_id="one", n_seq=32, two_saes=False))
    run_dir = run_mod.run(RunConfig.from_toml(cfg_path), runs_dir=tmp_path / "runs", progress=False)
    man = rundir.open_run(run_dir)
    assert man["saes"] == ["base_sae"] and "matches.parquet" not in man["files"]
    feats = table(run_dir, "features.parquet")
    assert set(feats.sae) == {"base_sae"} and feats.match_feature_id.isna().all()


def test_text_corpus_is_packed_with_bos(ref, tiny_demo, tmp_path):
    from precompute.corpus import read_corpus

    tok = ref["prep"].pair.base.tokenizer
    path = tmp_path / "text.parquet"
    texts = ["def f(x):\n    return x + 1\n" * 20, "The quick brown fox jumps over the lazy dog. " * 20]
    pq.write_table(pa.table({"text": texts, "source": ["python", "english"]}), path)
    seqs, sources = read_corpus(path, CTX, tok)
    assert seqs.shape[1] == CTX and (seqs[:, 0] == tok.bos_token_id).all()
    assert set(sources) == {"python", "english"}
    first_py = tok.decode(seqs[0, 1:])
    assert first_py.startswith("def f(x):")


def test_top_tokens_are_the_tokens_at_the_top_examples(ref):
    from precompute.feature_table import _search_form

    ex = table(ref["dir"], "examples.parquet")
    top = ex[ex.kind == "top"]
    vocab = table(ref["dir"], "vocab.parquet").token_str.tolist()
    feats = table(ref["dir"], "features.parquet")
    for _, f in feats.sample(20, random_state=0).iterrows():
        words = []
        for m in ("base", "finetuned"):
            rows = top[(top.sae == f.sae) & (top.feature_id == f.feature_id) & (top.model == m)].sort_values("rank")
            for _, r in rows.iterrows():
                w = _search_form(vocab[r.token_ids[r.position - r.window_start]])
                if w not in words:
                    words.append(w)
        assert f.top_tokens == " ".join(words)
        assert all(" " not in w for w in words)


def test_codec_encode_at_equals_sae_encode(tiny_demo):
    """Window activations (each window its own feature, positions of one batch) equal
    sae.encode's entries, on the fast path (W_enc's columns, gated as JumpReLU; examples grouped by
    blocks of 7 positions, here with rows spread over the whole batch, so blocks span wide) and on
    the generic path (sae.encode, then its columns, 7 features at a time); and with windows of
    consecutive rows, as fill_windows cuts them."""
    import torch
    from sae_lens import SAE

    from precompute.sae_codec import SaeCodec

    sae = SAE.load_from_disk(str(tiny_demo / "saes" / "base_sae"))
    codec = SaeCodec(sae)
    assert codec.fast
    d_in, d_sae = int(sae.cfg.d_in), int(sae.cfg.d_sae)
    x = torch.randn(300, d_in, generator=torch.Generator().manual_seed(0)) * 3.0
    rng = np.random.default_rng(0)
    rows, feats = rng.integers(0, 300, (80, 9)), rng.integers(0, d_sae, 80)
    with torch.inference_mode():
        dense = sae.encode(x).numpy()
        want = dense[rows, feats[:, None]]
        fast = codec.encode_at(x, rows, feats, chunk=7)
        codec.fast = False
        slow = codec.encode_at(x, rows, feats, chunk=7)
    assert (want > 0).sum() > 20 and (want == 0).sum() > 20  # both sides of the gate are exercised
    np.testing.assert_array_equal(slow, want)
    np.testing.assert_allclose(fast, want, rtol=1e-5, atol=1e-6)
    assert ((fast > 0) == (want > 0)).all()
    # windows: 9 consecutive rows from a random start, clipped to sequences of 30 positions, default blocks
    codec.fast = True
    seq, pos = rng.integers(0, 10, 80), rng.integers(0, 30, 80)
    rows = seq[:, None] * 30 + np.minimum(pos[:, None] + np.arange(9), 29)
    with torch.inference_mode():
        fast = codec.encode_at(x, rows, feats)
        codec.ENCODE_CHUNK_BYTES = 4 * 40 * 3  # 3 features per addmm on a 40-row span: the features split
        split = codec.encode_at(x, rows, feats)
    np.testing.assert_allclose(split, fast, rtol=1e-5, atol=1e-6)  # addmm of another width: float32 summation order
    want = dense[rows, feats[:, None]]
    assert (want > 0).sum() > 20 and (want == 0).sum() > 20
    np.testing.assert_allclose(fast, want, rtol=1e-5, atol=1e-6)
    assert ((fast > 0) == (want > 0)).all()


def test_codec_encode_decode_skips_only_features_that_cannot_fire(tiny_demo):
    """encode_decode encodes only the features whose Cauchy-Schwarz bound reaches the gate; its
    entries and reconstruction are those of the full encode (and of sae.encode / sae.decode)."""
    import torch
    from sae_lens import SAE

    from precompute.sae_codec import SaeCodec

    sae = SAE.load_from_disk(str(tiny_demo / "saes" / "base_sae"))
    d_in = int(sae.cfg.d_in)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # thresholds spread over the pre-activations' range: some features fire, some cannot
        pre = (torch.randn(300, d_in, generator=gen) @ sae.W_enc + sae.b_enc).abs().amax(0)
        sae.threshold.copy_(pre * 6 * torch.rand(pre.shape, generator=gen))
    codec, full = SaeCodec(sae), SaeCodec(sae)
    full.PRUNE_MIN_SHARE = 2.0  # never prunes
    assert codec.fast
    pruned = 0
    with torch.inference_mode():
        for scale in (0.3, 1.0, 3.0):
            x = torch.randn(300, d_in, generator=gen) * scale + sae.b_dec
            live = codec.live_features(x - sae.b_dec)
            assert full.live_features(x - sae.b_dec) is None
            if live is not None:
                pruned += 1
                assert len(live) % 16 == 0 and bool((live[1:] > live[:-1]).all())
            got, want = codec.encode_decode(x), full.encode_decode(x)
            if live is not None:
                assert 0 < len(got[0]) and len(live) < int(sae.cfg.d_sae)  # features fire, and some are skipped
            for g, w in zip(got[:3], want[:3]):
                assert torch.equal(g, w)
            torch.testing.assert_close(got[3], want[3], rtol=1e-6, atol=1e-6)
            dense = sae.encode(x)
            t, f = torch.nonzero(dense > 0).unbind(1)
            assert torch.equal(got[0], t) and torch.equal(got[1], f)
            torch.testing.assert_close(got[2], dense[t, f], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[3], sae.decode(dense), rtol=1e-5, atol=1e-5)
    assert pruned >= 1  # the bound skips features at some scale


# ----------------------------------------------------------------------------------------------
# Issue 12: per source, significance, what changed, where the models differ


def test_features_by_source_and_metrics_by_source_match_naive(ref, naive):
    """Every per-source statistic equals the pooled computation restricted to that source's tokens."""
    from scipy.stats import binomtest

    prep = ref["prep"]
    feats = table(ref["dir"], "features_by_source.parquet")
    src = np.asarray(prep.seq_source)[:, None].repeat(CTX, 1).reshape(-1)
    cf = naive["counted_flat"]
    assert sorted(feats.source.unique()) == prep.source_names == ["english", "python"]
    for si, name in enumerate(prep.source_names):
        m = cf & (src == si)
        for s in ("base_sae", "finetuned_sae"):
            f = feats[(feats.sae == s) & (feats.source == name)].set_index("feature_id").sort_index()
            a = {mm: naive["acts"][(s, mm)][m] for mm in ("base", "finetuned")}
            for mm in ("base", "finetuned"):
                np.testing.assert_array_equal(f[f"count_{mm}"], (a[mm] > 0).sum(0))
                np.testing.assert_allclose(f[f"density_{mm}"], (a[mm] > 0).mean(0), rtol=1e-12)
                np.testing.assert_allclose(f[f"max_act_{mm}"], a[mm].max(0), rtol=1e-6)
            both = ((a["base"] > 0) & (a["finetuned"] > 0)).sum(0)
            np.testing.assert_array_equal(f.n_fires_both, both)
            b, c = (a["base"] > 0).sum(0) - both, (a["finetuned"] > 0).sum(0) - both
            for i in range(len(f)):
                want = 1.0 if b[i] + c[i] == 0 else binomtest(int(c[i]), int(b[i] + c[i]), 0.5).pvalue
                assert f.p_value.iloc[i] == pytest.approx(want, rel=1e-9)
                x, y = a["base"][:, i], a["finetuned"][:, i]
                if x.std() > 0 and y.std() > 0:
                    assert f.act_similarity.iloc[i] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-6)
    met = table(ref["dir"], "metrics_by_source.parquet")
    counted2d = naive["counted"]
    src2d = np.asarray(prep.seq_source)[:, None].repeat(CTX, 1)
    for (s, mm, variant, name), row in met.set_index(["sae", "model", "outliers", "source"]).iterrows():
        mask = counted2d & (src2d == prep.source_names.index(name))
        if variant == "excluded":
            mask &= ~naive["outlier"][mm]
        x, x_hat = naive["x"][mm][mask], naive["x_hat", s, mm][mask]
        err = ((x - x_hat) ** 2).sum(-1)
        assert row.n_tokens == mask.sum()
        assert row.mse == pytest.approx(err.mean(), rel=1e-5)
        assert row.explained_variance == pytest.approx(1 - err.mean() / ((x**2).sum(-1).mean() - (x.mean(0) ** 2).sum()), rel=1e-6)
        ce = naive["loss"][(mm, "clean")][mask[:, :-1]].mean()
        assert row.ce_clean == pytest.approx(ce, abs=1e-5)


def test_significance_columns_match_scipy_and_bh(ref, naive):
    from scipy.stats import binomtest, false_discovery_control

    feats = table(ref["dir"], "features.parquet")
    cf = naive["counted_flat"]
    for s in ("base_sae", "finetuned_sae"):
        f = feats[feats.sae == s].set_index("feature_id").sort_index()
        a, b_ = naive["acts"][(s, "base")][cf] > 0, naive["acts"][(s, "finetuned")][cf] > 0
        b, c = (a & ~b_).sum(0), (~a & b_).sum(0)
        np.testing.assert_array_equal(f.n_base_only, b)
        np.testing.assert_array_equal(f.n_finetuned_only, c)
        p = np.array([1.0 if bi + ci == 0 else binomtest(int(ci), int(bi + ci), 0.5).pvalue for bi, ci in zip(b, c)])
        np.testing.assert_allclose(f.p_value, p, rtol=1e-9)
        tested = a.any(0) | b_.any(0)
        np.testing.assert_allclose(f.q_value[tested], false_discovery_control(p[tested], method="bh"), rtol=1e-9)
        cb, cf_ = a.sum(0), b_.sum(0)
        np.testing.assert_allclose(f.log_density_ratio, np.log10((cf_ + 0.5) / (cb + 0.5)), rtol=1e-12)
        np.testing.assert_allclose(f.delta_max_act, naive["acts"][(s, "finetuned")][cf].max(0) - naive["acts"][(s, "base")][cf].max(0), rtol=1e-5, atol=1e-7)
        assert set(f.change_class) <= set(schema.CHANGE_CLASSES)
        sig = f.q_value < schema.SIGNIFICANCE_ALPHA
        assert ((f.change_class == "no_significant_change") == (~sig & (cb > 0) & (cf_ > 0))).all()


def test_logit_effect_is_w_dec_times_the_unembedding_difference(ref):
    prep = ref["prep"]
    feats = table(ref["dir"], "features.parquet")
    diff = (prep.pair.finetuned.W_U.detach().numpy() - prep.pair.base.W_U.detach().numpy()).astype(np.float64)
    for s, sae in prep.pair.saes.items():
        f = feats[feats.sae == s].set_index("feature_id").sort_index()
        eff = sae.W_dec.detach().numpy().astype(np.float64) @ diff
        for i in range(0, len(f), 7):
            assert list(f.logit_effect_pos_ids.iloc[i]) == np.argsort(-eff[i], kind="stable")[:10].tolist()
            assert list(f.logit_effect_neg_ids.iloc[i]) == np.argsort(eff[i], kind="stable")[:10].tolist()
            assert f.logit_effect_max_abs.iloc[i] == pytest.approx(np.abs(eff[i]).max(), rel=1e-4)


def _naive_logprobs(prep, tokens_np):
    """Both models' next-token log-probabilities from plain full forwards ([n, C, vocab] float64)."""
    out = {}
    with torch.inference_mode():
        for m, model in (("base", prep.pair.base), ("finetuned", prep.pair.finetuned)):
            lp = [model(torch.from_numpy(tokens_np[i : i + BATCH].astype(np.int64)), return_type="logits").double().log_softmax(-1) for i in range(0, len(tokens_np), BATCH)]
            out[m] = torch.cat(lp).numpy()
    return out


def test_per_token_kl_and_loss_difference_match_full_forwards(ref, naive):
    t = table(ref["dir"], "tokens.parquet")
    kl = np.stack(t.kl.to_numpy())
    diff = np.stack(t.loss_diff.to_numpy())
    lp = _naive_logprobs(ref["prep"], naive["tokens"])
    want = (np.exp(lp["base"]) * (lp["base"] - lp["finetuned"])).sum(-1)[:, :-1]
    np.testing.assert_allclose(kl[:, :-1], want, rtol=2e-3, atol=2e-6)
    assert np.isnan(kl[:, -1]).all() and np.isnan(diff[:, -1]).all()
    np.testing.assert_allclose(diff[:, :-1], naive["loss"][("finetuned", "clean")] - naive["loss"][("base", "clean")], atol=2e-5)
    # the manifest's means over counted positions
    counted = naive["counted"][:, :-1]
    assert ref["manifest"]["summary"]["kl"]["all"]["mean_kl"] == pytest.approx(want[counted].mean(), rel=1e-3)


def test_fused_kl_is_bitwise_the_unfused_expression():
    """forward.clean_losses_and_kl takes the KL from kl_div's fused pass; it is exactly
    sum_v exp(lb) * (lb - lf), including a finetune that gives a token probability ~0."""
    g = torch.Generator().manual_seed(0)
    lb = torch.randn(64, 3000, generator=g).log_softmax(-1)
    lf = (torch.randn(64, 3000, generator=g) * 3).log_softmax(-1)
    lf[0, 5] = -1e4
    fused = torch.nn.functional.kl_div(lf, lb, reduction="none", log_target=True).sum(-1)
    assert torch.equal(fused, (lb.exp() * (lb - lf)).sum(-1))


def test_kl_correlation_and_contexts_match_naive(ref, naive):
    prep = ref["prep"]
    t = table(ref["dir"], "tokens.parquet")
    kl = np.stack(t.kl.to_numpy()).astype(np.float64)
    counted = naive["counted"]
    ok = np.zeros_like(counted)
    ok[:, :-1] = counted[:, :-1]
    feats = table(ref["dir"], "features.parquet")
    for s in ("base_sae", "finetuned_sae"):
        f = feats[feats.sae == s].set_index("feature_id").sort_index()
        delta = np.abs(naive["acts"][(s, "finetuned")] - naive["acts"][(s, "base")]).reshape(N_SEQ, CTX, -1)[ok]
        k = kl[ok]
        for i in range(delta.shape[1]):
            want = np.corrcoef(delta[:, i], k)[0, 1] if delta[:, i].std() > 0 else np.nan
            np.testing.assert_allclose(f.kl_corr.iloc[i], want, atol=1e-6)
    ctx = table(ref["dir"], "kl_contexts.parquet").sort_values("rank")
    flat = np.where(ok, kl, -np.inf).reshape(-1)
    top = np.lexsort((np.arange(flat.size), -flat))[: len(ctx)]
    assert (ctx.seq_id * CTX + ctx.position).tolist() == top.tolist()
    acts = {m: naive["acts"][("base_sae", m)].reshape(N_SEQ, CTX, -1) for m in ("base", "finetuned")}
    for r in ctx.head(10).itertuples():
        d = acts["finetuned"][r.seq_id, r.position] - acts["base"][r.seq_id, r.position]
        order = np.lexsort((np.arange(len(d)), -np.abs(d)))[: len(r.feature_ids)]
        got = np.asarray(r.act_deltas, np.float64)
        np.testing.assert_allclose(np.abs(got), np.abs(d[order]), rtol=1e-4, atol=1e-6)
        assert list(r.feature_ids)[:3] == order[:3].tolist() or np.allclose(np.abs(d[list(r.feature_ids)[:3]]), np.abs(d[order[:3]]), rtol=1e-4)
        assert r.kl == pytest.approx(kl[r.seq_id, r.position], rel=1e-6)
        np.testing.assert_array_equal(r.token_ids, naive["tokens"][r.seq_id, r.window_start : min(CTX, r.position + 2)])


def test_zero_ablation_can_keep_special_tokens(tiny_demo, corpus, tmp_path, ref, naive):
    """[evals] zero_ablation = "counted": BOS keeps its activation; the zero-ablated CE equals a
    hooked forward that zeros only the counted positions (the default zeros every position)."""
    cfg_path = tmp_path / "zc.toml"
    cfg_path.write_text(tiny_config_text(tiny_demo, corpus, run_id="zc", n_seq=32, two_saes=False, extra='[evals]\nzero_ablation = "counted"\n'))
    cfg = RunConfig.from_toml(cfg_path)
    run_dir = run_mod.run(cfg, runs_dir=tmp_path / "runs", progress=False)
    prep = ref["prep"]
    hook = prep.cfg.hook
    met = table(run_dir, "metrics.parquet").set_index(["sae", "model", "outliers"])
    tok = naive["tokens"][:32]
    counted = naive["counted"][:32]
    for m, model in (("base", prep.pair.base), ("finetuned", prep.pair.finetuned)):
        losses = []
        with torch.inference_mode():
            for i in range(0, 32, BATCH):
                keep = torch.from_numpy(counted[i : i + BATCH])[..., None]
                hook_fn = lambda a, hook, keep=keep: torch.where(keep, torch.zeros_like(a), a)  # noqa: E731
                losses.append(model.run_with_hooks(torch.from_numpy(tok[i : i + BATCH].astype(np.int64)), return_type="loss", loss_per_token=True, fwd_hooks=[(hook, hook_fn)]))
        want = torch.cat(losses).numpy()[counted[:, :-1]].mean()
        got = met.loc[("base_sae", m, "included")].ce_zero_ablated
        assert got == pytest.approx(want, abs=1e-5)
        all_zero = naive["loss"][(m, "zero")][:32][counted[:, :-1]].mean()
        assert abs(got - all_zero) > 1e-4  # keeping BOS changes the zero-ablated loss
    assert rundir.open_run(run_dir)["config"]["evals"]["zero_ablation"] == "counted"


def assert_tables_equal(dir_a: Path, dir_b: Path, skip: set[str] = frozenset()) -> None:
    """Every table of two runs: the same columns and rows, every value bitwise (but columns in `skip`)."""
    n = 0
    for name in schema.TABLES:
        if not (dir_a / name).exists():
            assert not (dir_b / name).exists()
            continue
        a, b = table(dir_a, name), table(dir_b, name)
        assert list(a.columns) == list(b.columns) and len(a) == len(b), name
        for col in a.columns:
            if col in skip:
                continue
            if a[col].dtype == object:
                assert a[col].map(repr).tolist() == b[col].map(repr).tolist(), f"{name}.{col}"
            else:
                np.testing.assert_array_equal(a[col].to_numpy(), b[col].to_numpy(), err_msg=f"{name}.{col}")
        n += 1
    assert n >= 10  # the reference run writes every table


def test_update_threads_give_the_same_run_bitwise(ref, tmp_path):
    """The sparse accumulators on 3 threads (each batch's tasks in parallel, overlapping the next
    batch's forwards): every table bitwise the reference run's (which took the default: 1 thread
    here, more on a bigger machine). With a twin, a second SAE and a crosscoder, every kind of task
    runs."""
    assert ref["prep"].twin is not None and "finetuned_sae" in ref["prep"].cfg.sae_names
    cfg = RunConfig.from_toml(ref["cfg_path"])
    run_dir = run_mod.run(cfg, runs_dir=tmp_path / "runs", progress=False, checkpoint_every=2, update_threads=3)
    assert_tables_equal(ref["dir"], run_dir)


@pytest.mark.parametrize("threads", [0, 2])
def test_batch_updates_keep_batches_in_order_and_raise_a_tasks_error(threads):
    """A batch's tasks all finish before the next batch's start (each accumulator sees the batches
    in order); a task's error is raised (at submit on 0 threads, else at the next wait), not lost."""
    import threading
    import time

    from precompute.stream import BatchUpdates

    log, lock = [], threading.Lock()

    def task(b, k):
        def run():
            time.sleep(0.01 * (3 - k))  # the batch's first task finishes last
            with lock:
                log.append(b)

        return run

    with BatchUpdates(threads) as u:
        for b in range(4):
            u.submit([task(b, k) for k in range(3)])
        u.wait()
    assert log == sorted(log) and len(log) == 12
    with BatchUpdates(threads) as u:
        with pytest.raises(ZeroDivisionError):
            u.submit([lambda: None, lambda: 1 / 0])
            u.wait()


def test_ce_every_computes_the_ce_losses_on_every_nth_batch_only(tiny_demo, corpus, tmp_path, ref, naive, tiny_crosscoder):
    """[evals] ce_every = 2: each SAE's CE losses are the naive means over batches 0, 2 and 4 only
    (clean, spliced and zero-ablated on the same tokens); every other column of every table,
    crosscoder included, is bitwise the every-batch run's."""
    cfg_path = tmp_path / "ce2.toml"
    cfg_path.write_text(tiny_config_text(tiny_demo, corpus, extra=f'[crosscoder]\npath = "{tiny_crosscoder}"\n[evals]\nce_every = 2\n'))
    cfg = RunConfig.from_toml(cfg_path)
    assert cfg.evals.ce_every == 2 and cfg.hash() != RunConfig.from_toml(ref["cfg_path"]).hash()
    run_dir = run_mod.run(cfg, runs_dir=tmp_path / "runs", progress=False, checkpoint_every=2)
    assert rundir.open_run(run_dir)["config"]["evals"]["ce_every"] == 2
    ce_cols = {"ce_clean", "ce_spliced", "ce_zero_ablated", "ce_delta", "ce_recovered", "n_nonfinite_clean", "n_nonfinite_spliced", "n_nonfinite_zero_ablated"}
    assert_tables_equal(ref["dir"], run_dir, skip=ce_cols)
    rows = np.zeros(N_SEQ, bool)
    for b_ in range(0, N_SEQ // BATCH, 2):
        rows[b_ * BATCH : (b_ + 1) * BATCH] = True
    counted = naive["counted"][:, :-1]
    met = table(run_dir, "metrics.parquet").set_index(["sae", "model", "outliers"])
    old = table(ref["dir"], "metrics.parquet").set_index(["sae", "model", "outliers"])
    for s in ("base_sae", "finetuned_sae"):
        for m in ("base", "finetuned"):
            row = met.loc[(s, m, "included")]
            clean = naive["loss"][(m, "clean")][rows][counted[rows]].mean()
            zero = naive["loss"][(m, "zero")][rows][counted[rows]].mean()
            spliced = naive["loss"][(s, m, "included")][rows][counted[rows]].mean()
            assert row.ce_clean == pytest.approx(clean, abs=1e-5) and row.ce_zero_ablated == pytest.approx(zero, abs=1e-5)
            assert row.ce_spliced == pytest.approx(spliced, abs=1e-5)
            assert row.ce_recovered == pytest.approx((zero - spliced) / (zero - clean), rel=1e-4)
            assert row.ce_clean != old.loc[(s, m, "included")].ce_clean  # not the every-batch mean
    cc = table(run_dir, "crosscoder_metrics.parquet")
    assert cc.ce_clean.notna().all() and not np.array_equal(cc.ce_clean.to_numpy(), table(ref["dir"], "crosscoder_metrics.parquet").ce_clean.to_numpy())


def test_ce_every_must_be_positive(tiny_demo, corpus, tmp_path):
    from precompute.__main__ import main

    cfg_path = tmp_path / "ce0.toml"
    cfg_path.write_text(tiny_config_text(tiny_demo, corpus, extra="[evals]\nce_every = 0\n"))
    with pytest.raises(ConfigError, match=r"\[evals\] ce_every must be > 0"):
        RunConfig.from_toml(cfg_path)
    assert main(["run", "--config", str(cfg_path), "--runs-dir", str(tmp_path / "runs"), "--no-progress"]) == 2
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
