"""B4: store and feature-page latency at scale, and on-disk bytes per feature per model.

    python benchmarks/b4_store_latency.py                         # synthetic 16k, 131k and 1M features
    python benchmarks/b4_store_latency.py --sizes 16384 --n 200   # one size
    python benchmarks/b4_store_latency.py --real data/runs/demo   # also a real run (latency + bytes)
    python benchmarks/b4_store_latency.py --smoke                 # 300 features, 20 samples, into a temp dir

Runs: synthetic runs in the real schema (explorer/synthetic.py) are generated under
benchmarks/_work/b4/synth-<n>/ (re-used when one with the same generation settings is there;
the generation time is recorded). Up to --full-examples-max features they carry the realistic
example set (20 top + 10 quantile bins x 5 per model, windows of 17 tokens); above it (the 1M
run: the full set would be ~26 GB and hours of generation on this machine) --large-n-top top
examples and no quantile examples, which keeps the per-feature read path identical (one
feature's examples are read from the one or two row groups that hold it), but means its
bytes-per-feature is not representative and is not reported against the goal. The sizes in
--one-sae-sizes (default: 131k) carry the base SAE only, to halve their generation time.

Measured, the way the app runs them (one DuckDB connection per run, a fresh `.cursor()` per
query, the examples row-group index built once per run, no st.cache_data):
  * feature page: everything pages/3_feature.py fetches for one feature -- store.feature,
    store.feature_examples (both models, top and quantile), the token strings of every example
    window and of the logit lists, store.features_by_ids of its nearest neighbours,
    store.candidate_matches -- for --n random feature ids (seeded);
  * features table: what pages/2_features.py fetches for one filtered, sorted page through
    webapp/data.py -- store.FeatureTable's count + page (50 rows at a random offset), the filter
    treated as new each time (its mask is computed, then re-used by the page; cached masks are
    cleared before every sample), its sort orders built once per run (FeatureTable.warm, which the
    app runs in a background thread after loading; timed apart) -- for --n random
    (filter, sort column, direction) draws from a fixed set of realistic filters; and, side by
    side, the same page by DuckDB over the parquet file (store.count_features +
    store.features_page; the app's path before FeatureTable);
  * once per run: the examples index build, the FeatureTable load and warm-up, the first (cold)
    feature page.
p50/p95 over the samples, after one untimed warm-up query: wall time (the goal), and the
process CPU time of the same calls (all DuckDB/Arrow threads; far less sensitive to the other
work on a shared machine). Sizes are measured in one
invocation, interleaved sample by sample, so the machine's load hits them alike.

Results: a table on stdout and `benchmarks/results/b4.json` (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `explorer` importable
    sys.path.insert(0, str(REPO))

from benchmarks._common import machine, write_result  # noqa: E402
from explorer import schema, store  # noqa: E402
from explorer.rundir import open_run  # noqa: E402
from explorer.synthetic import make_run  # noqa: E402

WORK = REPO / "benchmarks" / "_work" / "b4"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "b4.json"
GOALS_P95_MS = {16384: 50.0, 1048576: 200.0}
GOAL_BYTES_PER_FEATURE_PER_MODEL = 10_000

FILTERS = (
    ("none", store.FeatureFilter()),
    ("alive on both", store.FeatureFilter(cross_class=("both_alive",))),
    ("regular on base, density 1e-4..1e-2", store.FeatureFilter(status_base=("regular",), log_density_min=-4.0, log_density_max=-2.0)),
    ("similarity < 0.3, no NaN", store.FeatureFilter(similarity_max=0.3, include_nan_similarity=False)),
    ("died", store.FeatureFilter(cross_class=("died",), density_model="finetuned")),
    ("search 'def'", store.FeatureFilter(search="def")),
)
SORTS = ("feature_id", "density_base", "act_similarity", "max_act_finetuned", "act_error", "match_score")


def gen_settings(n: int, full_max: int, large_n_top: int, one_sae: bool = False) -> dict:
    full = n <= full_max
    return {"n_features": n, "two_saes": not one_sae, "n_top": 20 if full else large_n_top, "n_quantile_bins": 10 if full else 0, "n_per_quantile_bin": 5, "seed": 0, "realistic_examples": full,
            "features_row_group_size": schema.FEATURES_ROW_GROUP_SIZE}


def rewrite_features(out: Path) -> None:
    """Re-write features.parquet with the schema's current row-group size (and its manifest entry)."""
    import pyarrow.parquet as pq

    from explorer import rundir

    table = pq.read_table(out / "features.parquet")
    m = json.loads((out / "manifest.json").read_text())
    m["files"]["features.parquet"] = rundir.write_table(out, "features.parquet", table, row_group_size=schema.FEATURES_ROW_GROUP_SIZE)
    m.pop("schema_version", None)
    rundir.write_manifest(out, m)


