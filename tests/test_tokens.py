"""Token display (explorer/tokens.py, explorer/render.py): against the tokenizer's own decode of
whole sequences, on a byte-level BPE (GPT-2 style) and a SentencePiece-style (Metaspace, byte
fallback) tokenizer, and hand-checked byte cases."""

from __future__ import annotations

import pytest

from explorer import render
from explorer import tokens as T

TEXTS = ["Fixed a crash in the parser.", "café naïve", "A café in Köln, 日本語 and 🙂 emoji.", "def f(x):\n\treturn  x  "]


def test_group_display_hand_checked():
    e = "é".encode()
    # " caf" + the two bytes of é as two tokens: the character shows once, on the token completing it
    assert T.group_display([b" caf", e[:1], e[1:]]) == [" caf", "", "é"]
    jp = "日".encode()
    assert T.group_display([jp[:1], jp[1:2], jp[2:], b"!"]) == ["", "", "日", "!"]
    # a window cut inside a character: the dangling bytes show as escapes, never a bare U+FFFD
    assert T.group_display([b"x", e[:1]]) == ["x", "\\xc3"]
    assert T.group_display([e[1:], b"y"]) == ["\\xa9", "y"]
    assert T.group_display([b"a", None, b"b"]) == ["a", "", "b"]
    assert T.single_display(e[:1]) == "\\xc3" and T.single_display(b" the") == " the"


@pytest.fixture(scope="module")
def tokenizers(hf_models):
    from transformers import AutoTokenizer

    return {
        "byte_level": AutoTokenizer.from_pretrained(str(hf_models.gpt2["base"]), local_files_only=True),
        "metaspace": AutoTokenizer.from_pretrained(str(hf_models.llama["base"]), local_files_only=True),
    }


@pytest.mark.parametrize("style", ["byte_level", "metaspace"])
def test_window_reads_as_the_tokenizer_decodes(tokenizers, style):
    tok = tokenizers[style]
    assert T.tokenizer_style(tok) == style
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        shown, titles = T.decode_window(tok, ids)
        assert len(shown) == len(ids) == len(titles)
        joined = "".join(shown)
        reference = tok.decode(ids)  # the tokenizer's own decode of the whole sequence
        if style == "metaspace":  # its decoder strips the space Metaspace prepends to the first word
            assert joined == " " + reference
        else:
            assert joined == reference
        assert "\ufffd" not in joined


def test_split_characters_are_grouped_and_spaces_kept(tokenizers):
    """The issue's cases: SentencePiece pieces keep their leading space; "é" as two byte pieces reads whole."""
    ms = tokenizers["metaspace"]
    ids = ms("Fixed a crash in the parser", add_special_tokens=False)["input_ids"]
    assert "".join(ms.batch_decode([[i] for i in ids])) == "Fixedacrashintheparser"  # one id at a time: spaces lost
    assert "".join(T.decode_window(ms, ids)[0]) == " Fixed a crash in the parser"
    for style, tok in tokenizers.items():
        ids = tok("café naïve", add_special_tokens=False)["input_ids"]
        singles = tok.batch_decode([[i] for i in ids])
        assert any("\ufffd" in s for s in singles), style  # the tiny tokenizers split é and ï into byte pieces
        shown, titles = T.decode_window(tok, ids)
        assert "".join(shown).strip() == "café naïve"
        assert "" in shown  # a byte piece shows nothing; the next token shows the character
        if style == "metaspace":  # the raw pieces stay on hover
            assert any("piece '<0xC3>'" in t for t in titles)


def test_vocab_forms(tokenizers):
    ms = tokenizers["metaspace"]
    vocab = T.vocab_from_tokenizer(ms, len(ms) + 3)
    the = ms.convert_tokens_to_ids("\u2581the")
    assert vocab.strs[the] == " the" and vocab.pieces[the] == "\u2581the" and vocab.raw[the] == b" the"
    byte = ms.convert_tokens_to_ids("<0xC3>")
    assert vocab.raw[byte] == b"\xc3" and vocab.strs[byte] == "\\xc3"
    assert vocab.strs[len(ms)] == f"<id {len(ms)}>" and vocab.raw[len(ms)] is None
    assert vocab.titles([the]) == [f"id {the} · piece '\u2581the'"]
    bl = tokenizers["byte_level"]
    v = T.vocab_from_tokenizer(bl, len(bl))
    assert v.strs[bl.bos_token_id] == bl.bos_token  # special tokens: their content


def test_highlight_merges_a_split_character_and_keeps_every_piece_on_hover():
    html = render.highlight([" caf", "", "é"], [0.1, 0.9, 0.2], 1.0, titles=["id 7 · piece 'Ġcaf'", "id 8 · piece 'Ã'", "id 9 · piece '©'"], grouped=True)
    assert html.count("<span") == 2  # " caf" and one span for "é"
    assert ">é</span>" in html and "id 8 · piece &#x27;Ã&#x27;: 0.9" in html and "id 9 · piece &#x27;©&#x27;: 0.2" in html
    assert "rgba(31,111,180,0.765)" in html  # the run's largest activation (0.9) colours the character
    plain = render.highlight(["a", "b"], [0.5, 0.0], 1.0, focus=1)
    assert plain.count("<span") == 2 and "sx-focus" in plain
