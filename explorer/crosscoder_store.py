"""Read-only queries over a run's crosscoder tables (issue 16; explorer/schema.py CROSSCODER*).

Pure functions of a validated run directory (explorer.rundir.open_run). The latents table is read
once per run into memory (its numeric columns; `act_hist` stays on disk): bands, histograms and
pages are numpy over it. Examples are read by row-group pruning on feature_id (the file is sorted
by it), their token ids taken from tokens.parquet, and each model's line is f_j x ||d_j^m||.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from explorer import schema
from explorer.crosscoder import DEFAULT_BANDS

LATENTS_FILE = "crosscoder.parquet"
EXAMPLES_FILE = "crosscoder_examples.parquet"
LINKS_FILE = "crosscoder_links.parquet"
METRICS_FILE = "crosscoder_metrics.parquet"
BANDS = ("base_only", "shared", "finetune_only")
BAND_LABELS = {"base_only": "base-only", "shared": "shared", "finetune_only": "finetune-only"}
LATENT_COLUMNS = tuple(n for n in schema.CROSSCODER.names if n != "act_hist")
SORTS = ("density", "relative_norm", "nu_error", "nu_recon", "max_act", "dec_cos", "feature_id")


@dataclass(frozen=True)
class Bands:
    """Relative-norm bands: base-only <= base_only_max, shared in [shared_min, shared_max],
    finetune-only >= finetune_only_min."""

    base_only_max: float
    shared_min: float
    shared_max: float
    finetune_only_min: float

    @classmethod
    def from_config(cls, cfg: dict | None) -> "Bands":
        """From a run config's [crosscoder] section (its defaults where a key is absent)."""
        cfg = cfg or {}
        return cls(*(float(cfg.get(k, DEFAULT_BANDS[k])) for k in ("base_only_max", "shared_min", "shared_max", "finetune_only_min")))

    def valid(self) -> bool:
        return 0 <= self.base_only_max < self.shared_min <= self.shared_max < self.finetune_only_min <= 1

    def mask(self, rel: np.ndarray, band: str) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            if band == "base_only":
                return rel <= self.base_only_max
            if band == "finetune_only":
                return rel >= self.finetune_only_min
            if band == "shared":
                return (rel >= self.shared_min) & (rel <= self.shared_max)
        raise ValueError(f"unknown band {band!r}")


def has_crosscoder(run_dir: Path | str, manifest: dict | None = None) -> bool:
    names = set((manifest or {}).get("files", {})) if manifest is not None else {p.name for p in Path(run_dir).iterdir()}
    return schema.CROSSCODER_TABLES <= names


def latents(run_dir: Path | str) -> pd.DataFrame:
    """Every latent's row (without act_hist), by feature_id."""
    return pq.read_table(Path(run_dir) / LATENTS_FILE, columns=list(LATENT_COLUMNS)).to_pandas()


def latent(run_dir: Path | str, latent_id: int) -> dict[str, Any] | None:
    t = pq.read_table(Path(run_dir) / LATENTS_FILE, filters=[("feature_id", "=", int(latent_id))])
    rows = t.to_pylist()
    return rows[0] if rows else None


def metrics(run_dir: Path | str) -> pd.DataFrame:
    return pq.read_table(Path(run_dir) / METRICS_FILE).to_pandas().sort_values(["model", "outliers"]).reset_index(drop=True)


def alive(df: pd.DataFrame) -> np.ndarray:
    return df["density"].to_numpy(dtype=float) > 0


def band_counts(df: pd.DataFrame, bands: Bands) -> dict[str, int]:
    """Alive latents per band (dead latents have no activation to interpret)."""
    rel, live = df["relative_norm"].to_numpy(dtype=float), alive(df)
    out = {b: int((bands.mask(rel, b) & live).sum()) for b in BANDS}
    out["alive"], out["dead"] = int(live.sum()), int((~live).sum())
    out["no_norm"] = int((np.isnan(rel) & live).sum())
    return out


def relative_norm_histogram(df: pd.DataFrame, n_bins: int = 50) -> pd.DataFrame:
    """Alive latents binned by relative norm on [0, 1] (attrs: n, n_nan)."""
    rel = df["relative_norm"].to_numpy(dtype=float)[alive(df)]
    finite = rel[np.isfinite(rel)]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts, _ = np.histogram(finite, bins=edges)
    out = pd.DataFrame({"bin_left": edges[:-1], "bin_right": edges[1:], "count": counts})
    out.attrs.update(n=int(len(finite)), n_nan=int(len(rel) - len(finite)))
    return out


def band_page(df: pd.DataFrame, band: str, bands: Bands, sort_by: str = "density", descending: bool = True, limit: int = 10, offset: int = 0) -> tuple[pd.DataFrame, int]:
    """Alive latents of one band, sorted (NaN last), paged; and how many there are."""
    if sort_by not in SORTS:
        raise ValueError(f"sort_by must be one of {SORTS}")
    sel = df[bands.mask(df["relative_norm"].to_numpy(dtype=float), band) & alive(df)]
    sel = sel.sort_values(sort_by, ascending=not descending, na_position="last", kind="stable")
    return sel.iloc[offset : offset + limit].reset_index(drop=True), len(sel)