def ensure_run(work: Path, settings: dict) -> tuple[Path, float | None]:
    """The synthetic run for `settings` (generated unless one with the same settings exists)."""
    out = work / f"synth-{settings['n_features']}"
    stamp = work / f"synth-{settings['n_features']}.gen.json"
    if (out / "manifest.json").exists() and stamp.exists():
        old = json.loads(stamp.read_text())
        if old.get("settings") == settings:
            return out, old.get("seconds")
        if {k: v for k, v in old.get("settings", {}).items() if k != "features_row_group_size"} == {k: v for k, v in settings.items() if k != "features_row_group_size"}:
            rewrite_features(out)  # the same run, with features.parquet's row groups re-cut
            stamp.write_text(json.dumps({"settings": settings, "seconds": old.get("seconds")}) + "\n")
            return out, old.get("seconds")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    t0 = time.perf_counter()
    make_run(out, n_features=settings["n_features"], two_saes=settings["two_saes"], n_top=settings["n_top"],
             n_quantile_bins=settings["n_quantile_bins"], n_per_quantile_bin=settings["n_per_quantile_bin"], seed=settings["seed"])
    secs = time.perf_counter() - t0
    stamp.write_text(json.dumps({"settings": settings, "seconds": secs}) + "\n")
    return out, secs


def disk_bytes(run_dir: Path) -> dict:
    """Bytes on disk per table and per feature per model (all features of all SAEs; and alive ones)."""
    m = json.loads((run_dir / "manifest.json").read_text())
    files = {p.name: p.stat().st_size for p in sorted(run_dir.iterdir()) if p.is_file()}
    total = sum(files.values())
    n_feat = sum(int(v) for v in m["d_sae"].values())
    import pyarrow.parquet as pq

    t = pq.read_table(run_dir / "features.parquet", columns=["density_base", "density_finetuned"])
    alive_pairs = sum(int((t.column(f"density_{mm}").to_numpy(zero_copy_only=False) > 0).sum()) for mm in schema.MODELS)
    per = total / (n_feat * len(schema.MODELS))
    return {"total_bytes": total, "files": files, "n_features_all_saes": n_feat, "bytes_per_feature_per_model": per,
            "bytes_per_alive_feature_model": total / max(alive_pairs, 1), "alive_feature_model_pairs": alive_pairs,
            "goal_met": per <= GOAL_BYTES_PER_FEATURE_PER_MODEL}


