"""Load test of the SERVER: many concurrent sessions speaking Streamlit's websocket protocol.

No browser per client: each session is one websocket to `ws://127.0.0.1:PORT/_stcore/stream`
(tests/st_protocol.py), sending the BackMsg `rerun_script` a browser sends (ClientState: the
page, its query string, widget states) and reading ForwardMsgs until `script_finished`. So the
latency measured is the server's: its script run, its messages, the websocket, and the client
parsing them (protobuf, in C), without 25 Chromium renderers on the same cores
(benchmarks/load_test.py keeps that check that real pages work under concurrency).

Starts `streamlit run app.py` on 127.0.0.1 (a free port; tests/browser_utils.streamlit_server)
over data/runs (the shipped demo run), or uses --url. A warm-up (not measured) opens every page
once and loads the live probe's models. Then for --duration seconds each of --sessions sessions
loops: think (uniform --think-min..--think-max seconds), then one action, chosen at random:

    feature  a deep link to a random feature of a random SAE (/feature?run=..&sae=..&feature=..)
    filter   on the Features page, a new search term in the table filter: a rerun whose widget
             state changes the text input (the page is opened first if the session is elsewhere;
             that load is recorded as "features_open")
    probe    on the Live probe, a fresh prompt typed and "Run probe" pressed: the form's text
             area and submit button in the widget states; real inference, never a cache hit (the
             page load before it, if needed, is "probe_open")

An action's latency is from sending its BackMsg to its script_finished (following a rerun the
script asks for, e.g. st.switch_page). Errors: an exception element, an error alert, a page-not
-found message, a run that does not finish (timeout, closed socket). The machine's load
(/proc/loadavg) is recorded before and after the load (after the warm-up), with the server process's CPU seconds.

    python benchmarks/load_protocol.py --sessions 25 --duration 60
    python benchmarks/load_protocol.py --sessions 100 --duration 60
    python benchmarks/load_protocol.py --smoke            # 3 sessions, 8 s (tests/test_load_protocol_smoke.py)

Writes benchmarks/results/load_protocol_<sessions>.json (or --out): every sample, the summary,
the settings, the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import PROMPTS, SEARCH_TERMS, load_summary, machine, print_load_summary, write_result  # noqa: E402
from tests.st_protocol import Session, text, trigger  # noqa: E402

ACTIONS = ("feature", "filter", "probe")
WEIGHTS = (0.45, 0.35, 0.20)
RECORDED = ACTIONS + ("features_open", "probe_open")


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


def server_pid(port: int) -> int | None:
    """The process serving `port` (found by its command line): `streamlit run`, or the balancer of
    `sae-transfer app --workers N` (whose workers are its children, tree_pids)."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        joined = b" ".join(cmd)
        if (b"streamlit" in joined or b"sae_transfer" in joined) and str(port).encode() in cmd:
            return int(p.name)
    return None


def tree_pids(pid: int | None) -> list[int]:
    """`pid` and every process descended from it (the workers of `sae-transfer app --workers N`)."""
    if pid is None:
        return []
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        q = todo.pop()
        out.append(q)
        todo += children.get(q, [])
    return out


def tree_cpu_seconds(pids: list[int]) -> float | None:
    vals = [cpu_seconds(p) for p in pids]
    return None if not vals or any(v is None for v in vals) else sum(vals)


def cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class Client:
    def __init__(self, idx: int, url: str, run_id: str, d_sae: dict[str, int], deadline: float, args, rng: random.Random):
        self.idx, self.url, self.run_id, self.d_sae, self.deadline, self.args, self.rng = idx, url, run_id, d_sae, deadline, args, rng
        self.records: list[dict] = []
        self.page: str | None = None

    def _record(self, action: str, result, t0: float, error: str | None = None) -> None:
        errors = ([error] if error else []) + (result.errors if result is not None else [])
        self.records.append({
            "session": self.idx, "action": action, "t": t0, "seconds": result.seconds if result is not None else None,
            "status": result.status if result is not None else "failed", "error": "; ".join(errors)[:300] or None,
            "messages": result.n_messages if result is not None else 0,
        })

    async def run(self) -> None:
        await asyncio.sleep(self.rng.uniform(0, self.args.think_max))  # sessions do not start in lock step
        try:
            async with Session(self.url, timeout=self.args.action_timeout) as s:
                while time.monotonic() < self.deadline:
                    action = self.rng.choices(ACTIONS, WEIGHTS)[0]
                    t0 = time.monotonic()
                    try:
                        await getattr(self, "_" + action)(s)
                    except Exception as exc:  # noqa: BLE001 - a failed action is an error of that action
                        self._record(action, None, t0, f"{type(exc).__name__}: {str(exc)[:200]}")
                        self.page = None
                    await asyncio.sleep(self.rng.uniform(self.args.think_min, self.args.think_max))
        except Exception as exc:  # noqa: BLE001 - could not connect
            self._record("connect", None, time.monotonic(), f"{type(exc).__name__}: {str(exc)[:200]}")

    async def _feature(self, s: Session) -> None:
        sae = self.rng.choice(sorted(self.d_sae))
        fid = self.rng.randrange(self.d_sae[sae])
        t0 = time.monotonic()
        r = await s.open("feature", f"run={self.run_id}&sae={sae}&feature={fid}")
        self.page = "feature"
        self._record("feature", r, t0, None if any(f"feature {fid}" in t for t in r.texts()) or r.errors else f"no heading for feature {fid}")

    async def _filter(self, s: Session) -> None:
        if self.page != "features":
            t0 = time.monotonic()
            r = await s.open("features", f"run={self.run_id}")
            self._record("features_open", r, t0)
            self.page, self.search_id = "features", r.widget(key="f_search").id
        t0 = time.monotonic()
        r = await s.set_widgets({self.search_id: text(self.rng.choice(SEARCH_TERMS))})
        self._record("filter", r, t0, None if any("features match" in t or "No feature matches" in t for t in r.texts()) or r.errors else "no match count")

    async def _probe(self, s: Session) -> None:
        if self.page != "live_probe":
            t0 = time.monotonic()
            r = await s.open("live_probe", f"run={self.run_id}")
            self._record("probe_open", r, t0)
            self.page = "live_probe"
            self.text_id = r.widget(key="probe_text").id
            self.button_id = next(w.id for w in r.widgets() if w.kind == "button" and w.label == "Run probe")
        prompt = f"{self.rng.choice(PROMPTS)} {self.rng.randrange(10**6)}"  # fresh: never a cache hit
        t0 = time.monotonic()
        r = await s.set_widgets({self.text_id: text(prompt), self.button_id: trigger()})
        body = "".join(e.html.body for e in r.elements if e.WhichOneof("type") == "html")
        self._record("probe", r, t0, None if 'data-probe="feature-acts"' in body or r.errors else "no activations panel")


def summarize(records: list[dict]) -> dict:
    """load_summary, plus how many actions the server answered with script_finished."""
    out = load_summary(records, RECORDED + ("connect",), skip_empty=True)
    for action, s in out.items():
        s["script_finished"] = sum(1 for r in records if (action == "all" or r["action"] == action) and r["status"] in ("finished", "fragment_finished"))
    return out


async def warm_up(url: str, run_id: str, d_sae: dict[str, int]) -> None:
    async with Session(url, timeout=600) as s:
        for page, q in (("", ""), ("features", ""), ("feature", "&sae=base_sae&feature=0"), ("dead-born", ""), ("similarity", ""), ("live_probe", "")):
            r = await s.open(page, f"run={run_id}{q}")
            if r.errors:
                raise SystemExit(f"warm-up: /{page} failed: {r.errors}")


