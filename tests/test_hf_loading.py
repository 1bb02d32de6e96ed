"""Models as users bring them (explorer/hf_loading.py, explorer/models.py), on tiny Hugging Face
models the session builds (tests/hf_models.py): every loader against Hugging Face's own forward,
processing against SAELens's convention, named architectures, LoRA adapters, devices, and hub
failures simulated without a network (an unreachable endpoint, a local server answering as the
hub does for gated and unknown repositories)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from explorer import hf_loading as H
from explorer import models as M
from explorer.errors import ConfigError, HookMismatchError, TokenizerMismatchError

REPO = Path(__file__).resolve().parent.parent
TEXT = "The parser fixed a crash. def f(x):\n    return x + 1\n"


def hf_reference(model_dir: Path, ids: torch.Tensor):
    """Hugging Face's own forward (eager attention, as TransformerBridge runs it): (hidden_states, logits)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager")
    hf.eval()
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
    return out.hidden_states, out.logits


def tokens_of(model, text: str = TEXT) -> torch.Tensor:
    tok = model.tokenizer
    return torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])


@pytest.mark.parametrize("family, loader", [("gpt2", "HookedTransformer"), ("llama", "HookedTransformer"), ("bigcode", "TransformerBridge")])
def test_hf_dir_without_processing_equals_hugging_face(hf_models, family, loader):
    """A save_pretrained directory loads with no conversion step; with no processing its hook
    activations are HF's hidden_states and its logits HF's (1e-5)."""
    path = getattr(hf_models, family)["base"]
    model, info = M.load_model_with_info(M.ModelSpec(path=str(path)))
    assert info["loader"] == loader and info["format"] == "huggingface save_pretrained"
    ids = tokens_of(model)
    hidden, logits = hf_reference(path, ids)
    with torch.no_grad():
        tl_logits, cache = model.run_with_cache(ids)
    n = model.cfg.n_layers
    for layer in range(n):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], hidden[layer], atol=1e-5, rtol=0)
    torch.testing.assert_close(tl_logits, logits, atol=1e-5, rtol=0)
    assert not model.training


def test_processing_follows_the_sae_and_keeps_the_function(hf_models, tmp_path):
    """processing="auto": SAELens 6's from_pretrained_no_processing(**model_from_pretrained_kwargs).
    An SAE asking for fold_ln + center_writing_weights gets a folded model (LNPre), whose
    log-probabilities are still HF's while its residual stream is centred (another basis)."""
    from sae_lens import SAE

    src = hf_models.saes["gpt2_relu"]
    sae = SAE.load_from_disk(str(src))
    sae.cfg.metadata.model_from_pretrained_kwargs = {"fold_ln": True, "center_writing_weights": True, "n_devices": 1}
    sae.save_model(str(tmp_path / "sae"))
    gpt2 = hf_models.gpt2
    pair = M.load_pair(M.ModelSpec(path=str(gpt2["base"])), M.ModelSpec(path=str(gpt2["finetuned"])), M.SAESpec(path=str(tmp_path / "sae")))
    flags = pair.loading["processing"]
    assert flags == {**H.NO_PROCESSING, "fold_ln": True, "center_writing_weights": True}
    assert "model_from_pretrained_kwargs" in pair.loading["processing_source"]
    assert any("n_devices" in w for w in pair.warnings)  # not a processing flag: said, not silently dropped
    for m in ("base", "finetuned"):
        model = getattr(pair, m)
        assert model.cfg.normalization_type == "LNPre"
        ids = tokens_of(model)
        hidden, logits = hf_reference(gpt2[m], ids)
        with torch.no_grad():
            tl_logits, cache = model.run_with_cache(ids)
        torch.testing.assert_close(tl_logits.log_softmax(-1), logits.log_softmax(-1), atol=1e-4, rtol=0)
        resid = cache["blocks.1.hook_resid_pre"]
        assert resid.mean(-1).abs().max() < 1e-5  # centred writing weights: a zero-mean residual stream
        assert (resid - hidden[1]).abs().max() > 1e-3
    none = M.load_pair(
        M.ModelSpec(path=str(gpt2["base"])), M.ModelSpec(path=str(gpt2["finetuned"])), M.SAESpec(path=str(tmp_path / "sae")), processing="none"
    )
    assert none.loading["processing"] == H.NO_PROCESSING and none.base.cfg.normalization_type == "LN"


