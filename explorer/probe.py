"""Live probing of a loaded pair on one prompt: features, reconstruction, predictions, steering.

Everything here runs the real models and SAEs of an `explorer.models.LoadedPair`, on the
same token ids for both models (METHODS.md: x_B(t) and x_F(t) for the same tokens).

    prompt = prepare_prompt(pair, "def f(x):\\n    return")   # sanitise, BOS, truncate
    result = probe(pair, prompt)                                # one batched forward per model
    result.feature_activations("base_sae", 42)                  # per-token, both models
    result.top_features_per_token("base_sae", "finetuned")
    result.differing_features("base_sae")
    result.reconstruction                                       # per (sae, model) metrics
    result.next_token_predictions("base")                       # clean vs spliced
    steer(pair, prompt, sae="base_sae", feature_id=42, coef=8.0, n_new_tokens=20)

Conventions (the same as the run's metrics.parquet, see explorer/schema.py METRICS):
- Tokens: BOS is prepended (every demo sequence starts with BOS; TransformerLens models are
  trained that way), then the prompt is cut to the models' context `n_ctx`.
- Metric positions: like sae_lens `run_evals(..., exclude_special_tokens=True)` and the precompute,
  positions holding a special token of either tokenizer (BOS/EOS/PAD,
  `sae_lens.util.get_special_token_ids`) are left out of
  L0 / MSE / explained variance, are NOT spliced, and their next-token loss is not counted.
  `probe(..., exclude_special_tokens=False)` counts and splices every position.
- MSE: squared error summed over dimensions, mean over tokens. Explained variance under sae_lens
  6.54's names: `explained_variance` = 1 - sum ||x_hat - x||^2 / sum ||x - mean(x)||^2 with the
  per-dimension mean over the prompt's counted tokens (its `ExplainedVarianceCalculator`);
  `explained_variance_legacy` = per token 1 - ||x_hat - x||^2 / ||x - mean(x)||^2, averaged (its
  old formula; the prompt is the batch). `pooled_r2`: Study T's pooled R^2, one scalar mean over
  all elements (docs/METHODS.md section 2).
- CE: per-token next-token loss in nats. Spliced: the hook activation replaced by the SAE's
  reconstruction; zero-ablated: replaced by zeros (every position, as sae_lens does).
  CE recovered = (zero - spliced) / (zero - clean), NaN (n/a) unless zero - clean >= 1e-4 (when
  zero-ablating does not raise the loss, there is nothing to recover).

Thread safety: the app shares one cached pair between sessions. TransformerLens attaches hooks
to the (shared) modules for the duration of a call, so every forward pass of a model runs
under that model's lock (`model_lock`), and hooks are attached only through
`run_with_hooks`, which removes them even when the call raises. SAEs are only called
(`encode` / `decode`), never hooked or mutated. Tokenizer calls hold the tokenizer's lock.
"""

from __future__ import annotations

import math
import threading
import time
import unicodedata
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from explorer.errors import ExplorerError
from explorer.schema import MODELS, TOKENS

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

    from explorer.models import LoadedPair


class PromptError(ExplorerError):
    """The prompt cannot be probed (empty, not text)."""


class ProbeError(ExplorerError):
    """A probe or steering request names an unknown SAE, a feature out of range, or bad settings."""


N_PREDICTIONS = 5  # next-token predictions kept per (model, variant, position)
MAX_NEW_TOKENS = 256
MAX_PROMPT_CHARS = 400_000  # hard ceiling on characters ever handed to the tokenizer
CE_GUARD = 1e-4
CLEAN = "clean"
ZERO_ABLATED = "zero_ablated"
ALLOWED_CONTROLS = {"\n", "\t", "\r"}
_BIDI_CONTROLS = {"\u200e", "\u200f", "\u061c", *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A))}
_RTL_CLASSES = {"R", "AL"}


def spliced(sae: str) -> str:
    """The variant name of the forward pass spliced with `sae`'s reconstruction."""
    return f"spliced_{sae}"


# --------------------------------------------------------------------------------------------
# Locks


_locks: "weakref.WeakKeyDictionary[Any, threading.RLock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def model_lock(obj: Any) -> threading.RLock:
    """The lock that serialises hooked forward passes (or tokenizer calls) on a shared object."""
    with _locks_guard:
        lock = _locks.get(obj)
        if lock is None:
            lock = _locks[obj] = threading.RLock()
        return lock