def scatter_points(df: pd.DataFrame, bands: Bands, max_shared: int = 500, seed: int = 0) -> pd.DataFrame:
    """Latent Scaling points: the alive finetune-only latents (all), and a sample of shared ones
    for reference (column `band`); rows whose two ratios are not both finite are left out (attrs:
    n_finetune_only, n_without_ratio)."""
    rel, live = df["relative_norm"].to_numpy(dtype=float), alive(df)
    ft = df[bands.mask(rel, "finetune_only") & live].assign(band="finetune_only")
    sh = df[bands.mask(rel, "shared") & live]
    if len(sh) > max_shared:
        sh = sh.sample(max_shared, random_state=seed)
    pts = pd.concat([sh.assign(band="shared"), ft])
    ok = np.isfinite(pts["nu_error"].to_numpy(dtype=float)) & np.isfinite(pts["nu_recon"].to_numpy(dtype=float))
    out = pts[ok].reset_index(drop=True)
    out.attrs.update(n_finetune_only=int(len(ft)), n_without_ratio=int((~ok[len(sh):]).sum()))
    return out


_TOKENS: dict[tuple[str, int, int], np.ndarray] = {}


def tokens_array(run_dir: Path | str) -> np.ndarray:
    """tokens.parquet's token ids as [n_sequences, context] int32 (kept per file version)."""
    path = Path(run_dir) / "tokens.parquet"
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    arr = _TOKENS.get(key)
    if arr is None:
        col = pq.read_table(path, columns=["token_ids"]).column("token_ids").combine_chunks()
        n = len(col)
        arr = col.values.to_numpy(zero_copy_only=False).astype(np.int32).reshape(n, -1) if n else np.zeros((0, 0), np.int32)
        if len(_TOKENS) >= 8:
            _TOKENS.pop(next(iter(_TOKENS)))
        _TOKENS[key] = arr
    return arr


def latent_examples(run_dir: Path | str, ids: Sequence[int], kind: str | None = None, rank: int | None = None) -> pd.DataFrame:
    """Examples of the latents `ids` (optionally one kind / rank), with token_ids and each model's
    line acts_base / acts_finetuned = f_j x ||d_j^m||; sorted by (feature_id, kind, bin desc, rank)."""
    ids = sorted({int(i) for i in ids})
    cols = [f.name for f in schema.CROSSCODER_EXAMPLES]
    if not ids:
        return pd.DataFrame(columns=cols + ["token_ids", "acts_base", "acts_finetuned"])
    filters = [("feature_id", "in", ids)]
    if kind is not None:
        filters.append(("kind", "=", kind))
    if rank is not None:
        filters.append(("rank", "=", int(rank)))
    t = pq.read_table(Path(run_dir) / EXAMPLES_FILE, filters=filters)
    t = t.sort_by([("feature_id", "ascending"), ("kind", "descending"), ("bin", "descending"), ("rank", "ascending")])
    df = t.to_pandas()
    norms = pq.read_table(Path(run_dir) / LATENTS_FILE, columns=["feature_id", "dec_norm_base", "dec_norm_finetuned"],
                          filters=[("feature_id", "in", ids)]).to_pandas().set_index("feature_id")
    toks = tokens_array(run_dir)
    token_ids, base, fin = [], [], []
    for r in df.itertuples(index=False):
        acts = np.asarray(r.acts, dtype=np.float32)
        start = int(r.window_start)
        token_ids.append(toks[int(r.seq_id), start : start + len(acts)].tolist())
        base.append((acts * float(norms.at[r.feature_id, "dec_norm_base"])).tolist())
        fin.append((acts * float(norms.at[r.feature_id, "dec_norm_finetuned"])).tolist())
    return df.assign(token_ids=token_ids, acts_base=base, acts_finetuned=fin)


def feature_links(run_dir: Path | str, sae: str, feature_id: int) -> pd.DataFrame:
    """The crosscoder latents nearest to one SAE feature (by decoder cosine), with their relative norm and density."""
    t = pq.read_table(Path(run_dir) / LINKS_FILE, filters=[("sae", "=", sae), ("feature_id", "=", int(feature_id))]).sort_by("rank")
    df = t.to_pandas()
    if df.empty:
        return df.assign(relative_norm=pd.Series(dtype=float), density=pd.Series(dtype=float))
    info = pq.read_table(Path(run_dir) / LATENTS_FILE, columns=["feature_id", "relative_norm", "density"],
                         filters=[("feature_id", "in", [int(x) for x in df["latent_id"]])]).to_pandas()
    info = info.rename(columns={"feature_id": "latent_id"})
    return df.merge(info, on="latent_id", how="left")


class LinksIndex:
    """crosscoder_links.parquet in memory (one small table per run: a few rows per SAE feature),
    with each latent's relative norm and density: `links(sae, feature_id)` answers what
    `feature_links` answers without two filtered Parquet reads per feature page."""

    def __init__(self, run_dir: Path | str):
        links = pq.read_table(Path(run_dir) / LINKS_FILE).to_pandas()
        info = pq.read_table(Path(run_dir) / LATENTS_FILE, columns=["feature_id", "relative_norm", "density"]).to_pandas()
        df = links.merge(info.rename(columns={"feature_id": "latent_id"}), on="latent_id", how="left")
        df = df.sort_values(["sae", "feature_id", "rank"], kind="stable").reset_index(drop=True)
        self.columns = list(df.columns)
        self._empty = df.iloc[0:0]
        self._by = {key: g.reset_index(drop=True) for key, g in df.groupby(["sae", "feature_id"], sort=False)}

    def links(self, sae: str, feature_id: int) -> pd.DataFrame:
        g = self._by.get((sae, int(feature_id)))
        return (self._empty if g is None else g).copy()
