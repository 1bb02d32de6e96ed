"""explorer.probe against references on the tiny demo pair.

References: TransformerLens's own run_with_cache / run_with_hooks forwards, SAELens's own eval
code (`sae_lens.evals.get_recons_loss`, `get_sparsity_and_variance_metrics`), naive numpy
recomputation, and a hand-written greedy loop without a key-value cache.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest
import torch

from explorer import probe as P
from explorer.errors import ExplorerError
from explorer.models import LoadedPair, ModelSpec, SAESpec, load_pair
from explorer.schema import MODELS

pytestmark = pytest.mark.slow

PROSE = "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times."
CODE = "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n"


@pytest.fixture(scope="module")
def pair(tiny_demo) -> LoadedPair:
    return load_pair(
        ModelSpec(path=str(tiny_demo / "base")),
        ModelSpec(path=str(tiny_demo / "finetuned")),
        SAESpec(path=str(tiny_demo / "saes" / "base_sae")),
        SAESpec(path=str(tiny_demo / "saes" / "finetuned_sae")),
    )


@pytest.fixture(scope="module")
def corpus_ids(tiny_demo) -> list[list[int]]:
    import pyarrow.parquet as pq

    return pq.read_table(tiny_demo / "eval_corpus.parquet", columns=["token_ids"]).column("token_ids").to_pylist()


def _no_hooks_left(pair: LoadedPair) -> bool:
    return all(not hp.fwd_hooks and not hp.bwd_hooks for m in (pair.base, pair.finetuned) for hp in m.hook_dict.values())


def _ref_acts(model, ids, hook) -> torch.Tensor:
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=[hook])
    return cache[hook][0]


def _special(pair) -> list[int]:
    from sae_lens.util import get_special_token_ids

    return sorted(set(get_special_token_ids(pair.base.tokenizer)) | set(get_special_token_ids(pair.finetuned.tokenizer)))


def _with_mid_bos(pair, corpus_ids) -> list[int]:
    """A corpus sequence with an extra BOS in the middle, so special-token masking matters."""
    ids = list(corpus_ids[0][: pair.base.cfg.n_ctx])
    ids[len(ids) // 2] = pair.base.tokenizer.bos_token_id
    return ids


# --------------------------------------------------------------------------------------------
# Activations, features, predictions


def test_feature_acts_equal_sae_encode_of_run_with_cache(pair):
    result = P.probe(pair, CODE)
    ids = list(result.prompt.token_ids)
    assert ids[0] == pair.base.tokenizer.bos_token_id
    assert ids[1:] == pair.base.tokenizer(CODE, add_special_tokens=False)["input_ids"][: len(ids) - 1]
    for m in MODELS:
        x = _ref_acts(getattr(pair, m), ids, pair.hook)
        np.testing.assert_allclose(result.hook_acts[m], x.numpy(), rtol=1e-5, atol=1e-5)
        for s, sae in pair.saes.items():
            with torch.no_grad():
                ref = sae.encode(x).numpy()
            assert result.feature_acts[(s, m)].shape == (len(ids), sae.cfg.d_sae)
            np.testing.assert_allclose(result.feature_acts[(s, m)], ref, rtol=1e-4, atol=1e-5)
    # per-feature view: the same numbers, both models side by side
    fid = int(np.argmax(result.feature_acts[("base_sae", "base")].max(axis=0)))
    df = result.feature_activations("base_sae", fid)
    assert list(df["token_id"]) == ids
    for m in MODELS:
        np.testing.assert_allclose(df[f"act_{m}"], result.feature_acts[("base_sae", m)][:, fid])
    assert df["act_base"].max() > 0


def test_top_features_per_token_match_topk(pair):
    result = P.probe(pair, PROSE)
    acts = result.feature_acts[("finetuned_sae", "finetuned")]
    df = result.top_features_per_token("finetuned_sae", "finetuned", k=3)
    for pos in range(result.prompt.n_tokens):
        vals, idx = torch.topk(torch.from_numpy(acts[pos]), 3)
        want = [(int(i), float(v)) for v, i in zip(vals, idx) if v > 0]
        got = df[df["position"] == pos].sort_values("rank")
        assert list(got["feature_id"]) == [i for i, _ in want]
        np.testing.assert_allclose(got["activation"], [v for _, v in want], rtol=1e-6)
        assert (got["token_str"] == result.prompt.token_strs[pos]).all()


def test_differing_features_against_naive_numpy(pair):
    result = P.probe(pair, CODE)
    ids = list(result.prompt.token_ids)
    sae = pair.saes["base_sae"]
    with torch.no_grad():
        fb = sae.encode(_ref_acts(pair.base, ids, pair.hook)).numpy().astype(np.float64)
        ff = sae.encode(_ref_acts(pair.finetuned, ids, pair.hook)).numpy().astype(np.float64)
    keep = [i for i, t in enumerate(ids) if t not in _special(pair)]
    naive = {}
    for f in range(sae.cfg.d_sae):
        d = [abs(ff[p, f] - fb[p, f]) for p in keep]
        naive[f] = (max(d), sum(d))
    for by, col, j in (("max", "max_abs_diff", 0), ("sum", "sum_abs_diff", 1)):
        df = result.differing_features("base_sae", k=5, by=by)
        assert len(df) == 5
        want = sorted((f for f in naive if naive[f][j] > 0), key=lambda f: (-naive[f][j], f))[:5]
        np.testing.assert_allclose(df[col], [naive[f][j] for f in want], rtol=1e-3, atol=1e-6)
        assert list(df[col]) == sorted(df[col], reverse=True)
        top = df.iloc[0]
        f, p = int(top["feature_id"]), int(top["position"])
        assert p in keep
        assert abs(top["act_finetuned"] - top["act_base"]) == pytest.approx(top["max_abs_diff"])
        assert top["max_act_base"] == pytest.approx(fb[keep, f].max(), rel=1e-4, abs=1e-6)
    with pytest.raises(P.ProbeError):
        result.differing_features("base_sae", by="mean")


def test_next_token_predictions_clean_and_spliced(pair):
    result = P.probe(pair, PROSE)
    ids = torch.tensor([result.prompt.token_ids])
    mask = torch.tensor(result.eval_mask)
    sae = pair.saes["base_sae"]
    for m in MODELS:
        model = getattr(pair, m)
        with torch.no_grad():
            clean = torch.softmax(model(ids)[0, -1], -1)
            spliced = torch.softmax(
                model.run_with_hooks(ids, fwd_hooks=[(pair.hook, lambda a, hook: torch.where(mask[None, :, None], sae.decode(sae.encode(a)), a))])[0, -1], -1
            )
        df = result.next_token_predictions(m)
        for variant, probs in (("clean", clean), ("spliced_base_sae", spliced)):
            got = df[df["variant"] == variant].sort_values("rank")
            vals, idx = torch.topk(probs, P.N_PREDICTIONS)
            assert list(got["token_id"]) == idx.tolist()
            np.testing.assert_allclose(got["prob"], vals.numpy(), rtol=1e-4, atol=1e-7)
    df0 = result.next_token_predictions("base", position=0)
    assert set(df0["position"]) == {0}
    for bad in (-1, result.prompt.n_tokens, "3", 1.0):
        with pytest.raises(P.ProbeError):
            result.next_token_predictions("base", position=bad)
    with pytest.raises(P.ProbeError):
        result.next_token_predictions("chat")


# --------------------------------------------------------------------------------------------
# Reconstruction metrics


@pytest.mark.parametrize("exclude", [True, False])
def test_spliced_ce_equals_manual_hooked_forward(pair, corpus_ids, exclude):
    ids = _with_mid_bos(pair, corpus_ids)
    result = P.probe(pair, P.prepare_token_ids(pair, ids), exclude_special_tokens=exclude)
    special = _special(pair) if exclude else []
    keep = torch.tensor([t not in special for t in ids])
    assert result.eval_mask.tolist() == keep.tolist()
    tokens = torch.tensor([ids])
    for (s, sae) in pair.saes.items():
        for m in MODELS:
            model = getattr(pair, m)

            def splice(act, hook):
                return torch.where(keep[None, :, None], sae.decode(sae.encode(act)), act)

            with torch.no_grad():
                clean = model(tokens, return_type="loss", loss_per_token=True)[0]
                spliced = model.run_with_hooks(tokens, return_type="loss", loss_per_token=True, fwd_hooks=[(pair.hook, splice)])[0]
                zero = model.run_with_hooks(tokens, return_type="loss", loss_per_token=True, fwd_hooks=[(pair.hook, lambda a, hook: torch.zeros_like(a))])[0]
            lm = keep[:-1]
            row = result.reconstruction.query("sae == @s and model == @m").iloc[0]
            assert row["n_loss_tokens"] == int(lm.sum())
            assert row["ce_clean"] == pytest.approx(clean[lm].double().mean().item(), rel=1e-5)
            assert row["ce_spliced"] == pytest.approx(spliced[lm].double().mean().item(), rel=1e-5)
            assert row["ce_zero_ablated"] == pytest.approx(zero[lm].double().mean().item(), rel=1e-5)
            np.testing.assert_allclose(result.losses[(m, P.spliced(s))], spliced.numpy(), rtol=1e-4, atol=1e-5)
            assert row["ce_delta"] == pytest.approx(row["ce_spliced"] - row["ce_clean"])


def test_metrics_equal_sae_lens_evals(pair, corpus_ids):
    """CE clean/spliced/zero, CE recovered, L0, MSE and both explained variances, by SAELens's own code."""
    from sae_lens.evals import get_recons_loss, get_sparsity_and_variance_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    ids = _with_mid_bos(pair, corpus_ids)
    tokens = torch.tensor([ids])
    special = _special(pair)
    result = P.probe(pair, P.prepare_token_ids(pair, ids))

    class OneBatch:  # the only ActivationsStore method these functions call
        def get_batch_tokens(self, n):
            return tokens

    mask = torch.tensor([[t not in special for t in ids]])[:, :-1]
    for s, sae in pair.saes.items():
        for m in MODELS:
            model = getattr(pair, m)
            recons = get_recons_loss(sae, model, ActivationScaler(), tokens, compute_kl=False, compute_ce_loss=True, ignore_tokens=special)
            ce = {k: v[mask].mean().item() for k, v in recons.items()}
            sv, _ = get_sparsity_and_variance_metrics(
                sae, model, OneBatch(), ActivationScaler(), n_batches=1, compute_l2_norms=False, compute_sparsity_metrics=True,
                compute_variance_metrics=True, compute_featurewise_density_statistics=False, eval_batch_size_prompts=1,
                model_kwargs={}, ignore_tokens=special,
            )
            row = result.reconstruction.query("sae == @s and model == @m").iloc[0]
            assert row["ce_clean"] == pytest.approx(ce["ce_loss_without_sae"], rel=1e-5)
            assert row["ce_spliced"] == pytest.approx(ce["ce_loss_with_sae"], rel=1e-5)
            assert row["ce_zero_ablated"] == pytest.approx(ce["ce_loss_with_ablation"], rel=1e-5)
            gap = ce["ce_loss_with_ablation"] - ce["ce_loss_without_sae"]
            score = (ce["ce_loss_with_ablation"] - ce["ce_loss_with_sae"]) / gap
            if gap >= P.CE_GUARD:
                assert row["ce_recovered"] == pytest.approx(score, rel=1e-3, abs=1e-4)
            else:  # zero-ablating does not raise the loss: SAELens's ratio is meaningless (issue 11), the probe says n/a
                assert math.isnan(row["ce_recovered"])
            assert row["l0"] == pytest.approx(sv["l0"], rel=1e-5)
            assert row["mse"] == pytest.approx(sv["mse"], rel=1e-4)
            # renamed to sae_lens's names: the legacy formula was `explained_variance`, the current one `pooled_r2`
            assert row["explained_variance_legacy"] == pytest.approx(sv["explained_variance_legacy"], rel=1e-4, abs=1e-5)
            assert row["explained_variance"] == pytest.approx(sv["explained_variance"], rel=1e-4, abs=1e-5)
            assert row["n_tokens"] == sum(t not in special for t in ids)


