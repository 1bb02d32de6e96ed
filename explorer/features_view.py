"""A view of the Features page (SAE, source, filters, search, sort) as one value, read from the
page's URL query: the app's links and the command line's exports name a view the same way.

    sae-transfer export features --run demo --view 'sae=base_sae&class=died&sort=density_base&desc=1' --out died.parquet

`PARAMS` names every query parameter of the view with its codec (explorer/params.py) and its
default; the Features page binds its widgets to exactly these (pages/2_features.py), and
`parse_query` reads a query string (or a whole copied link) into a `FeaturesView`, refusing an
unknown parameter or an unusable value with one message that lists them all. `export` writes the
view's rows (every matching feature, in the view's order, the table's columns) as formula-safe
CSV (store.csv_bytes) or Parquet, atomically.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import parse_qs, urlsplit

from explorer import params as P
from explorer import schema
from explorer.errors import ExplorerError
from explorer.store import MAX_SEARCH_CHARS, SEARCH_MODES

DENSITY_RANGE = (-10.0, 0.0)  # log10(density + 1e-10)
SIMILARITY_RANGE = (-1.0, 1.0)
SORT_LABELS = {  # the columns a view sorts by, with the Features page's labels
    "feature_id": "feature id",
    "density_base": "density on base",
    "density_finetuned": "density on finetuned",
    "max_act_base": "max activation on base",
    "max_act_finetuned": "max activation on finetuned",
    "act_similarity": "activation similarity",
    "logit_similarity": "logit similarity",
    "act_error": "activation error",
    "match_score": "best-match score",
    "q_value": "q-value of the density change",
    "log_density_ratio": "log density ratio (finetuned / base)",
    "delta_mean_active_act": "Δ mean activation when firing",
    "logit_effect_max_abs": "logit effect (max |Δ logit|)",
    "kl_corr": "corr. of |Δf| with KL",
}
SORT_COLUMNS = tuple(SORT_LABELS)
SEARCH_LABELS = {"substring": "substring", "exact": "exact token", "regex": "regular expression (RE2)"}
FORMATS = ("csv", "parquet")

# query parameter -> (codec, default); the page's own parameters (page number, rows per page) are not part of a view
PARAMS: dict[str, tuple[P.Codec, Any]] = {
    "sort": (P.choice(SORT_COLUMNS), "feature_id"),
    "desc": (P.flag(), False),
    "status_base": (P.choices(schema.STATUSES), ()),
    "status_finetuned": (P.choices(schema.STATUSES), ()),
    "class": (P.choices(schema.CROSS_CLASSES), ()),
    "change": (P.choices(schema.CHANGE_CLASSES), ()),
    "density_on": (P.choice(schema.MODELS), "base"),
    "density": (P.span(*DENSITY_RANGE), DENSITY_RANGE),
    "similarity": (P.span(*SIMILARITY_RANGE), SIMILARITY_RANGE),
    "nan_similarity": (P.flag(), True),
    "q": (P.text(MAX_SEARCH_CHARS), ""),
    "mode": (P.choice(SEARCH_MODES), "substring"),  # SEARCH_LABELS' keys
    "contexts": (P.flag(), False),
    "both_dead": (P.flag(), False),
}
APP_PARAMS = ("run", "sae", "source", "page", "rows")  # named in the app's links; run, page and rows do not change the rows


class ViewError(ExplorerError):
    """A features view that cannot be used (unknown parameter, unusable value, unknown SAE or source)."""


def feature_filter(values: Mapping[str, Any]):
    """store.FeatureFilter from the view's values (PARAMS' names; a missing one is its default).
    A range at its widget's full extent is no bound."""
    from explorer.store import FeatureFilter

    v = {name: values.get(name, default) for name, (_, default) in PARAMS.items()}
    (d_lo, d_hi), (s_lo, s_hi) = v["density"], v["similarity"]
    return FeatureFilter(
        status_base=tuple(v["status_base"]),
        status_finetuned=tuple(v["status_finetuned"]),
        cross_class=tuple(v["class"]),
        change_class=tuple(v["change"]),
        density_model=v["density_on"],
        log_density_min=None if d_lo <= DENSITY_RANGE[0] else float(d_lo),
        log_density_max=None if d_hi >= DENSITY_RANGE[1] else float(d_hi),
        similarity_min=None if s_lo <= SIMILARITY_RANGE[0] else float(s_lo),
        similarity_max=None if s_hi >= SIMILARITY_RANGE[1] else float(s_hi),
        include_nan_similarity=bool(v["nan_similarity"]),
        search=v["q"] or "",
        search_mode=v["mode"],
        search_contexts=bool(v["contexts"]),
        exclude_both_dead=not v["both_dead"],
    )