async def drive(url: str, args, run_id: str, d_sae: dict[str, int]) -> dict:
    # one warm-up session per worker, open together: the balancer gives each its own worker
    await asyncio.gather(*(warm_up(url, run_id, d_sae) for _ in range(max(1, args.workers))))
    pids = tree_pids(server_pid(int(url.rsplit(":", 1)[1])) if url.startswith("http://127.0.0.1:") else None)
    load_before, cpu_before, client_before = loadavg(), tree_cpu_seconds(pids), cpu_seconds(os.getpid())
    t_start = time.monotonic()
    deadline = t_start + args.duration
    clients = [Client(i, url, run_id, d_sae, deadline, args, random.Random(args.seed * 1000 + i)) for i in range(args.sessions)]
    await asyncio.gather(*(c.run() for c in clients))
    wall = time.monotonic() - t_start
    cpu_after = tree_cpu_seconds(pids)
    client_after = cpu_seconds(os.getpid())
    return {"records": [r for c in clients for r in c.records], "wall_s": wall, "loadavg_before": load_before, "loadavg_after": loadavg(),
            "server_cpu_s": None if cpu_before is None or cpu_after is None else cpu_after - cpu_before,
            "client_cpu_s": None if client_before is None or client_after is None else client_after - client_before}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=25)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (after the warm-up)")
    ap.add_argument("--think-min", type=float, default=1.0, help="think time between a session's actions: uniform in [min, max] seconds")
    ap.add_argument("--think-max", type=float, default=5.0)
    ap.add_argument("--smoke", action="store_true", help="3 sessions, 8 s, think 0.2-0.5 s")
    ap.add_argument("--runs-dir", default=None, help="runs dir for the server (default: data/runs)")
    ap.add_argument("--run", default="demo", help="run id to drive")
    ap.add_argument("--url", default=None, help="drive this running server instead of starting one")
    ap.add_argument("--workers", type=int, default=1, help="serve with `sae-transfer app --workers N` (N Streamlit processes behind one port)")
    ap.add_argument("--action-timeout", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.sessions, args.duration, args.think_min, args.think_max = 3, 8.0, 0.2, 0.5
    out = Path(args.out or REPO / "benchmarks" / "results" / f"load_protocol_{args.sessions}.json")
    cmdline = "python benchmarks/load_protocol.py " + " ".join(argv if argv is not None else sys.argv[1:])

    from explorer import rundir

    runs = Path(args.runs_dir) if args.runs_dir else rundir.DEFAULT_RUNS_DIR
    manifest = rundir.open_run(rundir.run_path(args.run, runs))
    d_sae = {s: int(manifest["d_sae"][s]) for s in manifest["saes"]}

    if args.url:
        res = asyncio.run(drive(args.url, args, args.run, d_sae))
    else:
        from tests.browser_utils import streamlit_server

        with streamlit_server(runs_dir=runs, timeout=180, workers=args.workers) as url:
            res = asyncio.run(drive(url, args, args.run, d_sae))
    records = res.pop("records")
    summary = summarize(records)
    errors = [r for r in records if r["error"]]
    result = {
        "benchmark": "load (server): concurrent sessions over Streamlit's websocket protocol",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": cmdline.strip(),
        "sessions": args.sessions, "duration_s": args.duration, "run": args.run, "workers": args.workers,
        "think_s": [args.think_min, args.think_max], "weights": dict(zip(ACTIONS, WEIGHTS)),
        "client": "tests/st_protocol.py: one websocket per session, one asyncio process",
        "machine": machine(), **res,
        "server_cpu_share": None if res["server_cpu_s"] is None else res["server_cpu_s"] / res["wall_s"],
        "summary": summary,
        "error_samples": [{k: r[k] for k in ("session", "action", "error")} for r in errors[:20]],
        "samples": records,
    }
    write_result(out, result)
    fmt = lambda v: f"{v:.3f} s" if v is not None else "-"  # noqa: E731
    print(f"{args.sessions} sessions, {args.duration:.0f} s ({res['wall_s']:.0f} s wall), think {args.think_min}-{args.think_max} s: "
          f"{summary['all']['n']} actions, {summary['all']['errors']} errors; CPU: server {fmt(res['server_cpu_s'])}, client {fmt(res['client_cpu_s'])}")
    print(f"  loadavg before: {res['loadavg_before']}   after: {res['loadavg_after']}")
    print_load_summary(summary, RECORDED, result["error_samples"], out, width=14, digits=3)
    return 0 if not errors and summary["all"]["n"] > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
