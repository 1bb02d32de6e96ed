"""`sae-transfer`: the one command line of SAE Transfer Explorer.

    sae-transfer run --config CONFIG [--shard I/N] ...     the precompute (= python -m precompute run)
    sae-transfer merge RUN_ID                              merge a run's shards
    sae-transfer check CONFIG                              every problem a run of CONFIG would hit, nothing run
    sae-transfer app [--run ID] [--port N] [--workers N]   start the explorer on 127.0.0.1
    sae-transfer demo [--tiny] [--out DIR]                 rebuild the demo pair (python -m precompute.demo)
    sae-transfer export neuronpedia --run ID --out DIR     Neuronpedia bundles, one source per (SAE, model)
    sae-transfer export features --run ID --view QUERY --out FILE[.csv|.parquet]
                                                           a Features-page view (its URL query or link)
    sae-transfer schema [--write PATH]                     the run schema as Markdown

Every subcommand has --help. Usage errors and bad input exit with status 2 and one line on
stderr; progress goes to stderr, results (paths, URLs) to stdout.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from explorer.errors import ExplorerError

PROG = "sae-transfer"
EXIT_USER_ERROR = 2
PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
PRECOMPUTE_COMMANDS = ("run", "merge", "check", "schema")


def app_dir() -> Path:
    """Where app.py, pages/ and .streamlit/config.toml are: inside the installed package, or the
    repository root (a checkout, or an editable install)."""
    for d in (PACKAGE_DIR / "app", REPO_ROOT):
        if (d / "app.py").is_file() and (d / "pages").is_dir():
            return d
    raise ExplorerError(f"The explorer's app.py was not found in {PACKAGE_DIR / 'app'} or {REPO_ROOT}: reinstall the package.")


def streamlit_flags(config_toml: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """The app's .streamlit/config.toml as command-line flags, so that it holds whatever the
    working directory (Streamlit reads ./.streamlit/config.toml from there); `skip` names the
    options the caller sets itself."""
    if not config_toml.is_file():
        return []
    flags = []
    for section, values in tomllib.loads(config_toml.read_text(encoding="utf-8")).items():
        for key, value in values.items():
            if f"{section}.{key}" in skip:
                continue
            text = str(value).lower() if isinstance(value, bool) else str(value)
            flags.append(f"--{section}.{key}={text}")
    return flags


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,merge,check,app,demo,export,schema}")
    for name, text in (("run", "compute a run (or one shard) from a config"), ("merge", "merge the shards of a run"),
                       ("check", "report every problem a run of a config would hit, without running it"),
                       ("schema", "print the run schema as Markdown")):
        sub.add_parser(name, help=text, add_help=False)  # parsed by the precompute's own command line

    a = sub.add_parser("app", help="start the explorer (Streamlit) on 127.0.0.1")
    a.add_argument("--run", metavar="ID", help="the run to open first (it must be in the runs folder)")
    a.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    a.add_argument("--address", default="127.0.0.1", help="address to bind (default 127.0.0.1; see README before exposing it)")
    a.add_argument("--runs-dir", metavar="DIR", help="the folder of runs (default: $SAE_EXPLORER_RUNS_DIR, else the repository's data/runs)")
    a.add_argument("--workers", type=int, default=1, metavar="N",
                   help="Streamlit processes behind the one address (default 1; one process uses one core: see README, Serving many sessions)")

    d = sub.add_parser("demo", help="rebuild the demo pair (seeded; about 2 hours on 2 CPU cores)", add_help=False)
    del d

    e = sub.add_parser("export", help="export a run (Neuronpedia bundles, a features view as CSV or Parquet)")
    esub = e.add_subparsers(dest="export", required=True)
    n = esub.add_parser("neuronpedia", help="Neuronpedia bundles: one source per (SAE, model), base and finetune linked")
    n.add_argument("--run", required=True, metavar="ID", help="run id (a folder of --runs-dir)")
    n.add_argument("--out", required=True, metavar="DIR", help="output folder (the bundles go under DIR/v1/)")
    n.add_argument("--runs-dir", metavar="DIR", help="the folder of runs (default: $SAE_EXPLORER_RUNS_DIR, else data/runs)")
    n.add_argument("--base-model-id", help="Neuronpedia model id of the base model (default: from the run's config)")
    n.add_argument("--finetuned-model-id", help="Neuronpedia model id of the finetuned model")
    n.add_argument("--release", help="Neuronpedia release name (default: RUN-transfer)")
    n.add_argument("--creator-id", default=None, help="Neuronpedia creator id of the rows (default: sae-transfer-explorer)")
    n.add_argument("--creator-name", default=None, help="creator name shown on Neuronpedia")
    n.add_argument("--finetuned-instruct", action="store_true", help="mark the finetuned model as an instruction/chat model")
    n.add_argument("--features-per-batch", type=int, default=1024, help="features per batch-N.jsonl.gz file (default 1024)")
    n.add_argument("--overwrite", action="store_true", help="replace bundles that exist")
    f = esub.add_parser(
        "features", help="every feature of a Features-page view (its filters, search, sort, source), as CSV or Parquet",
        description="The rows the app's Features page lists for a view, every page of them, in its order. --view takes the page's "
        "URL query (sae=base_sae&class=died&sort=density_base&desc=1) or the whole link copied from the app; without it, "
        "the page's defaults (base_sae, the features dead on both models left out). CSV text cells are formula-safe.",
    )
    f.add_argument("--run", required=True, metavar="ID", help="run id (a folder of --runs-dir)")
    f.add_argument("--view", default="", metavar="QUERY", help="the Features page's query string or link (default: its defaults)")
    f.add_argument("--out", required=True, metavar="FILE", help="output file; its suffix (.csv, .parquet) gives the format unless --format does")
    f.add_argument("--format", choices=("csv", "parquet"), help="csv (formula-safe) or parquet (default: from --out's suffix)")
    f.add_argument("--runs-dir", metavar="DIR", help="the folder of runs (default: $SAE_EXPLORER_RUNS_DIR, else data/runs)")
    f.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    return p


def _runs_dir(arg: str | None) -> Path:
    from explorer import rundir

    if arg:
        return Path(arg)
    env = os.environ.get("SAE_EXPLORER_RUNS_DIR")
    return Path(env) if env else rundir.DEFAULT_RUNS_DIR


def _log(msg: str) -> None:
    print(f"[{PROG}] {msg}", file=sys.stderr, flush=True)


def cmd_app(args) -> int:
    from explorer import rundir

    runs = _runs_dir(args.runs_dir)
    if args.run is not None:
        rundir.open_run(rundir.run_path(args.run, runs), verify_hashes=False)  # a clear error now, not a blank page later
    if not 0 < args.port < 65536:
        raise ExplorerError(f"--port must be between 1 and 65535, got {args.port}.")
    if not 1 <= args.workers <= 64:
        raise ExplorerError(f"--workers must be between 1 and 64, got {args.workers}.")
    where = app_dir()
    env = {**os.environ, "SAE_EXPLORER_RUNS_DIR": str(runs.resolve())}
    url = f"http://{args.address}:{args.port}/" + (f"overview?run={args.run}" if args.run else "")
    if args.workers > 1:
        return _serve_workers(args, where, env, runs, url)
    own = ("server.port", "server.address", "browser.serverAddress")
    cmd = [sys.executable, "-m", "streamlit", "run", str(where / "app.py"), *streamlit_flags(where / ".streamlit" / "config.toml", own),
           f"--server.port={args.port}", f"--server.address={args.address}", f"--browser.serverAddress={args.address}"]
    print(url, flush=True)
    _log(f"serving {runs} on {url} (Ctrl-C stops)")
    try:
        return subprocess.call(cmd, env=env, cwd=where)
    except KeyboardInterrupt:
        return 0


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_workers(args, where: Path, env: dict[str, str], runs: Path, url: str) -> int:
    """`--workers N`: N Streamlit processes on private 127.0.0.1 ports behind sae_transfer.balancer
    on --address:--port, all stopped together (Ctrl-C, SIGTERM, or one of them exiting)."""
    import asyncio
    import secrets
    import signal
    import socket
    import time
    import urllib.request

    from sae_transfer import balancer

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:  # the public port, before minutes of start-up
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.address, args.port))
        except OSError as exc:
            raise ExplorerError(f"cannot listen on {args.address}:{args.port}: {exc.strerror or exc}.") from None
    own = ("server.port", "server.address", "browser.serverAddress", "server.cookieSecret")
    flags = streamlit_flags(where / ".streamlit" / "config.toml", own)
    # one secret for all: an XSRF token one worker made validates on every other
    wenv = {**env, "STREAMLIT_SERVER_COOKIE_SECRET": secrets.token_hex(32)}
    ports = [_free_port() for _ in range(args.workers)]
    import tempfile

    logs = [tempfile.TemporaryFile() for _ in ports]  # a pipe nobody reads would block a worker that logs
    procs = [subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(where / "app.py"), *flags, f"--server.port={p}",
                               "--server.address=127.0.0.1", f"--browser.serverAddress={args.address}", f"--browser.serverPort={args.port}"],
                              env=wenv, cwd=where, stdout=subprocess.DEVNULL, stderr=log) for p, log in zip(ports, logs)]

    def stop() -> None:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        deadline = time.monotonic() + 180
        for p, port, log in zip(procs, ports, logs):
            while True:
                if p.poll() is not None:
                    log.seek(0)
                    err = log.read().decode("utf-8", "replace").strip().splitlines()
                    raise ExplorerError(f"a Streamlit worker exited with status {p.returncode} before it served: " + (err[-1] if err else "no message"))
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise ExplorerError(f"a Streamlit worker (port {port}) did not answer its health check in 180 s.")
                time.sleep(0.3)
        print(url, flush=True)
        _log(f"serving {runs} on {url} with {args.workers} worker processes (Ctrl-C stops)")

        async def main_loop() -> int:
            task = asyncio.create_task(balancer.serve([("127.0.0.1", p) for p in ports], args.address, args.port))
            while not task.done():
                dead = [p for p in procs if p.poll() is not None]
                if dead:
                    task.cancel()
                    _log(f"a worker exited with status {dead[0].returncode}: stopping")
                    return 1
                await asyncio.sleep(1.0)
            task.result()
            return 0

        return asyncio.run(main_loop())
    except KeyboardInterrupt:
        return 0
    finally:
        stop()


def cmd_export_neuronpedia(args) -> int:
    from explorer import neuronpedia, rundir

    run_dir = rundir.run_path(args.run, _runs_dir(args.runs_dir))
    ids = {m: v for m, v in (("base", args.base_model_id), ("finetuned", args.finetuned_model_id)) if v}
    opts = neuronpedia.NeuronpediaOptions(
        model_ids=ids, release_name=args.release, creator_id=args.creator_id or neuronpedia.DEFAULT_CREATOR_ID,
        creator_name=args.creator_name or neuronpedia.DEFAULT_CREATOR_NAME, instruct={"finetuned": args.finetuned_instruct},
        features_per_batch=args.features_per_batch,
    )
    for b in neuronpedia.export(run_dir, Path(args.out), opts, overwrite=args.overwrite, progress=_log):
        print(f"{b.path}\t{b.sae}\t{b.model}\t{b.n_features} features\t{b.n_activations} activations")
    return 0


def cmd_export_features(args) -> int:
    from explorer import features_view, rundir

    out = Path(args.out)
    fmt = args.format or {".csv": "csv", ".parquet": "parquet"}.get(out.suffix.lower())
    if fmt is None:
        raise ExplorerError(f"--out {out} has no .csv or .parquet suffix: name the format with --format csv|parquet.")
    if out.exists() and not args.overwrite:
        raise ExplorerError(f"{out} exists: pass --overwrite to replace it.")
    run_dir = rundir.run_path(args.run, _runs_dir(args.runs_dir))
    manifest = rundir.open_run(run_dir, verify_hashes=False)
    saes = list(manifest.get("saes") or ["base_sae"])
    view = features_view.parse_query(args.view, saes, list(manifest.get("sources") or {}))
    n = features_view.export(run_dir, view, fmt, out)
    _log(f"{n:,} features of {view.sae}" + (f" on {view.source}" if view.source else "") + f" ({view.query() or 'the defaults'})")
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PRECOMPUTE_COMMANDS:
        from precompute.__main__ import main as precompute_main

        return precompute_main(argv, prog=PROG)
    if argv and argv[0] == "demo":
        from precompute.demo import main as demo_main

        return demo_main(argv[1:], prog=f"{PROG} demo")
    args = _parser().parse_args(argv)
    try:
        if args.command == "app":
            return cmd_app(args)
        if args.command == "export" and args.export == "neuronpedia":
            return cmd_export_neuronpedia(args)
        if args.command == "export" and args.export == "features":
            return cmd_export_features(args)
    except ExplorerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return EXIT_USER_ERROR  # pragma: no cover - argparse requires a known command


if __name__ == "__main__":
    sys.exit(main())
