"""B7: how the precompute scales with the SAE width and the token count, against the bare limit.

    python benchmarks/b7_scaling.py                 # the wide pair (generated if missing), both sweeps, 1 thread
    python benchmarks/b7_scaling.py --widths 2048 16384 --tokens 16384 65536
    python benchmarks/b7_scaling.py --smoke         # the tiny wide pair, two tiny points (the test suite)

Two sweeps on one wide synthetic pair (benchmarks/wide_pair.py), the base SAE of a width on both
models (--both-saes: both SAEs and the two-SAE matching), configs/demo.toml's example settings:

    widths   d_sae in --widths at --fixed-tokens tokens
    tokens   n_tokens in --tokens at --tokens-width features

Every point runs three child processes with the same torch threads, interleaved (their order
alternates from point to point):

    ours    `python -m precompute run --config CFG ...`: wall and CPU seconds, peak RSS (ru_maxrss
            from os.wait4), and the manifest's stream / finalize timing (finalize's parts too);
    limit   the bare limit: the same tokens, batches and models, per batch and model a full
            forward with logits grabbing the hook activation, and per SAE the encode's
            pre-activation matmul plus its gate (addmm + compare: the least any encode does);
    floor   the CE floor: what the precompute must compute on the torch side to report every
            SAE's CE loss, with no accumulators (b2's `ce` loop: clean loss, per SAE encode +
            decode + spliced loss from the hook on, zero-ablated loss).

One more variant, on request only (`--_limit CFG --variants hook`; B1 quotes it as a bound):

    hook    the features floor: per batch and model a forward that stops at the hook's layer
            (no logits), and the limit's encode per SAE: the least any tool does that reports
            per-feature statistics on both models without the models' outputs (no KL, no CE).

The limit and floor children time at most --limit-tokens tokens (the first batches) and report
seconds per token; a per-token rate does not depend on the token count. Ratios are per point:
ours' stream seconds per token over the limit's (and the floor's), and ours' whole stream +
finalize over the limit. Results: a table on stdout and benchmarks/results/b7.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "_work" / "b7"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "b7.json"
if str(REPO) not in sys.path:  # run as a script: make the repository importable
    sys.path.insert(0, str(REPO))

from benchmarks._common import load_script, machine, run_child, write_result  # noqa: E402

B7_PAIR = dict(d_model=256, n_layers=4, d_vocab=32768, n_sequences=2048, context=128)


def _wide():
    return load_script("wide_pair")


# ----------------------------------------------------------------------------------------------
# The limit / floor child


def cast_prepared(prep, dtype: str) -> None:
    """Models and SAEs of a Prepared in `dtype` (float32: nothing to do). The CLI gains a --dtype
    with the own-models issue; until then the GPU check casts here, after loading."""
    import torch

    dt = getattr(torch, dtype)
    if dt == torch.float32:
        return
    for model in (prep.pair.base, prep.pair.finetuned):
        model.to(dt)
        model.cfg.dtype = dt
    for sae in prep.pair.saes.values():
        sae.to(dtype=dt)
    prep.__dict__.pop("codecs", None)  # built again for the cast SAEs


def limit_child(cfg_path: Path, threads: int, max_tokens: int, out: Path, device: str = "cpu", dtype: str = "float32", variants=("limit", "floor")) -> None:
    from precompute.__main__ import _keep_freed_memory

    _keep_freed_memory()
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from precompute.config import RunConfig
    from precompute.forward import runners as model_runners
    from precompute.prepare import prepare

    prep = prepare(RunConfig.from_toml(cfg_path), device)
    cast_prepared(prep, dtype)
    runners = model_runners(prep.pair, prep.cfg.hook)
    codecs = prep.codecs
    saes = prep.pair.saes
    n_batches = max(1, min(prep.n_batches, -(-max_tokens // (prep.cfg.sample.batch_size * prep.cfg.sample.context_size))))
    batches = [torch.from_numpy(prep.sample.tokens[prep.batch_seq_ids(b)].astype(np.int64)).to(device) for b in range(n_batches)]
    counted = [torch.from_numpy(~np.isin(t.cpu().numpy(), prep.special_ids)).to(device) for t in batches]
    hook = prep.cfg.hook
    gates = {s: (saes[s].threshold.clamp_min(0) if hasattr(saes[s], "threshold") else torch.zeros_like(saes[s].b_enc)) for s in saes}

    def grab_logits(model, tokens):
        store = {}

        def grab(act, hook):  # noqa: ARG001
            store["x"] = act
            return act

        logits = model.run_with_hooks(tokens, fwd_hooks=[(hook, grab)], return_type="logits")
        return logits, store["x"]

    def encode_gates(x) -> float:
        """Per SAE the encode's pre-activation matmul and its gate: the least any encode does."""
        xf, n = x.reshape(-1, x.shape[-1]), 0.0
        for s in saes:
            sae = saes[s]
            pre = torch.addmm(sae.b_enc, xf.to(sae.dtype) - sae.b_dec, sae.W_enc)
            n += float((pre > gates[s]).sum())
            del pre
        return n

    def loop(variant: str, n: int | None = None) -> float:
        sink = 0.0
        for bi, tokens in enumerate(batches[:n]):
            for m in ("base", "finetuned"):
                if variant == "hook":
                    sink += encode_gates(runners[m].acts(tokens))
                elif variant == "limit":
                    logits, x = grab_logits(runners[m].model, tokens)
                    sink += float(logits[0, 0, 0])
                    del logits
                    sink += encode_gates(x)
                else:
                    r = runners[m]
                    clean, x = r.clean(tokens)
                    sink += float(clean[0, 0]) + float(r.zero_loss(tokens, x)[0, 0])
                    for s in saes:
                        x_hat = codecs[s].encode_decode(x.reshape(-1, x.shape[-1]))[3].reshape(x.shape)
                        sink += float(r.loss_with(tokens, torch.where(counted[bi][..., None], x_hat, x))[0, 0])
        return sink

    res = {"n_tokens": int(sum(t.numel() for t in batches)), "n_batches": n_batches, "threads": torch.get_num_threads(), "device": device, "dtype": dtype}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        if device.startswith("cuda"):
            for v in variants:
                loop(v, 1)  # warm-up: kernels, allocator
        for variant in variants:
            sync()
            w0, c0 = time.perf_counter(), time.process_time()
            loop(variant)
            sync()
            res[variant] = {"wall_seconds": time.perf_counter() - w0, "cpu_seconds": time.process_time() - c0}
    out.write_text(json.dumps(res))