def test_metrics_hand_checked_tiny_case():
    """_metrics on numbers small enough to check by hand."""
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    r = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    f = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 3.0, 0.0]])
    mask = np.array([True, True, True])
    clean, spl, zero = np.array([1.0, 2.0]), np.array([2.0, 2.0]), np.array([4.0, 4.0])
    row = P._metrics("base_sae", "base", x, r, f, mask, clean, spl, zero)
    # mean x = (2/3, 2/3); centred norms: 5/9, 5/9, 2/9; rss: 0, 1, 0
    assert row["mse"] == pytest.approx(1 / 3)
    assert row["l0"] == pytest.approx(1.0)
    assert row["explained_variance_legacy"] == pytest.approx((1 + (1 - 9 / 5) + 1) / 3)  # renamed (was explained_variance)
    assert row["explained_variance"] == pytest.approx(1 - 1 / (12 / 9))  # renamed (was pooled_r2): per-dimension means
    # Study T's pooled R^2: one scalar mean 2/3 over the six elements, SST = 4 (1/3)^2 + 2 (2/3)^2 = 12/9
    assert row["pooled_r2"] == pytest.approx(1 - 1 / (12 / 9))
    x2 = np.array([[1.0, 5.0], [0.0, 7.0]])  # per-dimension and scalar means differ here
    row2 = P._metrics("base_sae", "base", x2, x2 * 0.9, f[:2], mask[:2], clean[:1], spl[:1], zero[:1])
    rss = ((x2 * 0.1) ** 2).sum()
    assert row2["explained_variance"] == pytest.approx(1 - rss / ((x2 - x2.mean(0)) ** 2).sum())
    assert row2["pooled_r2"] == pytest.approx(1 - rss / ((x2 - x2.mean()) ** 2).sum())
    assert row["ce_clean"] == 1.5 and row["ce_spliced"] == 2.0 and row["ce_zero_ablated"] == 4.0
    assert row["ce_recovered"] == pytest.approx((4 - 2) / (4 - 1.5))
    row = P._metrics("base_sae", "base", x, r, f, mask, clean, spl, clean + 5e-5)
    assert math.isnan(row["ce_recovered"])  # |zero - clean| < 1e-4
    # zero-ablated BELOW clean (the 1.226): n/a, not (zero - spliced) / (zero - clean)
    row = P._metrics("base_sae", "base", x, r, f, mask, np.array([3.0, 3.0]), np.array([3.1, 3.1]), np.array([2.9, 2.9]))
    assert math.isnan(row["ce_recovered"]) and row["ce_zero_ablated"] < row["ce_clean"]
    row = P._metrics("base_sae", "base", x, r, f, mask, np.array([1.0, np.inf]), spl, zero)
    assert row["ce_clean"] == 1.0 and row["n_nonfinite_clean"] == 1


