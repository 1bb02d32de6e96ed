"""Tiny Hugging Face models for the loading tests, built and trained in seconds, saved the way a
user's models arrive: `save_pretrained` directories (config.json with model_type, safetensors
weights, tokenizer files written by transformers from a `tokenizers` tokenizer).

    build_all(out) -> HFModels      # what the session fixture `hf_models` (conftest.py) returns

Families (each a base and a finetune: the base trained further on Python source):
  * gpt2:     GPT-2 (LayerNorm, learned positions), a byte-level BPE tokenizer (GPT-2 style);
              also `gpt2_added`, the finetune with two chat tokens added at the END of the vocabulary
              (vocabulary 3,002 vs 3,000 when vocab_size is 3,000);
  * llama:    Llama (RMSNorm, rotary, gated MLP, grouped-query attention), a SentencePiece-style
              tokenizer: Metaspace pre-tokenizer (`▁` for spaces), BPE with byte fallback (`<0xC3>`);
  * bigcode:  GPTBigCode (multi-query attention), a family HookedTransformer cannot convert, so only
              TransformerBridge loads it.
SAEs are SAELens StandardSAE / TopKSAE directories (`save_model`) whose decoder rows are
normalised activations of the base model at the hook (a cheap, deterministic dictionary that
reconstructs reasonably), with `metadata.hook_name` and `model_name` set as SAELens sets them.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

ENGLISH_EXTRA = [
    "Fixed a crash in the parser when the input was empty.",
    "A café in Köln serves naïve crème brûlée to the façade-loving crowd.",
    "The Zürich office opened in São Paulo, Málaga and Ōsaka.",
]
BOS_BYTE_LEVEL = "<|endoftext|>"
ADDED_TOKENS = ["<|im_start|>", "<|im_end|>"]


def texts() -> dict[str, list[str]]:
    """English (module and function docstrings, some accented prose) and Python (module sources)
    from the standard library: always present, deterministic."""
    import importlib

    names = [
        "textwrap", "json.decoder", "string", "shlex", "fractions", "difflib", "calendar", "heapq", "bisect",
        "pprint", "glob", "fnmatch", "argparse", "csv", "functools",
    ]
    mods = [importlib.import_module(n) for n in names]
    english = [m.__doc__ or "" for m in mods]
    for m in mods:
        english += [f.__doc__ for f in vars(m).values() if callable(f) and isinstance(getattr(f, "__doc__", None), str)]
    english = [t for t in english if t and t.strip()] + ENGLISH_EXTRA * 20
    python = [inspect.getsource(m)[:6000] for m in mods]
    return {"english": english, "python": python}


# ------------------------------------------------------------------------------------------ tokenizers


def byte_level_tokenizer(corpus: list[str], vocab_size: int, out: Path):
    """GPT-2 style: byte-level BPE (each byte a printable stand-in character), BOS = EOS = <|endoftext|>,
    trained on ASCII text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS_BYTE_LEVEL], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    # trained on ASCII text, so that "é" is two byte pieces, as rare characters are in real vocabularies
    tok.train_from_iterator([t.encode("ascii", "ignore").decode() for t in corpus], trainer=trainer)
    return _save_tokenizer(tok, out, bos_token=BOS_BYTE_LEVEL, eos_token=BOS_BYTE_LEVEL)