# --------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt ready for both models."""

    text: str  # the text actually tokenized, after sanitising and cutting ("" for raw token ids)
    token_ids: tuple[int, ...]  # fed to both models; starts with BOS when the tokenizer has one
    token_strs: tuple[str, ...]  # display strings (explorer/tokens.py: characters split over byte tokens shown whole on the last); raw, escape before rendering
    n_ctx: int  # the models' context length
    truncated: bool  # the prompt was longer than n_ctx tokens and was cut
    bos: bool  # token_ids[0] is the BOS token we prepended (or the sequence's own BOS)
    notices: tuple[str, ...] = ()  # plain-words notes for the user (truncation, odd characters)
    token_pieces: tuple[str, ...] = ()  # each token's raw piece (convert_ids_to_tokens), for hover text

    @property
    def token_titles(self) -> list[str]:
        """Hover text per token: its id and raw piece."""
        return [f"id {i} · piece {p!r}" for i, p in zip(self.token_ids, self.token_pieces)]

    @property
    def token_labels(self) -> list[str]:
        """One label per token for tables: its display string, or its raw piece where the display
        string is empty (a byte piece of a character shown on the next token)."""
        return [s or p for s, p in zip(self.token_strs, self.token_pieces or [""] * len(self.token_strs))]

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


def sanitize_text(text: Any) -> tuple[str, list[str]]:
    """Make `text` safe to tokenize and say what is unusual about it.

    Lone UTF-16 surrogates (which no tokenizer accepts) become U+FFFD; valid surrogate pairs
    are joined into their character. Control characters, emoji and right-to-left text are kept
    (the models see them as bytes) and reported. Raises PromptError for non-text or an empty /
    whitespace-only prompt.
    """
    if not isinstance(text, str):
        raise PromptError(f"The prompt must be text, got {type(text).__name__}.")
    notices: list[str] = []
    if any("\ud800" <= c <= "\udfff" for c in text):
        fixed = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        n_bad = fixed.count("\ufffd") - text.count("\ufffd")
        if n_bad:
            notices.append(f"The prompt contained {n_bad} invalid character(s) (lone UTF-16 surrogates); each was replaced by U+FFFD (\ufffd).")
        text = fixed
    if not text.strip():
        raise PromptError("The prompt is empty. Type some text, or pick a sequence from the corpus.")
    controls = sorted({c for c in text if unicodedata.category(c) == "Cc" and c not in ALLOWED_CONTROLS})
    if controls:
        shown = ", ".join(f"U+{ord(c):04X}" for c in controls[:5])
        notices.append(f"The prompt contains control characters ({shown}); they are fed to the models as-is.")
    bidi = sorted({c for c in text if c in _BIDI_CONTROLS})
    if bidi:
        shown = ", ".join(f"U+{ord(c):04X}" for c in bidi[:5])
        notices.append(f"The prompt contains invisible bidirectional-control characters ({shown}); they are kept, and each token is displayed isolated so they cannot reorder the page.")
    if any(unicodedata.bidirectional(c) in _RTL_CLASSES for c in text):
        notices.append("The prompt contains right-to-left text; tokens are listed in reading (logical) order.")
    return text, notices


def _tokenizer(pair: "LoadedPair"):
    tok = pair.base.tokenizer
    if tok is None:
        raise ProbeError("The base model has no tokenizer, so a typed prompt cannot be tokenized.")
    return tok


def _n_ctx(pair: "LoadedPair") -> int:
    return int(min(pair.base.cfg.n_ctx, pair.finetuned.cfg.n_ctx))


_max_token_chars: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()


def _longest_token(tokenizer) -> int:
    """The longest vocabulary string, an upper bound on the characters one token covers."""
    n = _max_token_chars.get(tokenizer)
    if n is None:
        n = max((len(s) for s in tokenizer.get_vocab()), default=1)
        _max_token_chars[tokenizer] = n
    return max(1, n)


def char_budget(tokenizer, n_ctx: int) -> int:
    """How many characters are certainly enough for n_ctx tokens.

    A token covers at most `_longest_token` characters of normalised text; the factor 2 and the
    margin cover normalisers that merge characters and the cut landing inside a word.
    """
    return min(MAX_PROMPT_CHARS, max(4096, 2 * (n_ctx + 16) * _longest_token(tokenizer)))


def decode_tokens(tokenizer, ids) -> list[str]:
    """Each id's display form alone (explorer/tokens.py: SentencePiece's `▁` as a space, bytes
    that are not a whole character as \\xNN), for lists of single tokens (predictions)."""
    from explorer.tokens import _tokenizer_vocab

    ids = [int(i) for i in ids]
    if not ids:
        return []
    with model_lock(tokenizer):
        vocab = _tokenizer_vocab(tokenizer, max(ids) + 1)
    return [vocab.single(i) for i in ids]


def decode_window(tokenizer, ids) -> tuple[list[str], list[str]]:
    """(display strings of running text, raw pieces): explorer/tokens.py under the tokenizer's lock."""
    from explorer.tokens import _tokenizer_vocab

    ids = [int(i) for i in ids]
    if not ids:
        return [], []
    with model_lock(tokenizer):
        vocab = _tokenizer_vocab(tokenizer, max(ids) + 1)
    return vocab.window(ids), [vocab.pieces[i] if i < len(vocab.pieces) else "" for i in ids]