# ----------------------------------------------------------------------------------------------
# The parent


_child = run_child


def state_bytes_expected(d_sae: int, ex: dict, n_candidates: int, max_all_pairs: int, both_saes: bool) -> int:
    """The accumulator state's size for one or two SAEs of d_sae on both models (pass_state.PassState)."""
    per_pair = ex["n_top"] * (4 + 8) + ex["quantile_sample"] * (8 + 8 + 4) + 3 * 8 + 64 * 8
    if not both_saes:
        return 2 * d_sae * per_pair + d_sae * 16
    cross = d_sae * d_sae * 8 if d_sae <= max_all_pairs else 2 * d_sae * n_candidates * 8
    return 4 * d_sae * per_pair + 2 * d_sae * 16 + cross


def _ours(wide, pair: Path, d_sae: int, n_tokens: int, context: int, threads: int, work: Path, tag: str, both_saes: bool, ce_every: int) -> dict:
    """One CLI run of the point; `ce_every` > 1 computes the CE losses on one batch in N ([evals] ce_every)."""
    import shutil

    label = tag if ce_every == 1 else f"{tag}-ce{ce_every}"
    cfg = work / "configs" / f"{label}.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    run_id = f"b7-{label}"
    cfg.write_text(wide.config_text(pair, run_id, d_sae, n_tokens, context, both_saes=both_saes, extra=f"[evals]\nce_every = {ce_every}\n"))
    runs = work / "runs"
    cmd = [sys.executable, "-m", "precompute", "run", "--config", str(cfg), "--runs-dir", str(runs), "--overwrite", "--no-progress", "--threads", str(threads)]
    res = _child(cmd, work / "logs" / f"ours-{label}.log")
    man = json.loads((runs / run_id / "manifest.json").read_text())
    res.update(command=" ".join(cmd), ce_every=ce_every, timing=man["timing"], run_bytes=sum(p.stat().st_size for p in (runs / run_id).iterdir() if p.is_file()))
    shutil.rmtree(runs / run_id, ignore_errors=True)  # the runs of the largest points are gigabytes
    return res