def metaspace_tokenizer(corpus: list[str], vocab_size: int, out: Path):
    """Llama/SentencePiece style, laid out as Llama's: <unk> <s> </s> (ids 0-2), the 256 byte
    pieces <0x00>..<0xFF> (ids 3-258), then BPE pieces; spaces become `▁` (Metaspace, prepended to
    the first word); characters outside the vocabulary fall back to byte pieces; decoding replaces
    `▁` by a space, fuses byte pieces and strips the first space. Trained on ASCII text, so that
    accented letters go through byte fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>"]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(byte_pieces), special_tokens=specials, show_progress=False)
    trained.train_from_iterator([t.encode("ascii", "ignore").decode() for t in corpus], trainer=trainer)
    model = json.loads(trained.to_str())["model"]
    learned = sorted(((t, i) for t, i in model["vocab"].items() if t not in specials), key=lambda x: x[1])
    vocab = {t: i for i, t in enumerate(specials + byte_pieces + [t for t, _ in learned])}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(specials)
    return _save_tokenizer(tok, out, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _save_tokenizer(tok, out: Path, **special):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return AutoTokenizer.from_pretrained(str(out), local_files_only=True)


# ------------------------------------------------------------------------------------------ models


def _pack(tokenizer, docs: list[str], ctx: int) -> list[list[int]]:
    bos = tokenizer.bos_token_id
    seqs, buf = [], []
    for text in docs:
        buf += tokenizer(text, add_special_tokens=False)["input_ids"] + [bos]
        while len(buf) >= ctx - 1:
            seqs.append([bos] + buf[: ctx - 1])
            buf = buf[ctx - 1 :]
    return seqs


def train_hf(model, sequences: list[list[int]], steps: int, lr: float, seed: int, batch_size: int = 8) -> None:
    """A few AdamW steps of next-token training on the packed sequences (in place)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    data = torch.tensor(sequences, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (batch_size,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def _config(family: str, vocab_size: int, tokenizer, ctx: int):
    from transformers import GPT2Config, GPTBigCodeConfig, LlamaConfig

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=ctx, n_embd=48, n_layer=3, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=ctx, tie_word_embeddings=False, **ids,
        )
    if family == "bigcode":
        return GPTBigCodeConfig(
            vocab_size=vocab_size, n_positions=ctx, n_embd=48, n_layer=2, n_head=4, multi_query=True,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids,
        )
    raise ValueError(family)


def build_family(family: str, out: Path, corpus: dict[str, list[str]], vocab_size: int, ctx: int = 64, seed: int = 0) -> dict[str, Path]:
    """base/ and finetuned/ save_pretrained directories (each with its tokenizer) of one family."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    make_tok = metaspace_tokenizer if family == "llama" else byte_level_tokenizer
    tok_dir = out / "tokenizer"
    tok = make_tok(corpus["english"] + corpus["python"], vocab_size, tok_dir)
    model = AutoModelForCausalLM.from_config(_config(family, len(tok), tok, ctx))
    english, python = _pack(tok, corpus["english"], ctx), _pack(tok, corpus["python"], ctx)
    train_hf(model, english, steps=40, lr=3e-3, seed=seed)
    paths = {"base": out / "base", "finetuned": out / "finetuned"}
    model.save_pretrained(str(paths["base"]))
    tok.save_pretrained(str(paths["base"]))
    train_hf(model, python, steps=25, lr=2e-3, seed=seed + 1)
    model.save_pretrained(str(paths["finetuned"]))
    tok.save_pretrained(str(paths["finetuned"]))
    return paths


def add_chat_tokens(src: Path, out: Path, seed: int = 0) -> Path:
    """A copy of the finetune with ADDED_TOKENS appended to its vocabulary (embeddings resized,
    the new rows trained a little), as chat finetunes do."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(src))
    tok.add_special_tokens({"additional_special_tokens": ADDED_TOKENS})
    model.resize_token_embeddings(len(tok))
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[-len(ADDED_TOKENS) :] = emb[: -len(ADDED_TOKENS)].mean(0) + 0.02 * torch.randn(len(ADDED_TOKENS), emb.shape[1])
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


# ------------------------------------------------------------------------------------------ SAEs


def hook_activations(model_dir: Path, hook: str, corpus: list[str], ctx: int = 32, n_seq: int = 32):
    """[n_tokens, d] activations of a save_pretrained model at a TransformerLens hook, loaded by the project."""
    import torch

    from explorer.models import ModelSpec, load_model

    model = load_model(ModelSpec(path=str(model_dir)))
    seqs = _pack(model.tokenizer, corpus, ctx)[:n_seq]
    store = {}
    with torch.no_grad():
        model.run_with_hooks(torch.tensor(seqs), return_type=None, fwd_hooks=[(hook, lambda a, hook: store.setdefault("x", a))])
    return store["x"].reshape(-1, store["x"].shape[-1])


def write_sae(out: Path, acts, hook: str, d_sae: int, kind: str = "standard", k: int = 8, seed: int = 0,
              model_name: str = "tiny", normalize_activations: str = "none", context_size: int = 64, prepend_bos: bool = True) -> Path:
    """An SAELens SAE directory at `hook`: decoder rows = normalised activations (centred), encoder
    = the decoder's transpose, b_dec = the activation mean, thresholds at zero."""
    import torch
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    g = torch.Generator().manual_seed(seed)
    acts = acts.float()
    mean = acts.mean(0)
    rows = (acts - mean)[torch.randint(0, len(acts), (d_sae,), generator=g)]
    rows = rows + 0.05 * rows.norm(dim=1, keepdim=True).mean() * torch.randn(rows.shape, generator=g)
    w_dec = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-6)
    d_in = acts.shape[1]
    common = dict(d_in=d_in, d_sae=d_sae, normalize_activations=normalize_activations, dtype="float32", device="cpu")
    sae = TopKSAE(TopKSAEConfig(k=k, **common)) if kind == "topk" else StandardSAE(StandardSAEConfig(**common))
    meta = sae.cfg.metadata
    meta.hook_name, meta.model_name, meta.context_size, meta.prepend_bos = hook, model_name, context_size, prepend_bos
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T)
        sae.b_dec.copy_(mean)
        sae.b_enc.fill_(-0.1 * float((acts - mean).norm(dim=1).mean()) / (d_in**0.5))
    out.mkdir(parents=True, exist_ok=True)
    sae.save_model(str(out))
    return out