# --------------------------------------------------------------------------------------------
# Steering


def _manual_greedy(model, ids, n, hook=None, vec=None):
    seq = list(ids)
    hooks = [(hook, lambda a, hook: a + vec)] if vec is not None else []
    with torch.no_grad():
        for _ in range(n):
            logits = model.run_with_hooks(torch.tensor([seq]), fwd_hooks=hooks)
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(ids):]


def test_steering_coef_zero_equals_unsteered(pair):
    res = P.steer(pair, PROSE[:16], sae="base_sae", feature_id=3, coef=0.0, n_new_tokens=8)
    assert res.vector_norm == 0.0
    for m in MODELS:
        row = res.continuations.set_index("model").loc[m]
        assert row["steered_ids"] == row["unsteered_ids"]
        assert not row["changed"] and row["first_difference"] is None
        assert row["unsteered_ids"] == _manual_greedy(getattr(pair, m), res.prompt.token_ids, 8)
        assert row["unsteered_text"] == pair.base.tokenizer.decode(row["unsteered_ids"])


def test_steering_large_coef_changes_continuation_as_a_manual_hook_does(pair):
    fid = 5
    coef = 200.0
    res = P.steer(pair, CODE[:16], sae="finetuned_sae", feature_id=fid, coef=coef, n_new_tokens=8)
    vec = coef * pair.saes["finetuned_sae"].W_dec[fid].detach()
    assert res.vector_norm == pytest.approx(float(vec.norm()), rel=1e-5)
    for m in MODELS:
        row = res.continuations.set_index("model").loc[m]
        assert row["changed"]
        assert row["steered_ids"] != row["unsteered_ids"]
        assert row["steered_ids"] == _manual_greedy(getattr(pair, m), res.prompt.token_ids, 8, pair.hook, vec)
    assert _no_hooks_left(pair)