def test_resolve_processing_names():
    assert H.resolve_processing("transformer_lens")[0] == H.TRANSFORMER_LENS_PROCESSING
    assert H.resolve_processing({"center_unembed": True})[0] == {**H.NO_PROCESSING, "center_unembed": True}
    with pytest.raises(ConfigError, match="unknown flag"):
        H.resolve_processing({"fold_layernorm": True})
    with pytest.raises(ConfigError, match="processing must be one of"):
        H.resolve_processing("folded")


def _fake_hub_cache(cache: Path, repo: str, config: dict) -> None:
    """A Hugging Face hub cache holding one repository's config.json (the layout huggingface_hub writes)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    rev = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(rev)
    snap = folder / "snapshots" / rev
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(config))


def test_named_architecture_with_a_local_finetune(hf_models, tmp_path, monkeypatch):
    """name = "gpt2" + hf_model = <dir>: the finetune's weights in the named architecture; the named
    config comes from the hub cache (here a cache laid out by hand, offline), and one that
    disagrees with the finetune's is a clear error."""
    import huggingface_hub.constants as hub_constants

    own = json.loads((hf_models.gpt2["finetuned"] / "config.json").read_text())
    cache = tmp_path / "cache"
    _fake_hub_cache(cache, "gpt2", {**own, "n_ctx": own["n_positions"]})
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    model, info = M.load_model_with_info(M.ModelSpec(name="gpt2", hf_model=str(hf_models.gpt2["finetuned"])))
    assert info["loader"] == "HookedTransformer" and model.cfg.n_layers == own["n_layer"]
    ids = tokens_of(model)
    _, logits = hf_reference(hf_models.gpt2["finetuned"], ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), logits, atol=1e-5, rtol=0)
    # the real gpt2 config (12 layers of 768) is not this finetune's
    cache2 = tmp_path / "cache2"
    _fake_hub_cache(cache2, "gpt2", {**own, "n_layer": 12, "n_embd": 768, "n_head": 12, "n_ctx": 1024, "n_positions": 1024})
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache2))
    with pytest.raises(ConfigError, match="is not a gpt2 model.*n_layers: 12 vs 3"):
        M.load_model(M.ModelSpec(name="gpt2", hf_model=str(hf_models.gpt2["finetuned"])))
    # Llama-3.2-1B's config is TransformerLens's own (no download): a tiny Llama disagrees with it
    with pytest.raises(ConfigError, match="is not a meta-llama/Llama-3.2-1B model"):
        M.load_model(M.ModelSpec(name="meta-llama/Llama-3.2-1B", hf_model=str(hf_models.llama["base"])))


def test_hub_spec_loads_through_the_bridge_from_the_cache(hf_models, tmp_path, monkeypatch):
    """hub = "<id>": TransformerBridge on the hub repository; here the repository is in a hub cache
    laid out by hand (offline), with every file of a save_pretrained directory."""
    import shutil

    import huggingface_hub.constants as hub_constants

    src = hf_models.gpt2["base"]
    cache = tmp_path / "cache"
    _fake_hub_cache(cache, "tiny-org/tiny-gpt2", json.loads((src / "config.json").read_text()))
    snap = next((cache / "models--tiny-org--tiny-gpt2" / "snapshots").iterdir())
    for f in src.iterdir():
        shutil.copy(f, snap / f.name)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    model, info = M.load_model_with_info(M.ModelSpec(hub="tiny-org/tiny-gpt2"))
    assert info["loader"] == "TransformerBridge" and info["format"] == "hub"
    ids = tokens_of(model)
    hidden, logits = hf_reference(src, ids)
    with torch.no_grad():
        got, cache_acts = model.run_with_cache(ids)
    torch.testing.assert_close(got, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache_acts["blocks.1.hook_resid_pre"], hidden[1], atol=1e-5, rtol=0)


def test_named_model_not_in_the_cache_is_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(H.HubError) as exc:
        M.load_model(M.ModelSpec(name="gpt2"))
    assert "not in the local Hugging Face cache" in str(exc.value) and "\n" not in str(exc.value)