@dataclass(frozen=True)
class FeaturesView:
    sae: str = "base_sae"
    source: str | None = None  # None: pooled over the run's sources
    values: dict[str, Any] = field(default_factory=dict)  # PARAMS' names -> parsed values (defaults left out)

    @property
    def filter(self):
        return feature_filter(self.values)

    @property
    def sort_by(self) -> str:
        return self.values.get("sort", PARAMS["sort"][1])

    @property
    def descending(self) -> bool:
        return bool(self.values.get("desc", PARAMS["desc"][1]))

    def query(self) -> str:
        """The view as the Features page's query string (defaults left out)."""
        from urllib.parse import urlencode

        items = {"sae": self.sae, **({"source": self.source} if self.source is not None else {})}
        items.update({k: PARAMS[k][0].dump(v) for k, v in self.values.items()})
        return urlencode(items)


def _query_items(query: str | Mapping[str, Any]) -> dict[str, str]:
    if isinstance(query, Mapping):
        return {str(k): str(v[0] if isinstance(v, (list, tuple)) else v) for k, v in query.items()}
    text = query.strip()
    if "?" in text or text.startswith(("http://", "https://")):  # a whole copied link
        text = urlsplit(text).query
    parsed = parse_qs(text.lstrip("?"), keep_blank_values=True)
    return {k: v[0] for k, v in parsed.items()}  # a parameter given twice keeps its first value, as in the app


def parse_query(query: str | Mapping[str, Any], saes: list[str], sources: list[str]) -> FeaturesView:
    """The view named by a Features-page query string or link (`saes`, `sources`: the run's).
    Raises ViewError listing every unknown parameter and unusable value."""
    items = _query_items(query)
    problems, values = [], {}
    for name, raw in items.items():
        if name in APP_PARAMS:
            continue
        if name not in PARAMS:
            problems.append(f"unknown parameter {P.clip(name)} (a features view takes {', '.join(['sae', 'source', *PARAMS])})")
            continue
        if raw == "":
            continue
        codec, default = PARAMS[name]
        try:
            value = codec.parse(raw)
        except ValueError as exc:
            problems.append(f"{name}={P.clip(raw)}: {exc}")
            continue
        if codec.norm(value) != codec.norm(default):
            values[name] = codec.norm(value)
    sae = items.get("sae") or "base_sae"
    if sae not in saes:
        problems.append(f"sae={P.clip(sae)}: this run's SAEs are {', '.join(saes)}")
    source = items.get("source") or None
    if source is not None and source not in sources:
        problems.append(f"source={P.clip(source)}: this run's sources are {', '.join(sources) or '(none labelled)'}")
    if problems:
        raise ViewError("The features view cannot be used: " + "; ".join(problems) + ".")
    return FeaturesView(sae, source, values)


def table(run_dir: Path | str, view: FeaturesView):
    """(pyarrow table of every matching feature in the view's order, the table columns; the store's FeatureTable)."""
    from explorer import store

    ft = store.FeatureTable.open(run_dir, view.sae, view.source)
    try:
        return ft.matching(view.filter, view.sort_by, view.descending)
    except store.SearchError as exc:
        raise ViewError(f"The features view cannot be used: {exc}") from None


def to_bytes(tbl, fmt: str) -> bytes:
    """CSV (formula-safe, store.csv_bytes) or Parquet bytes of a view's rows."""
    import pyarrow.parquet as pq

    from explorer.store import csv_bytes

    if fmt == "csv":
        return csv_bytes(tbl.to_pandas())
    if fmt == "parquet":
        buf = io.BytesIO()
        pq.write_table(tbl, buf, compression="zstd")
        return buf.getvalue()
    raise ViewError(f"format must be one of {', '.join(FORMATS)}, got {P.clip(fmt)}.")


def export(run_dir: Path | str, view: FeaturesView, fmt: str, out: Path | str) -> int:
    """Write the view's rows to `out` (atomically: a temporary file renamed); returns the number of rows."""
    import os
    import tempfile

    tbl = table(run_dir, view)
    data = to_bytes(tbl, fmt)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tbl.num_rows