def test_steering_scale_multiplies_coef_and_kv_cache_matches_recompute(pair):
    a = P.steer(pair, PROSE[:30], sae="base_sae", feature_id=7, coef=3.0, scale=20.0, scale_label="max activation on the base model", n_new_tokens=6)
    b = P.steer(pair, PROSE[:30], sae="base_sae", feature_id=7, coef=60.0, n_new_tokens=6, use_kv_cache=False)
    assert a.vector_norm == pytest.approx(b.vector_norm, rel=1e-6)
    assert "max activation on the base model" in a.description and "20" in a.description
    assert list(a.continuations["steered_ids"]) == list(b.continuations["steered_ids"])
    assert list(a.continuations["unsteered_ids"]) == list(b.continuations["unsteered_ids"])


def test_steering_slides_the_context_past_n_ctx(pair):
    n_ctx = pair.base.cfg.n_ctx
    prompt = P.prepare_prompt(pair, PROSE * 5)
    assert prompt.n_tokens == n_ctx
    res = P.steer(pair, prompt, sae="base_sae", feature_id=1, coef=0.0, n_new_tokens=4)
    assert res.context_slid and res.notices
    # reference: each step sees BOS + the latest n_ctx - 1 tokens
    seq = list(prompt.token_ids)
    with torch.no_grad():
        for _ in range(4):
            window = [seq[0]] + seq[-(n_ctx - 1):]
            seq.append(int(pair.base(torch.tensor([window]))[0, -1].argmax()))
    assert res.continuations.set_index("model").loc["base", "unsteered_ids"] == seq[n_ctx:]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(sae="nope", feature_id=0, coef=1.0),
        dict(sae="base_sae", feature_id=-1, coef=1.0),
        dict(sae="base_sae", feature_id=10**6, coef=1.0),
        dict(sae="base_sae", feature_id="abc", coef=1.0),
        dict(sae="base_sae", feature_id=0, coef=float("nan")),
        dict(sae="base_sae", feature_id=0, coef="big"),
        dict(sae="base_sae", feature_id=0, coef=1.0, n_new_tokens=0),
        dict(sae="base_sae", feature_id=0, coef=1.0, n_new_tokens=P.MAX_NEW_TOKENS + 1),
        dict(sae="base_sae", feature_id=0, coef=1.0, scale=float("inf")),
    ],
)
def test_bad_steering_requests_are_explorer_errors(pair, kwargs):
    with pytest.raises(ExplorerError):
        P.steer(pair, "hello", **kwargs)
    assert _no_hooks_left(pair)