def run_point(pair: Path, wide, d_sae: int, n_tokens: int, context: int, threads: int, limit_tokens: int, work: Path, tag: str, order: tuple[str, ...],
              both_saes: bool = False, ce_every: tuple[int, ...] = (1,)) -> dict:
    """The limit child and ours, in `order`; ours once per `ce_every` value (the first is `ours`,
    the others `ours_ce_every[N]`), all against the same limit."""
    cfg = work / "configs" / f"{tag}.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(wide.config_text(pair, f"b7-{tag}", d_sae, n_tokens, context, both_saes=both_saes))
    point: dict = {"d_sae": d_sae, "n_tokens": n_tokens, "order": list(order)}
    for side in order:
        if side == "ours":
            runs = {n: _ours(wide, pair, d_sae, n_tokens, context, threads, work, tag, both_saes, n) for n in ce_every}
            res = runs[ce_every[0]]
            if len(ce_every) > 1:
                point["ours_ce_every"] = {str(n): r for n, r in runs.items() if n != ce_every[0]}
        else:
            out = work / f"limit-{tag}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_limit", str(cfg), "--threads", str(threads), "--limit-tokens", str(limit_tokens), "--out", str(out)]
            res = _child(cmd, work / "logs" / f"limit-{tag}.log")
            res.update(json.loads(out.read_text()))
        point[side] = res
    o, lim = point["ours"], point["limit"]
    t = o["timing"]
    per_tok = lambda sec, n: sec / n  # noqa: E731
    point["per_token_us"] = {
        "limit": 1e6 * per_tok(lim["limit"]["wall_seconds"], lim["n_tokens"]),
        "floor": 1e6 * per_tok(lim["floor"]["wall_seconds"], lim["n_tokens"]),
        "ours_stream": 1e6 * per_tok(t["stream_seconds"], n_tokens),
        "ours_stream_plus_finalize": 1e6 * per_tok(t["stream_seconds"] + t["finalize_seconds"], n_tokens),
        "ours_whole_cli": 1e6 * per_tok(o["wall_seconds"], n_tokens),
    }
    pt = point["per_token_us"]
    for n, r in point.get("ours_ce_every", {}).items():  # the same limit, CE on one batch in n
        us = 1e6 * r["timing"]["stream_seconds"] / n_tokens
        r["per_token_us_stream"], r["stream_over_limit"] = us, us / pt["limit"]
    point["ratios"] = {
        "stream_over_limit": pt["ours_stream"] / pt["limit"],
        "stream_over_floor": pt["ours_stream"] / pt["floor"],
        "floor_over_limit": pt["floor"] / pt["limit"],
        "stream_plus_finalize_over_limit": pt["ours_stream_plus_finalize"] / pt["limit"],
    }
    return point