def decode_text(pair: "LoadedPair", ids) -> str:
    tok = _tokenizer(pair)
    with model_lock(tok):
        return tok.decode([int(i) for i in ids])


def _bos_id(tokenizer) -> int | None:
    bos = getattr(tokenizer, "bos_token_id", None)
    return None if bos is None else int(bos)


def _split_char_notice(token_strs) -> list[str]:
    if any(s == "" for s in token_strs[:-1]):
        return ["Some characters (for example emoji or non-Latin letters) span several tokens; each is shown once, on the token that completes it (hover for the pieces)."]
    return []


def prepare_prompt(pair: "LoadedPair", text: Any) -> PreparedPrompt:
    """Sanitise, tokenize (BOS first, as the models were trained), and cut to n_ctx tokens.

    An absurdly long prompt is first cut to `char_budget` characters, so a 100k-character prompt
    is never tokenized whole. Raises PromptError for an empty prompt.
    """
    text, notices = sanitize_text(text)
    tok = _tokenizer(pair)
    n_ctx = _n_ctx(pair)
    budget = char_budget(tok, n_ctx)
    cut_chars = len(text) > budget
    if cut_chars:
        text = text[:budget]
    with model_lock(tok):
        body = list(tok(text, add_special_tokens=False)["input_ids"])
    bos = _bos_id(tok)
    ids = ([bos] if bos is not None else []) + body
    truncated = len(ids) > n_ctx or cut_chars
    n_seen = len(ids)
    if len(ids) > n_ctx:
        ids = ids[:n_ctx]
        text = decode_text(pair, body[: n_ctx - (bos is not None)])
    if truncated:
        more = "more than " if cut_chars else ""
        notices.insert(0, f"The prompt has {more}{n_seen if not cut_chars else n_ctx} tokens; the models' context is {n_ctx} tokens, so only the first {n_ctx} (BOS included) are used.")
    if bos is None:
        notices.append("The tokenizer has no BOS token, so none was prepended.")
    token_strs, pieces = decode_window(tok, ids)
    notices += _split_char_notice(token_strs)
    return PreparedPrompt(text, tuple(ids), tuple(token_strs), n_ctx, truncated, bos is not None, tuple(notices), tuple(pieces))


def prepare_token_ids(pair: "LoadedPair", token_ids, text: str | None = None) -> PreparedPrompt:
    """A prompt from token ids as stored in a run (e.g. a corpus sequence): BOS kept or added, cut to n_ctx."""
    tok = _tokenizer(pair)
    n_ctx = _n_ctx(pair)
    try:
        ids = [int(i) for i in token_ids]
    except (TypeError, ValueError):
        raise PromptError("Token ids must be integers.") from None
    d_vocab = int(pair.shared_vocab or min(pair.base.cfg.d_vocab, pair.finetuned.cfg.d_vocab))
    bad = [i for i in ids if not 0 <= i < d_vocab]
    if bad:
        raise PromptError(f"Token id(s) {bad[:5]} are outside the vocabulary (0..{d_vocab - 1}).")
    bos = _bos_id(tok)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    if len(ids) <= (bos is not None):
        raise PromptError("The sequence is empty. Pick another sequence or type a prompt.")
    notices: list[str] = []
    truncated = len(ids) > n_ctx
    if truncated:
        notices.append(f"The sequence has {len(ids)} tokens; only the first {n_ctx} (the models' context) are used.")
        ids = ids[:n_ctx]
    token_strs, pieces = decode_window(tok, ids)
    if text is None:
        text = decode_text(pair, ids[1:] if bos is not None else ids)
    return PreparedPrompt(text, tuple(ids), tuple(token_strs), n_ctx, truncated, bos is not None, tuple(notices), tuple(pieces))


def _as_prompt(pair: "LoadedPair", prompt: "PreparedPrompt | str") -> PreparedPrompt:
    return prompt if isinstance(prompt, PreparedPrompt) else prepare_prompt(pair, prompt)


SEQUENCE_COLUMNS = ["seq_id", "source", "token_ids"]  # of tokens.parquet (its per-token KL columns are not read here)


def read_corpus_sequences(run_dir: str | Path, limit: int | None = 200) -> pd.DataFrame:
    """The first `limit` sequences of a run's tokens.parquet: seq_id, source, token_ids."""
    import pyarrow.parquet as pq

    path = Path(run_dir) / "tokens.parquet"
    if not path.exists():
        raise ExplorerError(f"The run at {run_dir} has no tokens.parquet; re-run its precompute.")
    pf = pq.ParquetFile(path)
    names = SEQUENCE_COLUMNS
    if limit is None:
        table = pf.read(columns=names)
    else:
        batches = pf.iter_batches(batch_size=max(1, int(limit)), columns=names)
        first = next(batches, None)
        if first is None:
            return pd.DataFrame({n: [] for n in names})
        import pyarrow as pa

        table = pa.Table.from_batches([first])
    return table.to_pandas()