# --------------------------------------------------------------------------------------------
# Thread safety


def test_concurrent_calls_equal_sequential(pair):
    prompts = [PROSE, CODE, PROSE[::-1], CODE.upper(), "a\x07 😀 שלום"]
    jobs = [("probe", p) for p in prompts] + [("steer", p) for p in prompts[:3]]

    def run(job):
        kind, p = job
        if kind == "probe":
            r = P.probe(pair, p)
            return r.reconstruction.drop(columns=[]).to_numpy(), {k: v.copy() for k, v in r.feature_acts.items()}
        r = P.steer(pair, p, sae="base_sae", feature_id=2, coef=50.0, n_new_tokens=6)
        return r.continuations[["steered_ids", "unsteered_ids"]].to_numpy(), None

    sequential = [run(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=6) as pool:
        concurrent = list(pool.map(run, jobs * 2))
    for i, got in enumerate(concurrent):
        want = sequential[i % len(jobs)]
        a, b = got[0], want[0]
        assert a.shape == b.shape
        for x, y in zip(a.ravel(), b.ravel()):
            if isinstance(x, float):
                assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-6, abs=1e-9)
            else:
                assert x == y
        if want[1] is not None:
            for k in want[1]:
                np.testing.assert_allclose(got[1][k], want[1][k], rtol=1e-6, atol=1e-7)
    assert _no_hooks_left(pair)


