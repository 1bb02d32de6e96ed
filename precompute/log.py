"""Progress and status lines of the precompute: on stderr, prefixed, so stdout stays for results."""

from __future__ import annotations

import sys


def log(msg: str) -> None:
    print(f"[precompute] {msg}", file=sys.stderr, flush=True)