def test_lora_adapter_is_merged_or_refused(hf_models, tmp_path, monkeypatch):
    """A PEFT LoRA adapter directory loads merged into its base (equal to peft's own merged model);
    without peft it is refused with what to do."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base_dir = hf_models.gpt2["base"]
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    lora.save_pretrained(str(adapter))
    merged = lora.merge_and_unload()
    merged.eval()
    model, info = M.load_model_with_info(M.ModelSpec(path=str(adapter)))
    assert info["format"] == "peft adapter merged into its base model" and info["loader"] == "HookedTransformer"
    ids = tokens_of(model)
    with torch.no_grad():
        want = merged(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(base_dir))(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - plain).abs().max() > 1e-3  # the adapter changed the model
    monkeypatch.setitem(sys.modules, "peft", None)  # peft not installed
    with pytest.raises(ConfigError, match="is a LORA adapter .* peft is not installed"):
        M.load_model(M.ModelSpec(path=str(adapter)))


def test_devices():
    assert H.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    assert H.resolve_device("CPU") == "cpu"
    for bad, msg in (("tpu", "device must be one of"), ("cuda:x", "device must be one of"), ("", "device must be one of")):
        with pytest.raises(ConfigError, match=msg):
            H.resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            H.resolve_device("cuda")
    with pytest.raises(ConfigError, match="dtype must be one of"):
        H.check_dtype("float8")


def test_bf16_model_on_cpu_is_close_to_float32(hf_models):
    path = str(hf_models.gpt2["base"])
    m32 = M.load_model(M.ModelSpec(path=path))
    m16 = M.load_model(M.ModelSpec(path=path), dtype="bfloat16")
    assert m16.cfg.dtype == torch.bfloat16 and next(m16.parameters()).dtype == torch.bfloat16
    ids = tokens_of(m32)
    with torch.no_grad():
        l32, l16 = m32(ids, return_type="loss").item(), m16(ids, return_type="loss").item()
    assert abs(l16 - l32) < 0.05 * l32


def test_hook_of_another_layer_is_an_error_unless_allowed(hf_models):
    g = hf_models.gpt2
    specs = dict(base=M.ModelSpec(path=str(g["base"])), finetuned=M.ModelSpec(path=str(g["finetuned"])), base_sae=M.SAESpec(path=str(hf_models.saes["gpt2_relu"])))
    with pytest.raises(HookMismatchError, match="trained at 'blocks.1.hook_resid_post'.*hook is 'blocks.0.hook_resid_post'"):
        M.load_pair(**specs, hook="blocks.0.hook_resid_post")
    pair = M.load_pair(**specs, hook="blocks.0.hook_resid_post", allow_hook_mismatch=True)
    assert pair.hook == "blocks.0.hook_resid_post" and any("allow_hook_mismatch" in w for w in pair.warnings)
    # two SAEs at different hooks, no hook in the config: the finetuned SAE's is checked too
    with pytest.raises(HookMismatchError, match="finetuned_sae was trained at 'blocks.1.hook_mlp_out'"):
        M.load_pair(**specs, finetuned_sae=M.SAESpec(path=str(hf_models.saes["gpt2_mlp"])))


def test_added_tokens_share_the_base_vocabulary(hf_models):
    """3,002 vs 3,000 (two chat tokens added at the end): the pair loads, logits share ids 0..2999."""
    g = hf_models.gpt2
    pair = M.load_pair(M.ModelSpec(path=str(g["base"])), M.ModelSpec(path=str(g["finetuned_added"])), M.SAESpec(path=str(hf_models.saes["gpt2_relu"])))
    v = pair.loading["vocabulary"]
    assert (v["n_base"], v["n_finetuned"], v["n_shared"]) == (3000, 3002, 3000) and pair.shared_vocab == 3000
    assert v["added_at_end"] == {"model": "finetuned", "n": 2, "tokens": ["<|im_start|>", "<|im_end|>"]}


def test_tokens_inside_the_vocabulary_that_differ_fail_before_any_work(hf_models, tmp_path):
    """A finetune whose shared ids name other tokens (renumbered) is refused by load_pair."""
    from transformers import AutoTokenizer

    src = hf_models.gpt2["finetuned"]
    other = tmp_path / "renumbered"
    import shutil

    shutil.copytree(src, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    items = sorted(vocab.items(), key=lambda kv: kv[1])
    # swap the ids of 5% of the learned tokens pairwise
    learned = [kv for kv in items if kv[1] >= 300][:150]
    for (a, ia), (b, ib) in zip(learned[0::2], learned[1::2]):
        vocab[a], vocab[b] = ib, ia
    (other / "tokenizer.json").write_text(json.dumps(tok))
    assert AutoTokenizer.from_pretrained(str(other)).convert_ids_to_tokens(learned[0][1]) == learned[1][0]
    with pytest.raises(TokenizerMismatchError):
        M.load_pair(M.ModelSpec(path=str(hf_models.gpt2["base"])), M.ModelSpec(path=str(other)), M.SAESpec(path=str(hf_models.saes["gpt2_relu"])), min_matching_id_share=0.99)


def test_unrecognised_directory_says_what_a_model_directory_holds(tmp_path):
    d = tmp_path / "weights_only"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (d / "model.safetensors").write_bytes(b"")
    (d / "tokenizer").mkdir()
    with pytest.raises(ConfigError, match="neither a Hugging Face config"):
        M.load_model(M.ModelSpec(path=str(d)))
    hf = tmp_path / "no_tokenizer"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (hf / "model.safetensors").write_bytes(b"")
    from explorer.errors import MissingPathError

    with pytest.raises(MissingPathError, match="no tokenizer files"):
        M.load_model(M.ModelSpec(path=str(hf)))


# ----------------------------------------------------------------------------- hub failures


class _FakeHub(BaseHTTPRequestHandler):
    """Answers as the hub does: gated repositories 401 + X-Error-Code GatedRepo, others 404 RepoNotFound."""

    def _answer(self):
        gated = "/gated-org/" in self.path
        self.send_response(401 if gated else 404)
        self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
        self.send_header("X-Error-Message", "Access to model is restricted" if gated else "Repository not found")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *a):  # quiet
        pass


@pytest.fixture(scope="module")
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _cli(tmp_path, config: str, endpoint: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "hub.toml"
    cfg.write_text(config)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_ETAG_TIMEOUT="3", HF_HUB_DOWNLOAD_TIMEOUT="3")
    return subprocess.run(
        [sys.executable, "-m", "precompute", "run", "--config", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--no-progress", "--device", "cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )


def _hub_config(base: str, sae: str = "") -> str:
    return f"""run_id = "hub"