def write_text_corpus(out: Path, corpus: dict[str, list[str]]) -> Path:
    """A Parquet corpus with `text` and `source` columns (English docstrings and Python source)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [("english", t) for t in corpus["english"]] + [("python", t) for t in corpus["python"]]
    pq.write_table(pa.table({"source": [r[0] for r in rows], "text": [r[1] for r in rows]}), out)
    return out


# ------------------------------------------------------------------------------------------ all of it


@dataclass
class HFModels:
    root: Path
    gpt2: dict[str, Path]
    llama: dict[str, Path]
    bigcode: dict[str, Path]
    saes: dict[str, Path] = field(default_factory=dict)
    corpus: Path | None = None

    def to_json(self) -> str:
        return json.dumps({k: (str(v) if isinstance(v, Path) else {a: str(b) for a, b in v.items()}) for k, v in self.__dict__.items()})


GPT2_HOOK = "blocks.1.hook_resid_post"
GPT2_MLP_HOOK = "blocks.1.hook_mlp_out"
LLAMA_HOOK = "blocks.1.hook_resid_pre"


def build_all(out: Path, vocab_size: int = 3000) -> HFModels:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is several times faster on a busy machine
    try:
        return _build_all(out, vocab_size)
    finally:
        torch.set_num_threads(threads)


def _build_all(out: Path, vocab_size: int) -> HFModels:
    corpus = texts()
    gpt2 = build_family("gpt2", out / "gpt2", corpus, vocab_size)
    gpt2["finetuned_added"] = add_chat_tokens(gpt2["finetuned"], out / "gpt2" / "finetuned_added")
    llama = build_family("llama", out / "llama", corpus, 600)
    bigcode = build_family("bigcode", out / "bigcode", corpus, 600)
    models = HFModels(out, gpt2, llama, bigcode, corpus=write_text_corpus(out / "corpus.parquet", corpus))
    acts = hook_activations(gpt2["base"], GPT2_HOOK, corpus["english"])
    models.saes["gpt2_relu"] = write_sae(out / "saes" / "gpt2_relu", acts, GPT2_HOOK, d_sae=96)
    models.saes["gpt2_topk"] = write_sae(out / "saes" / "gpt2_topk", acts, GPT2_HOOK, d_sae=144, kind="topk", seed=1)
    mlp = hook_activations(gpt2["base"], GPT2_MLP_HOOK, corpus["english"])
    models.saes["gpt2_mlp"] = write_sae(out / "saes" / "gpt2_mlp", mlp, GPT2_MLP_HOOK, d_sae=64, kind="topk", seed=2)
    lacts = hook_activations(llama["base"], LLAMA_HOOK, corpus["english"])
    models.saes["llama"] = write_sae(out / "saes" / "llama", lacts, LLAMA_HOOK, d_sae=64)
    return models
