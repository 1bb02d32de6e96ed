"""How tokens are shown: one module for the precompute's vocabulary table, the app's example
windows and the live probe.

Every token id has three forms:
  * its bytes (`token_bytes`): what it contributes to the decoded text. Byte-level BPE pieces
    (GPT-2, Llama 3, Qwen: `Ġ` for a space, `Ã©` for the two bytes of "é") map back through the
    byte-to-character table; SentencePiece-style pieces (Metaspace: `▁` for a space; byte
    fallback pieces `<0xC3>`) give their text with `▁` as a space, or their byte; added and
    special tokens give their content; any other tokenizer, `decode([id])`.
  * its display form alone (`single_display`): the bytes as UTF-8, with bytes that do not form
    a whole character shown as `\\xNN` escapes (a lone byte piece is never a bare U+FFFD);
  * its raw piece (`convert_ids_to_tokens`), shown on hover with the id.

In a sequence (`group_display`), a character whose bytes span several tokens is shown once, on
the token that completes it, and the earlier pieces show nothing (renderers merge such empty
tokens into the next one): "café naïve" reads as written even when "é" is two byte tokens.
Decoding one id at a time would lose SentencePiece's leading spaces ("Fixedacrash") and show
"caf\ufffd\ufffd".

Strings are raw: escape before rendering (explorer/render.py).
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

METASPACE = "\u2581"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _decoder_types(tokenizer) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    try:
        dec = json.loads(backend.to_str()).get("decoder") or {}
    except (ValueError, AttributeError):
        return set()
    out: set[str] = set()

    def walk(d):
        if isinstance(d, dict):
            t = d.get("type")
            if t == "Replace" and (d.get("pattern") or {}).get("String") == METASPACE:
                out.add("Metaspace")
            elif t:
                out.add(t)
            for v in d.get("decoders") or []:
                walk(v)

    walk(dec)
    return out


def tokenizer_style(tokenizer) -> str:
    """"byte_level", "metaspace" or "other": how a piece maps to bytes."""
    types = _decoder_types(tokenizer)
    if "ByteLevel" in types:
        return "byte_level"
    if "Metaspace" in types:
        return "metaspace"
    return "other"


def token_bytes(tokenizer, n: int | None = None) -> list[bytes]:
    """Each id's bytes, for ids 0..n-1 (default: the tokenizer's length)."""
    n = len(tokenizer) if n is None else min(n, len(tokenizer))
    ids = list(range(n))
    pieces = tokenizer.convert_ids_to_tokens(ids)
    added = {int(i): t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    style = tokenizer_style(tokenizer)
    byte_fallback = style == "metaspace" and "ByteFallback" in _decoder_types(tokenizer)
    table = _byte_decoder()
    out: list[bytes] = []
    decoded = None
    for i, piece in zip(ids, pieces):
        m = _BYTE_PIECE.fullmatch(piece) if byte_fallback and piece else None
        if m:
            out.append(bytes([int(m.group(1), 16)]))
        elif i in added:
            out.append(added[i].encode("utf-8"))
        elif piece is None:
            out.append(b"")
        elif style == "byte_level" and all(c in table for c in piece):
            out.append(bytes(table[c] for c in piece))
        elif style == "metaspace":
            out.append(piece.replace(METASPACE, " ").encode("utf-8"))
        else:
            if decoded is None:
                decoded = tokenizer.batch_decode([[j] for j in ids])
            out.append(decoded[i].encode("utf-8"))
    return out


def token_pieces(tokenizer, n: int | None = None) -> list[str]:
    n = len(tokenizer) if n is None else min(n, len(tokenizer))
    return [("" if p is None else str(p)) for p in tokenizer.convert_ids_to_tokens(list(range(n)))]


def single_display(raw: bytes) -> str:
    """One token alone: its text, with bytes that are not a whole character as \\xNN."""
    return raw.decode("utf-8", errors="backslashreplace")


def group_display(raws: Sequence[bytes | None]) -> list[str]:
    """Per position of a token sequence: the characters it completes (see the module docstring).
    Bytes that never complete a character (a window cut inside one) show as \\xNN. A None entry
    (an id without bytes) breaks the sequence and shows as ""."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")
    out: list[str] = []
    holder: int | None = None  # the position whose bytes the decoder still holds back

    def flush() -> None:
        tail = dec.decode(b"", final=True)
        if tail:
            out[holder if holder is not None else -1] += tail
        dec.reset()

    for i, raw in enumerate(raws):
        if raw is None:
            flush()
            holder = None
            out.append("")
            continue
        out.append(dec.decode(raw))
        holder = i if dec.getstate()[0] else None
    if out:
        flush()
    return out


@dataclass
class Vocab:
    """A run's vocabulary as the app shows it (vocab.parquet: token_str, token_piece, token_bytes)."""

    strs: list[str]
    pieces: list[str]
    raw: list[bytes | None]

    def __len__(self) -> int:
        return len(self.strs)

    def single(self, i: int) -> str:
        return self.strs[i] if 0 <= i < len(self.strs) else f"<id {i}>"

    def window(self, ids: Sequence[int]) -> list[str]:
        """Display strings of a token window, characters grouped across byte pieces."""
        ids = [int(i) for i in ids]
        if not any(self.raw):  # a run written without bytes: the single-token forms
            return [self.single(i) for i in ids]
        raws = [self.raw[i] if 0 <= i < len(self.raw) and self.raw[i] is not None else None for i in ids]
        grouped = group_display(raws)
        return [g if r is not None else self.single(i) for g, r, i in zip(grouped, raws, ids)]

    def titles(self, ids: Sequence[int]) -> list[str]:
        """Hover text per token: id and raw piece."""
        out = []
        for i in (int(x) for x in ids):
            piece = self.pieces[i] if 0 <= i < len(self.pieces) else ""
            out.append(f"id {i} · piece {piece!r}")
        return out


def vocab_from_tokenizer(tokenizer, d_vocab: int) -> Vocab:
    """The vocabulary table of a run: ids 0..d_vocab-1 (ids past the tokenizer: '<id N>', no bytes)."""
    n = min(len(tokenizer), d_vocab) if tokenizer is not None else 0
    raw: list[bytes | None] = list(token_bytes(tokenizer, n)) if n else []
    pieces = token_pieces(tokenizer, n) if n else []
    strs = [single_display(b) for b in raw]
    for i in range(n, d_vocab):
        strs.append(f"<id {i}>")
        pieces.append("")
        raw.append(None)
    return Vocab(strs, pieces, raw)


def decode_window(tokenizer, ids: Sequence[int]) -> tuple[list[str], list[str]]:
    """(grouped display strings, hover titles) of ids, straight from a tokenizer (the live probe)."""
    ids = [int(i) for i in ids]
    vocab = _tokenizer_vocab(tokenizer, max(ids) + 1 if ids else 0)
    return vocab.window(ids), vocab.titles(ids)


_cache: dict[int, tuple[object, Vocab]] = {}


def _tokenizer_vocab(tokenizer, n: int) -> Vocab:
    """The tokenizer's whole vocabulary as a Vocab, built once per tokenizer object."""
    key = id(tokenizer)
    hit = _cache.get(key)
    if hit is None or hit[0] is not tokenizer or len(hit[1]) < n:
        hit = (tokenizer, vocab_from_tokenizer(tokenizer, max(len(tokenizer), n)))
        _cache[key] = hit
    return hit[1]