# --------------------------------------------------------------------------------------------
# The probe


@dataclass
class ProbeResult:
    """Everything the live-probe page shows, as numpy arrays and DataFrames (no torch)."""

    prompt: PreparedPrompt
    hook: str
    sae_names: tuple[str, ...]
    d_sae: dict[str, int]
    eval_mask: np.ndarray  # [pos] bool: positions counted in the metrics and spliced
    hook_acts: dict[str, np.ndarray]  # model -> [pos, d_in] float32
    feature_acts: dict[tuple[str, str], np.ndarray]  # (sae, model) -> [pos, d_sae] float32
    reconstruction: pd.DataFrame  # one row per (sae, model)
    predictions: pd.DataFrame  # model, variant, position, rank, token_id, token_str, prob
    losses: dict[tuple[str, str], np.ndarray]  # (model, variant) -> [pos - 1] per-token CE (nats)
    seconds: float
    notices: tuple[str, ...] = ()

    @property
    def variants(self) -> tuple[str, ...]:
        return (CLEAN, *(spliced(s) for s in self.sae_names), ZERO_ABLATED)

    def _check(self, sae: str, feature_id: Any | None = None) -> int | None:
        if sae not in self.sae_names:
            raise ProbeError(f"Unknown SAE {sae!r}; this run has {list(self.sae_names)}.")
        if feature_id is None:
            return None
        return check_feature_id(feature_id, self.d_sae[sae])

    def _tokens_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {"position": np.arange(self.prompt.n_tokens), "token_id": list(self.prompt.token_ids), "token_str": list(self.prompt.token_strs)}
        )

    def feature_activations(self, sae: str, feature_id: Any) -> pd.DataFrame:
        """Per token: the feature's activation on each model (columns act_base, act_finetuned)."""
        fid = self._check(sae, feature_id)
        df = self._tokens_frame()
        for m in MODELS:
            df[f"act_{m}"] = self.feature_acts[(sae, m)][:, fid].astype(np.float64)
        df["counted"] = self.eval_mask
        return df

    def top_features_per_token(self, sae: str, model: str, k: int = 5) -> pd.DataFrame:
        """Long form: for each position its k most active features (activation > 0 only)."""
        self._check(sae)
        _check_model(model)
        acts = self.feature_acts[(sae, model)]
        k = max(1, min(int(k), acts.shape[1]))
        order = np.argsort(-acts, axis=1, kind="stable")[:, :k]
        vals = np.take_along_axis(acts, order, axis=1)
        pos, rank = np.nonzero(vals > 0)
        return pd.DataFrame(
            {
                "position": pos,
                "token_str": [self.prompt.token_labels[p] for p in pos],
                "rank": rank,
                "feature_id": order[pos, rank].astype(np.int64),
                "activation": vals[pos, rank].astype(np.float64),
            }
        )

    def differing_features(self, sae: str, k: int = 20, by: Literal["max", "sum"] = "max") -> pd.DataFrame:
        """The features whose activation differs most between the models on this prompt.

        Over the counted positions: max_abs_diff = max |f(x_F) - f(x_B)|, sum_abs_diff = its sum;
        ranked by `by` (ties by feature_id). Features with no difference are left out.
        """
        self._check(sae)
        if by not in ("max", "sum"):
            raise ProbeError(f"Rank by 'max' or 'sum', not {by!r}.")
        mask = self.eval_mask
        base = self.feature_acts[(sae, "base")][mask].astype(np.float64)
        fine = self.feature_acts[(sae, "finetuned")][mask].astype(np.float64)
        cols = ["feature_id", "max_abs_diff", "sum_abs_diff", "position", "token_str", "act_base", "act_finetuned", "max_act_base", "max_act_finetuned"]
        if base.shape[0] == 0:
            return pd.DataFrame({c: [] for c in cols})
        diff = fine - base
        absd = np.abs(diff)
        score = absd.max(axis=0) if by == "max" else absd.sum(axis=0)
        ids = np.nonzero(score > 0)[0]
        ids = ids[np.lexsort((ids, -score[ids]))][: max(0, int(k))]
        positions = np.nonzero(mask)[0]
        arg = absd[:, ids].argmax(axis=0)
        return pd.DataFrame(
            {
                "feature_id": ids.astype(np.int64),
                "max_abs_diff": absd[:, ids].max(axis=0),
                "sum_abs_diff": absd[:, ids].sum(axis=0),
                "position": positions[arg],
                "token_str": [self.prompt.token_labels[p] for p in positions[arg]],
                "act_base": base[arg, ids],
                "act_finetuned": fine[arg, ids],
                "max_act_base": base[:, ids].max(axis=0),
                "max_act_finetuned": fine[:, ids].max(axis=0),
            },
            columns=cols,
        )

    def next_token_predictions(self, model: str, position: int | None = None) -> pd.DataFrame:
        """Top next-token predictions at `position` (default: the last), one row per (variant, rank)."""
        _check_model(model)
        n = self.prompt.n_tokens
        if position is None:
            position = n - 1
        if not isinstance(position, (int, np.integer)) or not 0 <= int(position) < n:
            raise ProbeError(f"Position must be an integer between 0 and {n - 1}, got {position!r}.")
        p = self.predictions
        return p[(p["model"] == model) & (p["position"] == int(position))].reset_index(drop=True)