class Bench:
    """One run opened the way the app opens it."""

    def __init__(self, run_dir: Path, seed: int):
        self.dir = Path(run_dir)
        self.manifest = open_run(self.dir)  # validates, like the app's run picker
        self.con = store.connect()
        t0 = time.perf_counter()
        self.index = store.ExamplesIndex.open(self.dir)
        self.index_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.table = store.FeatureTable.open(self.dir, "base_sae")
        self.table_open_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.table.warm()  # the app does this in a background thread after loading
        self.table_warm_seconds = time.perf_counter() - t0
        self.vocab = store.vocab(self.dir)
        self.d_sae = int(json.loads((self.dir / "manifest.json").read_text())["d_sae"]["base_sae"])
        self.rng = np.random.default_rng(seed)

    def _tokens(self, ids) -> list[str]:
        v = self.vocab
        return [v[i] if 0 <= i < len(v) else f"<id {i}>" for i in (int(x) for x in ids)]

    def feature_page(self, fid: int, sae: str = "base_sae") -> int:
        row = store.feature(self.con.cursor(), self.dir, sae, fid)
        if row is None:
            raise SystemExit(f"feature {fid} missing from {self.dir}")
        ex = store.feature_examples(self.index, sae, fid)
        n_tok = 0
        for ids in ex["token_ids"]:
            n_tok += len(self._tokens(ids))
        for m in schema.MODELS:
            for sign in ("pos", "neg"):
                n_tok += len(self._tokens(row.get(f"logit_{sign}_ids_{m}") or []))
        nn = list(row.get("nn_feature_ids") or [])
        if nn:
            store.features_by_ids(self.con.cursor(), self.dir, sae, tuple(int(x) for x in nn), ("feature_id", "density_base", "density_finetuned", "top_tokens"))
        store.candidate_matches(self.con.cursor(), self.dir, sae, fid, 10)
        return len(ex)

    def table_page(self, flt, sort_by: str, descending: bool, offset_draw: float = 0.0) -> int:
        """The app's path (store.FeatureTable, as webapp/data.py holds it): a changed filter, so
        its mask is computed (count) and re-used (page); a sort order is built on its first use."""
        with self.table._lock:
            self.table._masks.clear()
        n = self.table.count(flt)
        offset = int(offset_draw * (n // 50)) * 50 if n else 0
        return len(self.table.page(flt, sort_by, descending, 50, offset))

    def table_page_duckdb(self, flt, sort_by: str, descending: bool, offset_draw: float = 0.0, sae: str = "base_sae") -> int:
        """The same page by DuckDB over the parquet file (store.count_features + store.features_page)."""
        n = store.count_features(self.con.cursor(), self.dir, sae, flt)
        offset = int(offset_draw * (n // 50)) * 50 if n else 0
        page = store.features_page(self.con.cursor(), self.dir, sae, flt, sort_by, descending, 50, offset)
        return len(page)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def measure(benches: dict[str, Bench], n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    kinds = ("feature_page", "table_page", "table_page_duckdb")
    times = {k: {w: [] for w in kinds} for k in benches}
    cpu = {k: {w: [] for w in kinds} for k in benches}
    rows = {k: [] for k in benches}
    loads = []
    # warm-up (untimed) and the cold first feature page
    cold = {}
    for k, b in benches.items():
        t0 = time.perf_counter()
        b.feature_page(0)
        cold[k] = (time.perf_counter() - t0) * 1000
        b.table_page(FILTERS[0][1], "feature_id", False, 0.0)
        b.table_page_duckdb(FILTERS[0][1], "feature_id", False, 0.0)
    for i in range(n):
        if i % 20 == 0:
            loads.append(os.getloadavg()[0])
        for k, b in benches.items():
            fid = int(rng.integers(0, b.d_sae))
            t0, c0 = time.perf_counter(), time.process_time()
            rows[k].append(b.feature_page(fid))
            times[k]["feature_page"].append((time.perf_counter() - t0) * 1000)
            cpu[k]["feature_page"].append((time.process_time() - c0) * 1000)
            name, flt = FILTERS[int(rng.integers(0, len(FILTERS)))]
            sort_by, desc, draw = SORTS[int(rng.integers(0, len(SORTS)))], bool(rng.integers(0, 2)), float(rng.random())
            for what in ("table_page", "table_page_duckdb"):
                t0, c0 = time.perf_counter(), time.process_time()
                getattr(b, what)(flt, sort_by, desc, draw)
                times[k][what].append((time.perf_counter() - t0) * 1000)
                cpu[k][what].append((time.process_time() - c0) * 1000)
    out = {}
    for k, b in benches.items():
        out[k] = {"run_dir": str(b.dir), "d_sae": b.d_sae, "examples_index_build_ms": b.index_seconds * 1000, "index_row_groups": len(b.index.fid_min),
                  "feature_table_open_ms": b.table_open_seconds * 1000, "feature_table_warm_ms": b.table_warm_seconds * 1000, "feature_table_mbytes": b.table.table.nbytes / 1e6,
                  "cold_first_feature_page_ms": cold[k], "mean_example_rows_per_feature": float(np.mean(rows[k]))}
        for what in kinds:
            xs = times[k][what]
            cs = cpu[k][what]
            out[k][what] = {"n": len(xs), "p50_ms": pct(xs, 50), "p95_ms": pct(xs, 95), "max_ms": max(xs), "mean_ms": statistics.fmean(xs),
                            "cpu_p50_ms": pct(cs, 50), "cpu_p95_ms": pct(cs, 95)}
    return {"per_run": out, "loadavg_1min_during": loads}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[16384, 131072, 1048576])
    p.add_argument("--real", type=Path, nargs="*", default=[], help="real run directories to measure too")
    p.add_argument("--n", type=int, default=200, help="samples per query kind and run")
    p.add_argument("--full-examples-max", type=int, default=131072)
    p.add_argument("--large-n-top", type=int, default=2)
    p.add_argument("--one-sae-sizes", type=int, nargs="*", default=[131072], help="sizes generated with the base SAE only (halves generation time)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--generate-only", action="store_true", help="generate (or re-use) the synthetic runs, measure nothing")
    p.add_argument("--smoke", action="store_true", help="300 features (and 600 with reduced examples), 20 samples, in a temp dir")
    a = p.parse_args(argv)
    cmdline = ("python benchmarks/b4_store_latency.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()

    tmp = None
    if a.smoke:
        tmp = tempfile.TemporaryDirectory(prefix="b4-smoke-")
        a.work, a.sizes, a.n, a.full_examples_max = Path(tmp.name), [300, 600], 20, 300
    a.work.mkdir(parents=True, exist_ok=True)
    load_start = list(os.getloadavg())
    runs, gens, settings = {}, {}, {}
    for n in a.sizes:
        s = gen_settings(n, a.full_examples_max, a.large_n_top, one_sae=n in a.one_sae_sizes)
        path, secs = ensure_run(a.work, s)
        runs[f"synthetic-{n}"], gens[f"synthetic-{n}"], settings[f"synthetic-{n}"] = path, secs, s
        print(f"synthetic {n}: {path} (generated in {secs:.0f} s)" if secs is not None else f"synthetic {n}: {path}", flush=True)
    if a.generate_only:
        return 0
    for r in a.real:
        runs[f"real-{r.name}"] = r
    benches = {k: Bench(v, a.seed) for k, v in runs.items()}
    res = measure(benches, a.n, a.seed)
    result = {
        "benchmark": "B4: store and feature-page latency at scale",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": cmdline,
        "machine": {**machine(), "loadavg_at_start": load_start, "loadavg_at_end": list(os.getloadavg())},
        "settings": {"n": a.n, "seed": a.seed, "filters": [f[0] for f in FILTERS], "sorts": list(SORTS), "page_rows": 50, "smoke": a.smoke},
        "loadavg_1min_during": res["loadavg_1min_during"],
        "runs": {},
    }
    print(f"{'run':<22} {'features':>9} {'page p50':>9} {'page p95':>9} {'(cpu p95)':>9} {'table p50':>10} {'table p95':>10} {'(cpu p95)':>9} {'duckdb p95':>10} {'B/feat/model':>13}  goal (wall p95)")
    for k, path in runs.items():
        r = res["per_run"][k]
        r["disk"] = disk_bytes(path)
        r["generation"] = {"settings": settings.get(k), "seconds": gens.get(k)}
        goal = None
        n = r["d_sae"]
        if not k.startswith("real") and n in GOALS_P95_MS:
            goal = {"p95_ms": GOALS_P95_MS[n], "met": r["feature_page"]["p95_ms"] <= GOALS_P95_MS[n] and r["table_page"]["p95_ms"] <= GOALS_P95_MS[n]}
        r["goal"] = goal
        bytes_repr = settings.get(k, {}).get("realistic_examples", True)
        r["disk"]["representative"] = bytes_repr
        result["runs"][k] = r
        fp, tp = r["feature_page"], r["table_page"]
        print(f"{k:<22} {n:>9} {fp['p50_ms']:>8.1f}m {fp['p95_ms']:>8.1f}m {fp['cpu_p95_ms']:>8.1f}m {tp['p50_ms']:>9.1f}m {tp['p95_ms']:>9.1f}m {tp['cpu_p95_ms']:>8.1f}m {r['table_page_duckdb']['p95_ms']:>9.1f}m "
              f"{r['disk']['bytes_per_feature_per_model']:>12.0f}{'' if bytes_repr else '*'}  {'' if goal is None else ('met' if goal['met'] else 'MISSED')}", flush=True)
    print(f"load average during: {res['loadavg_1min_during']}  (* reduced examples: bytes not representative)")
    if not a.smoke or a.out != DEFAULT_OUT:
        write_result(a.out, result)
        print(f"-> {a.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