[models.base]
hub = "{base}"
[models.finetuned]
hub = "{base}"
[saes.base_sae]
{sae or 'path = "/nonexistent-sae"'}
[corpus]
path = "{REPO / 'data/demo/eval_corpus.parquet'}"
[sample]
n_tokens = 256
context_size = 32
"""


@pytest.mark.parametrize(
    "case, base, sae, message",
    [
        ("gated", "gated-org/model", "", "is gated and HF_TOKEN is not set"),
        ("unknown repository", "nobody/no-such-model", "", "no such repository on the Hugging Face hub"),
        ("unknown SAELens release", "nobody/no-such-model", 'release = "no-such-release"\nsae_id = "x"', "SAELens lists no release 'no-such-release'"),
        ("network down", "nobody/model", "", "cannot be reached"),
    ],
)
def test_hub_failures_are_one_line_exit_2(hf_models, tmp_path, fake_hub, case, base, sae, message):
    # the SAE is local and valid except in the SAELens case, so the model load is what fails
    sae = sae or f'path = "{hf_models.saes["gpt2_relu"]}"'
    endpoint = f"http://127.0.0.1:{_closed_port()}" if case == "network down" else fake_hub
    proc = _cli(tmp_path, _hub_config(base, sae), endpoint)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and message in err[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_an_unreachable_hub_fails_in_seconds_not_after_the_clients_retries(monkeypatch, tmp_path):
    """check_hub_reachable: a refused connection to HF_ENDPOINT is the one-line error at once
    (huggingface_hub alone retries ~23 s per file); a proxy, HF_HUB_OFFLINE or a cached
    repository skip the check (the hub client knows better there)."""
    import time as _time

    from explorer import hf_loading as H

    for v in H._PROXY_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    t0 = _time.monotonic()
    with pytest.raises(H.HubError, match="not in the local Hugging Face cache and the hub .* cannot be reached"):
        H.check_hub_reachable("nobody/model", "model nobody/model")
    assert _time.monotonic() - t0 < 10
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    H.check_hub_reachable("nobody/model", "model nobody/model")  # a proxy: not checked
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    H.check_hub_reachable("nobody/model", "model nobody/model")