def check_feature_id(feature_id: Any, d_sae: int) -> int:
    """An int feature id in 0..d_sae-1, or a ProbeError that says so."""
    if isinstance(feature_id, bool):
        raise ProbeError(f"Feature id must be a whole number, got {feature_id!r}.")
    if isinstance(feature_id, (int, np.integer)):
        fid = int(feature_id)
    else:
        try:
            fid = int(str(feature_id).strip())
        except ValueError:
            raise ProbeError(f"Feature id must be a whole number between 0 and {d_sae - 1}, got {str(feature_id)[:40]!r}.") from None
    if not 0 <= fid < d_sae:
        raise ProbeError(f"Feature {fid} does not exist: this SAE has features 0 to {d_sae - 1}.")
    return fid


def _check_model(model: str) -> None:
    if model not in MODELS:
        raise ProbeError(f"Model must be one of {list(MODELS)}, not {model!r}.")


def _check_sae_supported(name: str, sae: "SAE") -> None:
    if getattr(sae.cfg.metadata, "hook_head_index", None) is not None:
        raise ProbeError(f"{name} reads a single attention head (hook_head_index); the live probe supports whole-hook SAEs only.")


def _encode_decode(sae: "SAE", x: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Feature activations [pos, d_sae] and reconstruction (x's shape) of one sequence's activations."""
    xin = x if getattr(sae, "hook_z_reshaping_mode", False) else x.reshape(x.shape[0], -1)
    feats = sae.encode(xin.to(sae.device, sae.dtype))
    recon = sae.decode(feats).reshape(x.shape).to(x.device, x.dtype)
    return feats.reshape(x.shape[0], -1), recon


def _special_ids(tokenizer) -> set[int]:
    from sae_lens.util import get_special_token_ids

    return set(int(i) for i in get_special_token_ids(tokenizer)) if tokenizer is not None else set()


def _forward_variants(model: "HookedTransformer", tokens: "torch.Tensor", hook: str, saes: dict[str, "SAE"], splice: "torch.Tensor"):
    """One batched forward: row 0 clean, then one row per SAE spliced, then zero-ablated.

    The hook reads the clean activation from row 0 (upstream of the hook every row is the same
    computation on the same tokens), encodes it with each SAE, and writes each row's
    replacement. Returns (logits [V, pos, vocab], x [pos, ...], {sae: (feats, recon)}).
    """
    import torch

    captured: dict[str, Any] = {}

    def replace(act: "torch.Tensor", hook: Any) -> "torch.Tensor":  # noqa: ARG001
        x = act[0]  # [pos, d_in] (or [pos, n_heads, d_head])
        captured["x"] = x.clone()
        rows = [x]
        for name, sae in saes.items():
            feats, recon = _encode_decode(sae, x)
            captured[name] = (feats, recon)
            keep = splice.reshape(-1, *([1] * (x.ndim - 1)))
            rows.append(torch.where(keep, recon, x))
        rows.append(torch.zeros_like(x))
        return torch.stack(rows)

    batch = tokens.expand(len(saes) + 2, -1)
    with model_lock(model):
        logits = model.run_with_hooks(batch, return_type="logits", fwd_hooks=[(hook, replace)])
    return logits, captured


def probe(pair: "LoadedPair", prompt: "PreparedPrompt | str", *, exclude_special_tokens: bool = True) -> ProbeResult:
    """Run both models and every SAE of `pair` on `prompt` (see the module docstring)."""
    import torch

    t0 = time.perf_counter()
    prompt = _as_prompt(pair, prompt)
    for name, sae in pair.saes.items():
        _check_sae_supported(name, sae)
    tok = _tokenizer(pair)
    ids = np.asarray(prompt.token_ids, dtype=np.int64)
    special = (_special_ids(tok) | _special_ids(pair.finetuned.tokenizer)) if exclude_special_tokens else set()
    mask = ~np.isin(ids, list(special)) if special else np.ones(len(ids), dtype=bool)
    notices: list[str] = []
    if not mask.any():
        notices.append("Every token of this prompt is a special token, so reconstruction metrics are not defined (NaN).")
    elif len(ids) < 3:
        notices.append("The prompt is very short: reconstruction metrics on so few tokens are noisy.")
    names = tuple(pair.saes)
    variants = (CLEAN, *(spliced(s) for s in names), ZERO_ABLATED)
    hook_acts: dict[str, np.ndarray] = {}
    feature_acts: dict[tuple[str, str], np.ndarray] = {}
    losses: dict[tuple[str, str], np.ndarray] = {}
    metric_rows = []
    pred_parts = []
    with torch.inference_mode():
        tokens = torch.as_tensor(ids, device=pair.base.cfg.device).unsqueeze(0)
        splice = torch.as_tensor(mask, device=pair.base.cfg.device)
        for m in MODELS:
            model = getattr(pair, m)
            logits, cap = _forward_variants(model, tokens.to(model.cfg.device), pair.hook, pair.saes, splice.to(model.cfg.device))
            logits = logits.float()  # [V, pos, vocab]
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [V, pos, 1]
            nxt = tokens[0, 1:].to(logits.device)
            picked = logits[:, :-1].gather(-1, nxt.view(1, -1, 1).expand(logits.shape[0], -1, 1))
            tok_loss = (lse[:, :-1] - picked).squeeze(-1)  # [V, pos-1]: -log p(next token)
            top_l, top_i = torch.topk(logits, k=min(N_PREDICTIONS, logits.shape[-1]), dim=-1)  # [V, pos, k]
            top_p = (top_l - lse).exp()
            loss_np = tok_loss.double().cpu().numpy()
            for v, name in enumerate(variants):
                losses[(m, name)] = loss_np[v]
            pred_parts.append((m, top_i.cpu().numpy(), top_p.double().cpu().numpy()))
            x = cap["x"].reshape(len(ids), -1).double().cpu().numpy()
            hook_acts[m] = x.astype(np.float32)
            for s in names:
                feats, recon = cap[s]
                f = feats.float().cpu().numpy()
                feature_acts[(s, m)] = f
                r = recon.reshape(len(ids), -1).double().cpu().numpy()
                metric_rows.append(_metrics(s, m, x, r, f, mask, loss_np[0], loss_np[variants.index(spliced(s))], loss_np[-1]))
    for m in MODELS:  # a broken model or SAE (NaN/inf weights, overflow): say so, never crash
        bad = int((~np.isfinite(hook_acts[m]).all(axis=1)).sum())
        if bad:
            notices.append(
                f"The {m} model's activations at {pair.hook} are not finite (NaN or inf) on {bad} of {len(ids)} tokens "
                "(broken or overflowing weights?): feature activations and metrics there are not meaningful; the "
                "n_nonfinite_* columns of the reconstruction table count them."
            )
    reconstruction = pd.DataFrame(metric_rows)
    predictions = _predictions_frame({m: getattr(pair, m).tokenizer or tok for m in MODELS}, variants, pred_parts)
    return ProbeResult(
        prompt=prompt,
        hook=pair.hook,
        sae_names=names,
        d_sae={s: int(pair.saes[s].cfg.d_sae) for s in names},
        eval_mask=mask,
        hook_acts=hook_acts,
        feature_acts=feature_acts,
        reconstruction=reconstruction,
        predictions=predictions,
        losses=losses,
        seconds=time.perf_counter() - t0,
        notices=tuple(notices),
    )


def _finite_mean(values: np.ndarray) -> tuple[float, int]:
    finite = np.isfinite(values)
    n_bad = int((~finite).sum())
    return (float(values[finite].mean()) if finite.any() else math.nan), n_bad


def _metrics(sae: str, model: str, x: np.ndarray, recon: np.ndarray, feats: np.ndarray, mask: np.ndarray, clean: np.ndarray, splice: np.ndarray, zero: np.ndarray) -> dict[str, Any]:
    """Reconstruction metrics of one (SAE, model) on this prompt, in float64 (module docstring)."""
    xs, rs = x[mask], recon[mask]
    n = int(mask.sum())
    loss_mask = mask[:-1]
    row: dict[str, Any] = {"sae": sae, "model": model, "n_tokens": n, "n_loss_tokens": int(loss_mask.sum())}
    if n:
        rss = ((xs - rs) ** 2).sum(axis=1)  # [n]
        centred = ((xs - xs.mean(axis=0)) ** 2).sum(axis=1)  # [n]
        with np.errstate(divide="ignore", invalid="ignore"):
            per_token = np.where(centred > 0, 1.0 - rss / centred, np.nan)
        row["l0"] = float((feats[mask] > 0).sum(axis=1).mean())
        row["mse"] = float(rss.mean())
        row["explained_variance"] = float(1.0 - rss.sum() / centred.sum()) if centred.sum() > 0 else math.nan
        row["explained_variance_legacy"] = float(per_token.mean()) if n > 1 else math.nan
        sst = ((xs - xs.mean()) ** 2).sum()  # one scalar mean over every element (Study T)
        row["pooled_r2"] = float(1.0 - rss.sum() / sst) if sst > 0 else math.nan
    else:
        row.update(l0=math.nan, mse=math.nan, explained_variance=math.nan, explained_variance_legacy=math.nan, pooled_r2=math.nan)
    ce = {}
    for key, values in (("clean", clean), ("spliced", splice), ("zero_ablated", zero)):
        ce[key], row[f"n_nonfinite_{key}"] = _finite_mean(values[loss_mask])
        row[f"ce_{key}"] = ce[key]
    row["ce_delta"] = ce["spliced"] - ce["clean"]
    gap = ce["zero_ablated"] - ce["clean"]
    # n/a unless zero-ablation hurts: with zero - clean <= 1e-4 the ratio has no meaning (a negative gap gave 1.226)
    row["ce_recovered"] = (ce["zero_ablated"] - ce["spliced"]) / gap if gap >= CE_GUARD else math.nan
    order = ["sae", "model", "n_tokens", "n_loss_tokens", "l0", "mse", "explained_variance", "explained_variance_legacy", "pooled_r2", "ce_clean", "ce_spliced", "ce_zero_ablated", "ce_delta", "ce_recovered", "n_nonfinite_clean", "n_nonfinite_spliced", "n_nonfinite_zero_ablated"]
    return {k: row[k] for k in order}


def _predictions_frame(tokenizers: dict, variants, parts) -> pd.DataFrame:
    """Each model's predictions, named by its own tokenizer (a finetune may predict its added tokens)."""
    frames = []
    for model, ids, probs in parts:
        uniq = np.unique(ids).tolist()
        strs = dict(zip(uniq, decode_tokens(tokenizers[model], uniq)))
        V, P, K = ids.shape
        v, p, r = np.meshgrid(np.arange(V), np.arange(P), np.arange(K), indexing="ij")
        flat_ids = ids.ravel()
        frames.append(
            pd.DataFrame(
                {
                    "model": model,
                    "variant": np.asarray(variants, dtype=object)[v.ravel()],
                    "position": p.ravel(),
                    "rank": r.ravel(),
                    "token_id": flat_ids.astype(np.int64),
                    "token_str": [strs[i] for i in flat_ids.tolist()],
                    "prob": probs.ravel(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------------------------
# Steering


@dataclass
class SteeringResult:
    prompt: PreparedPrompt
    sae: str
    feature_id: int
    coef: float
    scale: float  # multiplies coef; 1.0 unless scaled by the feature's max activation
    scale_label: str  # what `scale` is, in words
    vector_norm: float  # ||coef * scale * W_dec[feature]||
    n_new_tokens: int
    continuations: pd.DataFrame  # one row per model: unsteered/steered ids and text, first_difference
    context_slid: bool  # prompt + continuation exceeded n_ctx: the models saw BOS + the last n_ctx-1 tokens
    seconds: float = 0.0
    notices: tuple[str, ...] = field(default_factory=tuple)

    @property
    def description(self) -> str:
        if self.scale_label:
            return f"{self.coef:g} × {self.scale_label} ({self.scale:.4g}) × W_dec[{self.feature_id}] of {self.sae}"
        return f"{self.coef:g} × W_dec[{self.feature_id}] of {self.sae}"


def greedy_continuation(
    model: "HookedTransformer",
    token_ids,
    n_new_tokens: int,
    hook: str | None = None,
    vectors: "torch.Tensor | None" = None,
    bos: int | None = None,
    use_kv_cache: bool = True,
) -> tuple[list[list[int]], bool]:
    """Greedy continuations of one prompt for a batch of steering vectors.

    Row r of the batch has `vectors[r]` added to the activation at `hook` at every position
    (a zero row is the unsteered continuation). Deterministic: argmax, ties to the lowest id.
    While prompt + continuation fit in n_ctx, a key-value cache is used; beyond that, every
    step recomputes on BOS + the last n_ctx - 1 tokens (returned flag: the context slid).
    Returns (new token ids per row, context_slid).
    """
    import torch

    n_ctx = int(model.cfg.n_ctx)
    device = model.cfg.device
    ids = [int(i) for i in token_ids]
    rows = 1 if vectors is None else int(vectors.shape[0])
    seq = torch.tensor([ids] * rows, dtype=torch.long, device=device)

    def add(act: "torch.Tensor", hook: Any) -> "torch.Tensor":  # noqa: ARG001
        return act + vectors.to(act.device, act.dtype).reshape(rows, 1, *act.shape[2:])

    hooks = [(hook, add)] if vectors is not None and hook is not None else []
    fits = len(ids) + n_new_tokens - 1 <= n_ctx
    slid = False
    new: list[torch.Tensor] = []
    with torch.inference_mode(), model_lock(model), model.hooks(fwd_hooks=hooks):
        # hooks() attaches once for the whole loop and removes them on exit, even on an exception
        if use_kv_cache and fits and _has_kv_cache(model):
            from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

            cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, rows)
            step_in = seq
            for _ in range(n_new_tokens):
                logits = model(step_in, return_type="logits", past_kv_cache=cache)
                nxt = logits[:, -1].argmax(dim=-1)
                new.append(nxt)
                step_in = nxt.unsqueeze(1)
        else:
            for _ in range(n_new_tokens):
                window = seq
                if seq.shape[1] > n_ctx:
                    slid = True
                    head = seq[:, :1] if bos is not None and int(seq[0, 0]) == bos else seq[:, :0]
                    window = torch.cat([head, seq[:, -(n_ctx - head.shape[1]) :]], dim=1)
                logits = model(window, return_type="logits")
                nxt = logits[:, -1].argmax(dim=-1)
                new.append(nxt)
                seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
    out = torch.stack(new, dim=1).cpu().tolist() if new else [[] for _ in range(rows)]
    return out, slid


def _has_kv_cache(model) -> bool:
    """TransformerLens's key-value cache serves HookedTransformer; a TransformerBridge recomputes."""
    from transformer_lens import HookedTransformer

    return isinstance(model, HookedTransformer)


def steering_vector(pair: "LoadedPair", sae: str, feature_id: Any) -> "torch.Tensor":
    """W_dec[feature_id] of `sae`, as a float32 tensor [d_in]."""
    if sae not in pair.saes:
        raise ProbeError(f"Unknown SAE {sae!r}; this run has {list(pair.saes)}.")
    s = pair.saes[sae]
    fid = check_feature_id(feature_id, int(s.cfg.d_sae))
    return s.W_dec[fid].detach().float().clone()


def steer(
    pair: "LoadedPair",
    prompt: "PreparedPrompt | str",
    *,
    sae: str,
    feature_id: Any,
    coef: float,
    n_new_tokens: int = 20,
    scale: float | None = None,
    scale_label: str = "",
    use_kv_cache: bool = True,
) -> SteeringResult:
    """Add coef * scale * W_dec[feature] at the hook, every position, on both models; compare greedy continuations.

    `scale` (e.g. the feature's max activation on the base model, from the run) multiplies the
    coefficient; `scale_label` says what it is. Without it, the raw decoder row is used.
    """
    import torch

    t0 = time.perf_counter()
    prompt = _as_prompt(pair, prompt)
    try:
        coef = float(coef)
    except (TypeError, ValueError):
        raise ProbeError(f"The steering coefficient must be a number, got {coef!r}.") from None
    if not math.isfinite(coef):
        raise ProbeError("The steering coefficient must be a finite number.")
    if scale is None:
        scale, scale_label = 1.0, ""
    else:
        scale = float(scale)
        if not math.isfinite(scale):
            raise ProbeError(f"The steering scale must be a finite number, got {scale!r}.")
    if isinstance(n_new_tokens, bool) or not isinstance(n_new_tokens, (int, np.integer)) or not 1 <= int(n_new_tokens) <= MAX_NEW_TOKENS:
        raise ProbeError(f"The number of new tokens must be a whole number from 1 to {MAX_NEW_TOKENS}, got {n_new_tokens!r}.")
    n_new_tokens = int(n_new_tokens)
    direction = steering_vector(pair, sae, feature_id)
    fid = check_feature_id(feature_id, int(pair.saes[sae].cfg.d_sae))
    vec = coef * scale * direction
    vectors = torch.stack([torch.zeros_like(vec), vec])
    tok = _tokenizer(pair)
    bos = _bos_id(tok)
    rows = []
    slid_any = False
    for m in MODELS:
        model = getattr(pair, m)
        (plain, steered), slid = greedy_continuation(model, prompt.token_ids, n_new_tokens, pair.hook, vectors, bos, use_kv_cache)
        slid_any |= slid
        diff = next((i for i, (a, b) in enumerate(zip(plain, steered)) if a != b), None)
        rows.append(
            {
                "model": m,
                "unsteered_ids": plain,
                "steered_ids": steered,
                "unsteered_text": decode_text(pair, plain),
                "steered_text": decode_text(pair, steered),
                "first_difference": diff,
                "changed": diff is not None,
            }
        )
    notices = []
    if slid_any:
        notices.append(f"Prompt plus continuation exceed the {prompt.n_ctx}-token context; each step saw BOS and the latest {prompt.n_ctx - 1} tokens.")
    return SteeringResult(
        prompt=prompt,
        sae=sae,
        feature_id=fid,
        coef=coef,
        scale=scale,
        scale_label=scale_label,
        vector_norm=float(vec.norm()),
        n_new_tokens=n_new_tokens,
        continuations=pd.DataFrame(rows),
        context_slid=slid_any,
        seconds=time.perf_counter() - t0,
        notices=tuple(notices),
    )
