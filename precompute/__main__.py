"""Command line: python -m precompute {run,merge,check,schema}.

    python -m precompute check configs/demo.toml                      # every problem a run would hit, nothing run
    python -m precompute run --config configs/demo.toml              # writes data/runs/<run_id>/
    python -m precompute run --config X --shard 0/4                   # one slice of the token stream
    python -m precompute merge RUN_ID                                 # combine the shards of a run
    python -m precompute run --config X --ray [ADDRESS] --shards N    # the shards as Ray tasks, merged here
    python -m precompute schema --write docs/SCHEMA.md                # the run schema as Markdown

A run that is stopped (Ctrl-C, kill -9, a crash) resumes from its last checkpoint when the same
command is run again. Problems with a config or an input are printed as one message (no
traceback) and exit with status 2, before any work: hub failures too (no network, a gated
repository without HF_TOKEN, an unknown repository or SAELens release). The hub is used as
Hugging Face's own variables say (HF_TOKEN, HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE, HF_ENDPOINT).

    --device cpu|cuda|cuda:N|mps|auto   where the models and SAEs run (default auto: a GPU if there is one)
    --dtype float32|bfloat16|float16    the models' dtype, overriding the config's [models] dtype
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from explorer.errors import ConfigError, ExplorerError
from explorer.rundir import DEFAULT_RUNS_DIR

EXIT_USER_ERROR = 2


def _shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise ConfigError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4), got {text!r}.")
    return int(m.group(1)), int(m.group(2))


def _parser(prog: str = "python -m precompute") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="compute a run (or one shard) from a config")
    r.add_argument("--config", required=True, help="TOML config (see configs/demo.toml)")
    r.add_argument("--shard", default=None, help="I/N: compute only slice I of N of the token stream")
    r.add_argument("--runs-dir", default=str(DEFAULT_RUNS_DIR), help="where runs live (default data/runs)")
    r.add_argument("--checkpoint-every", type=int, default=25, help="save the accumulator state every N batches (default 25)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run (or checkpoint) with the same run_id")
    r.add_argument("--dtype", default=None, help="float32, bfloat16 or float16: the models' dtype (default: the config's [models] dtype)")
    r.add_argument(
        "--update-threads", type=int, default=None, metavar="N",
        help="threads for the sparse accumulators, overlapping the next batch's forwards (default: on a GPU the cores less one, "
        "up to 8; on the CPU the cores torch's threads leave idle, at least 1; 0: in the main thread). Any N gives the same run, bitwise.",
    )
    _ray_options(r)
    _common(r)
    # Throttle for tests of interruption and resume; not for normal use.
    r.add_argument("--batch-delay", type=float, default=0.0, help=argparse.SUPPRESS)

    m = sub.add_parser("merge", help="merge the shards of a run into the run")
    m.add_argument("run_id")
    m.add_argument("--runs-dir", default=str(DEFAULT_RUNS_DIR))
    _common(m)

    c = sub.add_parser("check", help="report every problem a run of CONFIG would hit (paths, hook, widths, vocabularies, corpus), without running it")
    c.add_argument("config", help="TOML config")
    c.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the config's [models] dtype)")
    c.add_argument("--device", default="cpu", help="where to load the models for the checks (default cpu)")

    s = sub.add_parser("schema", help="print the run schema as Markdown (docs/SCHEMA.md)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--write", metavar="PATH", help="write it to PATH")
    g.add_argument("--check", metavar="PATH", help="exit 1 if PATH differs from the current schema")
    return p


def _ray_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray (precompute/distributed.py)")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the shards as Ray tasks: on a local Ray instance (no ADDRESS) or the cluster at ADDRESS (host:port, auto, ray://...)")
    g.add_argument("--shards", type=int, default=None, help="with --ray: the number of shards (tasks), default 2")
    g.add_argument("--storage", default=None, metavar="URI", help="with --ray: shard states go through this directory or pyarrow URI (s3://...) instead of Ray's object store")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: cuda, else mps, else cpu)")
    p.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: half the cores, at least 1; on a busy 2-core machine 1 thread streamed 3x faster than 2)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _keep_freed_memory() -> None:
    """Ask glibc to reuse freed large buffers instead of unmapping them.

    Every forward pass allocates and frees [batch, context, vocab] logits (64 MiB in the demo);
    by default glibc returns each to the OS and the next one page-faults in again: on a 2-core
    machine that was a third of the precompute's time (system time), and this halves the wall
    time. Memory stays at its per-batch high-water mark, which does not grow with n_tokens.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def main(argv: list[str] | None = None, prog: str = "python -m precompute") -> int:
    args = _parser(prog).parse_args(argv)
    try:
        if args.command == "schema":
            return _schema(args)
        if args.command == "check":
            return _check(args)
        _keep_freed_memory()
        import torch

        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // 2))
        from precompute import run as run_mod

        if args.command == "run":
            from precompute.config import RunConfig

            if args.checkpoint_every < 1:
                raise ConfigError("--checkpoint-every must be at least 1.")
            if args.update_threads is not None and args.update_threads < 0:
                raise ConfigError("--update-threads must be 0 or more.")
            shard = _shard(args.shard) if args.shard else None
            if args.ray is None and (args.shards is not None or args.storage is not None):
                raise ConfigError("--shards and --storage go with --ray (for one shard without Ray, use --shard I/N).")
            if args.ray is not None and shard is not None:
                raise ConfigError("--ray runs every shard itself: give --shards N, not --shard I/N.")
            cfg = RunConfig.from_toml(args.config)
            if args.dtype is not None:
                from explorer.hf_loading import check_dtype

                cfg = cfg.with_dtype(check_dtype(args.dtype, "--dtype"))
            if args.ray is not None:
                from precompute.distributed import run_on_ray

                run_on_ray(
                    cfg, runs_dir=args.runs_dir, address=None if args.ray == "local" else args.ray, n_shards=args.shards or 2,
                    device=args.device, threads=args.threads, overwrite=args.overwrite, storage=args.storage, batch_delay=args.batch_delay,
                )
                return 0
            run_mod.run(
                cfg, runs_dir=args.runs_dir, shard=shard, checkpoint_every=args.checkpoint_every, device=args.device,
                overwrite=args.overwrite, progress=not args.no_progress, batch_delay=args.batch_delay, update_threads=args.update_threads,
            )
        elif args.command == "merge":
            run_mod.merge(args.run_id, runs_dir=args.runs_dir, device=args.device)
        return 0
    except ExplorerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume from the last checkpoint.", file=sys.stderr)
        return 130


def _check(args) -> int:
    from precompute.check import check

    report = check(args.config, device=args.device, dtype=args.dtype)
    for line in report.lines():
        print(line)
    return 0 if report.ok else EXIT_USER_ERROR


def _schema(args) -> int:
    from explorer.schema import describe

    text = describe() + "\n" if not describe().endswith("\n") else describe()
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(text, encoding="utf-8")
    elif args.check:
        path = Path(args.check)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            print(f"{path} is out of date: run `python -m precompute schema --write {path}`", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