def _print_row(p: dict) -> None:
    pt, r, t = p["per_token_us"], p["ratios"], p["ours"]["timing"]
    fin = t.get("finalize_parts", {})
    weights = sum(v for k, v in fin.items() if k in ("weights", "matching", "nearest_neighbours", "logits"))
    print(f"{p['d_sae']:>8} {p['n_tokens']:>8} {pt['limit']:>9.1f} {pt['floor']:>9.1f} {pt['ours_stream']:>9.1f} {r['stream_over_limit']:>7.2f} {r['stream_over_floor']:>7.2f} "
          f"{t['finalize_seconds']:>8.1f} {weights:>8.1f} {r['stream_plus_finalize_over_limit']:>7.2f} {p['ours']['peak_rss_bytes'] / 2**20:>9.0f} {p['limit']['peak_rss_bytes'] / 2**20:>9.0f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", type=Path, default=None, help="a wide pair (default: benchmarks/_work/b7-pair, generated with B7_PAIR's shapes if missing)")
    p.add_argument("--d-model", type=int, default=B7_PAIR["d_model"], help="d_model of a pair generated here (default 256)")
    p.add_argument("--widths", type=int, nargs="*", default=[2048, 16384, 65536, 131072], help="the width sweep's d_sae values (none: no width sweep)")
    p.add_argument("--fixed-tokens", type=int, default=8192)
    p.add_argument("--tokens", type=int, nargs="*", default=[16384, 65536, 262144], help="the token sweep's token counts (none: no token sweep)")
    p.add_argument("--tokens-width", type=int, default=16384)
    p.add_argument("--limit-tokens", type=int, default=16384, help="tokens the limit/floor children time (default 16384)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ce-every", type=int, nargs="+", default=[1], help="ours once per value, against the same limit: [evals] ce_every (CE losses on one batch in N; default 1)")
    p.add_argument("--both-saes", action="store_true", help="both SAEs of each width and the two-SAE matching (default: the base SAE on both models)")
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="the tiny wide pair (built in --work), one width point and one token point")
    p.add_argument("--_limit", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--variants", nargs="+", choices=("limit", "floor", "hook"), default=["limit", "floor"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._limit is not None:
        limit_child(a._limit, a.threads, a.limit_tokens, a.out, variants=tuple(a.variants))
        return 0
    wide = _wide()
    cmdline = "python benchmarks/b7_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    work = a.work.resolve()
    if a.smoke:
        a.both_saes = True  # the smoke covers the two-SAE path too
        pair = a.pair or work / "tiny-pair"
        widths, fixed, tokens, tok_width, limit_tokens = [256], 8 * 16, [16 * 16], 512, 8 * 16
        if not (pair / "PAIR.json").exists():
            wide.generate(pair, wide.TINY)
    else:
        pair = a.pair or REPO / "benchmarks" / "_work" / "b7-pair"
        widths, fixed, tokens, tok_width, limit_tokens = a.widths, a.fixed_tokens, a.tokens, a.tokens_width, a.limit_tokens
        need = sorted(set(widths) | ({tok_width} if tokens else set()))  # the token sweep's width only when it runs
        if not (pair / "PAIR.json").exists():
            s = wide.PairSettings(**{**B7_PAIR, "d_model": a.d_model, "d_sae": tuple(need), "n_sequences": max(B7_PAIR["n_sequences"], -(-max(tokens, default=0) // B7_PAIR["context"]))})
            print(f"[b7] generating the wide pair in {pair} ...", flush=True)
            wide.generate(pair, s)
    info = json.loads((pair / "PAIR.json").read_text())
    context = info["settings"]["context"]
    have = {int(k) for k in info["saes"]}
    missing = sorted((set(widths) | ({tok_width} if tokens else set())) - have)
    if missing:
        raise SystemExit(f"{pair} has no SAEs of width {missing} (it has {sorted(have)}); generate them with benchmarks/wide_pair.py --d-sae ...")
    out_path = a.out or (work / "b7-smoke.json" if a.smoke else DEFAULT_OUT)
    result = {
        "benchmark": "B7: precompute scaling over d_sae and n_tokens against the bare limit",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": cmdline.strip(), "machine": machine(), "loadavg_at_start": list(os.getloadavg()),
        "git_rev": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "pair": {"path": str(pair), **info["settings"], "n_params_per_model": info.get("n_params_per_model"), "saes": info["saes"]},
        "threads": a.threads, "limit_tokens": limit_tokens, "smoke": a.smoke, "both_saes": a.both_saes, "ce_every": a.ce_every, "widths": [], "tokens": [],
    }
    print(f"{'d_sae':>8} {'tokens':>8} {'limit':>9} {'floor':>9} {'stream':>9} {'s/lim':>7} {'s/flr':>7} {'final s':>8} {'weights':>8} {'all/lim':>7} {'RSS MiB':>9} {'lim RSS':>9}")
    print("(us per token; s/lim = ours' stream over the limit; all/lim = stream + finalize over the limit)")
    k = 0
    for sweep, points in (("widths", [(d, fixed) for d in widths]), ("tokens", [(tok_width, n) for n in tokens])):
        for d_sae, n in points:
            order = ("limit", "ours") if k % 2 == 0 else ("ours", "limit")
            k += 1
            pt = run_point(pair, wide, d_sae, n, context, a.threads, limit_tokens, work, f"{sweep}-{d_sae}-{n}", order, a.both_saes, tuple(a.ce_every))
            pt["state_bytes_expected"] = state_bytes_expected(d_sae, {"n_top": 20, "quantile_sample": 150}, 10, 4096, a.both_saes)
            result[sweep].append(pt)
            _print_row(pt)
            result["loadavg_at_end"] = list(os.getloadavg())
            write_result(out_path, result, indent=2)  # after every point
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def report(paths: list[Path]) -> str:
    """RESULTS.md's B7 table from result files: per-token CPU microseconds (the machine is shared:
    CPU seconds, not wall), ratios, finalize's parts (wall seconds), peak RSS."""
    rows = ["| sweep | d_sae | tokens | limit µs/tok (CPU) | CE floor | ours stream | stream ÷ limit | stream ÷ floor | finalize wall s: weights (logits + neighbours + matching) / examples / other | ours whole CLI CPU s | peak RSS ours / limit MiB | state (expected) MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        res = json.loads(Path(path).read_text())
        for sweep in ("widths", "tokens"):
            for p in res[sweep]:
                lim, t, o = p["limit"], p["ours"]["timing"], p["ours"]
                per = lambda cpu, n: 1e6 * cpu / n  # noqa: E731
                l_us, f_us = per(lim["limit"]["cpu_seconds"], lim["n_tokens"]), per(lim["floor"]["cpu_seconds"], lim["n_tokens"])
                s_us = per(t["stream_cpu_seconds"], p["n_tokens"])
                fp = t.get("finalize_parts", {})
                weights = sum(fp.get(k, 0.0) for k in ("logits", "nearest_neighbours", "matching"))
                other = t["finalize_seconds"] - weights - fp.get("examples", 0.0)
                rows.append(f"| {sweep} | {p['d_sae']:,} | {p['n_tokens']:,} | {l_us:.0f} | {f_us:.0f} | {s_us:.0f} | {s_us / l_us:.2f} | {s_us / f_us:.2f} | "
                            f"{weights:.0f} / {fp.get('examples', 0.0):.0f} / {other:.0f} | {o['cpu_seconds']:.0f} | {o['peak_rss_bytes'] / 2**20:,.0f} / {lim['peak_rss_bytes'] / 2**20:,.0f} | "
                            f"{p.get('state_bytes_expected', 0) / 2**20:,.0f} |")
    return "\n".join(rows)