def test_hooks_are_removed_when_a_call_raises(pair):
    real = pair.saes["base_sae"]

    class Boom:
        cfg = real.cfg
        device = real.device
        dtype = real.dtype

        def encode(self, x):
            raise RuntimeError("boom")

    broken = LoadedPair(pair.base, pair.finetuned, pair.hook, {"base_sae": Boom()}, pair.tokenizer_comparison)
    with pytest.raises(RuntimeError, match="boom"):
        P.probe(broken, PROSE)
    assert _no_hooks_left(pair)
    assert not P.model_lock(pair.base)._is_owned()
    # and the shared models still give the clean results
    r = P.probe(pair, PROSE)
    np.testing.assert_allclose(r.hook_acts["base"], _ref_acts(pair.base, list(r.prompt.token_ids), pair.hook).numpy(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Bad and odd inputs


@pytest.mark.parametrize("text", ["", "   ", "\n\t \r\n", "\u3000"])
def test_empty_prompt_is_a_clear_error(pair, text):
    with pytest.raises(P.PromptError, match="empty"):
        P.prepare_prompt(pair, text)
    with pytest.raises(P.PromptError):
        P.probe(pair, text)


@pytest.mark.parametrize("value", [None, 42, b"bytes", ["list"]])
def test_non_text_prompt_is_a_clear_error(pair, value):
    with pytest.raises(P.PromptError, match="text"):
        P.prepare_prompt(pair, value)


def test_huge_prompt_is_cut_before_tokenizing(pair):
    text = "word " * 20_000  # 100k characters
    assert len(text) == 100_000
    tok = pair.base.tokenizer
    n_ctx = pair.base.cfg.n_ctx
    budget = P.char_budget(tok, n_ctx)
    assert budget < len(text)
    calls = []
    real_call = type(tok).__call__

    class Spy(type(tok)):
        def __call__(self, text, *a, **k):
            calls.append(len(text))
            return real_call(self, text, *a, **k)

    orig_class = tok.__class__
    tok.__class__ = Spy
    try:
        prompt = P.prepare_prompt(pair, text)
    finally:
        tok.__class__ = orig_class
    assert calls and max(calls) <= budget
    assert prompt.truncated and prompt.n_tokens == n_ctx
    full = tok(text, add_special_tokens=False)["input_ids"]
    assert list(prompt.token_ids) == [tok.bos_token_id] + full[: n_ctx - 1]
    assert any("context" in n for n in prompt.notices)
    result = P.probe(pair, prompt)
    assert np.isfinite(result.reconstruction["ce_spliced"]).all()


def test_short_prompt_is_not_truncated(pair):
    prompt = P.prepare_prompt(pair, "hello")
    assert not prompt.truncated and prompt.notices == ()
    assert prompt.token_strs[0] == pair.base.tokenizer.bos_token


@pytest.mark.parametrize(
    "text, expect_in_notice, tokenized_as",
    [
        ("a\x00b\x07c\x1b[31mred", "U+0007", None),
        ("party 😀🎉 time", "span several tokens", None),
        ("שלום עולם and مرحبا", "right-to-left", None),
        ("file\u202egnp.exe", "bidirectional", None),
        ("a\ud800b\udfffc", "surrogate", "a\ufffdb\ufffdc"),
        ("pair \ud83d\ude00 joined", "span several tokens", "pair 😀 joined"),
    ],
)
def test_odd_characters_are_probed_with_a_notice(pair, text, expect_in_notice, tokenized_as):
    prompt = P.prepare_prompt(pair, text)
    assert any(expect_in_notice in n for n in prompt.notices), prompt.notices
    want = tokenized_as if tokenized_as is not None else text
    assert prompt.text == want
    assert list(prompt.token_ids[1:]) == pair.base.tokenizer(want, add_special_tokens=False)["input_ids"]
    result = P.probe(pair, prompt)
    assert result.feature_acts[("base_sae", "base")].shape[0] == prompt.n_tokens
    assert np.isfinite(result.reconstruction["ce_clean"]).all()


def test_all_special_prompt_gives_nan_metrics_not_a_crash(pair):
    result = P.probe(pair, pair.base.tokenizer.bos_token)
    assert result.prompt.n_tokens == 2 and not result.eval_mask.any()
    assert result.reconstruction["mse"].isna().all() and result.reconstruction["ce_spliced"].isna().all()
    assert result.notices
    assert result.differing_features("base_sae").empty


def test_prepare_token_ids(pair, corpus_ids):
    bos = pair.base.tokenizer.bos_token_id
    n_ctx = pair.base.cfg.n_ctx
    seq = corpus_ids[1]
    p = P.prepare_token_ids(pair, seq)
    assert list(p.token_ids) == seq[:n_ctx] and p.bos
    p = P.prepare_token_ids(pair, [t for t in seq[1:6]])
    assert p.token_ids[0] == bos and list(p.token_ids[1:]) == seq[1:6]
    p = P.prepare_token_ids(pair, seq + seq)
    assert p.truncated and p.n_tokens == n_ctx and p.notices
    for bad in ([], [bos], [pair.base.cfg.d_vocab], [-1], ["x"]):
        with pytest.raises(P.PromptError):
            P.prepare_token_ids(pair, bad)


@pytest.mark.parametrize("bad", [-1, 64, "x", "1.5", True, None, 2.5])
def test_feature_id_checks(bad):
    with pytest.raises(P.ProbeError):
        P.check_feature_id(bad, 64)


def test_feature_id_accepts_numeric_strings():
    assert P.check_feature_id("7", 64) == 7 and P.check_feature_id(np.int64(63), 64) == 63


def test_sanitize_text_unit():
    text, notes = P.sanitize_text("plain text")
    assert text == "plain text" and notes == []
    with pytest.raises(P.PromptError):
        P.sanitize_text("\u3000\u00a0 ")  # only (Unicode) whitespace


def test_read_corpus_sequences(tmp_path):
    from explorer import rundir, schema

    table = pa.table({
        "seq_id": [0, 1, 2], "source": ["english", "python", "english"], "token_ids": [[0, 5, 6], [0, 7], [0, 8, 9, 10]],
        "kl": [[0.1, 0.2], [0.3], [0.0, 0.1, 0.2]], "loss_diff": [[0.0, -0.1], [0.2], [0.1, 0.0, 0.0]],
    })
    rundir.write_table(tmp_path, "tokens.parquet", table)
    df = P.read_corpus_sequences(tmp_path, limit=2)
    assert list(df.columns) == P.SEQUENCE_COLUMNS and set(P.SEQUENCE_COLUMNS) <= set(schema.TOKENS.names)
    assert df["seq_id"].tolist() == [0, 1] and list(df["token_ids"][1]) == [0, 7]
    assert len(P.read_corpus_sequences(tmp_path, limit=None)) == 3
    with pytest.raises(ExplorerError):
        P.read_corpus_sequences(tmp_path / "missing")
