"""The example windows' encode (`SaeCodec.encode_at`) on one stream batch: before and after.

    python benchmarks/windows_encode.py --pair benchmarks/_work/wide256 --widths 16384 --examples 35000
    python benchmarks/windows_encode.py --pair benchmarks/_work/wide2304w --widths 65536 --examples 35000 140000
    python benchmarks/windows_encode.py --smoke --out X.json      # the test suite

At finalize the windows pass calls `encode_at` once per (stream batch, SAE, model) with the
batch's examples of that SAE: each example asks for its feature's activation at its window's W
positions (window_before + 1 + window_after = 17 by default). The number of examples per batch
is the run's examples (up to 140 per feature and SAE: 20 top + 50 quantile, on each model) over
its batches: 35k at 16k features and 64 batches (262k tokens), fewer over more tokens.

    before   the code up to this change: the batch's N positions encoded for every distinct
             feature among the examples (N x d_in x distinct features, in chunks of 2048
             features), then gathered; kept here as `encode_at_by_feature`;
    after    `SaeCodec.encode_at`: the n x W pairs only, one dot product each (n x W x d_in).

Both on the same SAE (from a wide pair, --pair), the same random batch and examples, 1 thread,
CPU seconds side by side, and the outputs compared (float32 summation order only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import load_script, machine, write_result  # noqa: E402


def encode_at_by_feature(codec, x, rows, features, chunk: int = 2048):
    """encode_at as it was: every position of x for each distinct feature, then gathered."""
    import numpy as np
    import torch

    sae = codec.sae
    out = np.zeros(rows.shape, np.float32)
    uniq, inv = np.unique(np.asarray(features, dtype=np.int64), return_inverse=True)
    sae_in = x.to(sae.dtype) - sae.b_dec * sae.cfg.apply_b_dec_to_input
    for lo in range(0, len(uniq), chunk):
        f = torch.from_numpy(uniq[lo : lo + chunk])
        pre = torch.addmm(sae.b_enc.index_select(0, f), sae_in, sae.W_enc.index_select(1, f))
        acts = torch.where(pre > codec.gate.index_select(0, f), pre, torch.zeros((), dtype=pre.dtype)).float().numpy()
        mine = np.flatnonzero((inv >= lo) & (inv < lo + chunk))
        out[mine] = acts[rows[mine], (inv[mine] - lo)[:, None]]
    return out


def _cpu(fn, *args):
    t0 = time.process_time()
    out = fn(*args)
    return out, time.process_time() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", type=Path, default=None, help="a wide pair (benchmarks/wide_pair.py) holding SAEs of each width")
    p.add_argument("--widths", type=int, nargs="+", default=[16384])
    p.add_argument("--examples", type=int, nargs="+", default=[35000], help="examples in the batch (per call)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="positions in the batch (N; default 32 x 128)")
    p.add_argument("--window", type=int, default=17)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / "_work" / "windows_encode")
    p.add_argument("--smoke", action="store_true", help="the tiny wide pair, one small point (the test suite)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "windows_encode.json")
    a = p.parse_args(argv)
    import numpy as np
    import torch
    from sae_lens import SAE

    from precompute.sae_codec import SaeCodec

    torch.set_num_threads(1)
    pair = a.pair
    if a.smoke:
        wide = load_script("wide_pair")
        pair = a.work.resolve() / "tiny-pair"
        if not (pair / "PAIR.json").exists():
            wide.generate(pair, wide.TINY)
        a.widths, a.examples, a.batch_tokens, a.context = [256], [300], 128, 16
    if pair is None:
        raise SystemExit("--pair is required (a wide pair from benchmarks/wide_pair.py), or --smoke")
    rows_out = []
    for d in a.widths:
        sae = SAE.load_from_disk(str(pair / "saes" / str(d) / "base_sae"))
        codec = SaeCodec(sae)
        if not codec.fast:
            raise SystemExit(f"the SAE of width {d} is not on the fast path")
        d_in = int(sae.cfg.d_in)
        gen = torch.Generator().manual_seed(d)
        x = torch.randn(a.batch_tokens, d_in, generator=gen) * 2.0
        for n in a.examples:
            rng = np.random.default_rng(n)
            feats = rng.integers(0, d, n)
            # windows as fill_windows cuts them: window_before = W - 5 tokens before a random position
            # of a random sequence, clipped to the sequence
            ctx = min(a.context, a.batch_tokens)
            seq, pos = rng.integers(0, a.batch_tokens // ctx, n), rng.integers(0, ctx, n)
            start = np.maximum(pos - (a.window - 5), 0)
            rows = seq[:, None] * ctx + np.minimum(start[:, None] + np.arange(a.window)[None, :], ctx - 1)
            with torch.inference_mode():
                after, c_after = _cpu(codec.encode_at, x, rows, feats)
                before, c_before = _cpu(encode_at_by_feature, codec, x, rows, feats)
            diff = float(np.abs(after - before).max())
            row = {"d_sae": d, "d_in": d_in, "examples": n, "window": a.window, "batch_tokens": a.batch_tokens,
                   "distinct_features": int(len(np.unique(feats))), "before_cpu_seconds": c_before, "after_cpu_seconds": c_after,
                   "before_over_after": c_before / max(c_after, 1e-9), "max_abs_diff": diff, "nonzero_share": float((after > 0).mean()),
                   "same_nonzero_pattern": bool(((after > 0) == (before > 0)).all()), "loadavg": list(os.getloadavg())}
            if not np.allclose(after, before, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(before).max()))):
                raise SystemExit(f"d_sae {d}, {n} examples: before and after differ by {diff}")
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    write_result(a.out, {"benchmark": "example windows' encode per stream batch, before and after", "machine": machine(),
                         "command": "python benchmarks/windows_encode.py " + " ".join(argv if argv is not None else sys.argv[1:]), "rows": rows_out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
