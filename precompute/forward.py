"""Stage 2a, the models: each model's clean, spliced and zero-ablated per-token losses and its
activation at the hook (`ModelRunner`).

Speed: for `hook_resid_pre` / `hook_resid_post` hooks the spliced and zero-ablated losses run
the model from the hook's layer on (`start_at_layer`) with the replaced residual, instead of a
full hooked forward; tests check both give the same loss. Other hooks use the hooked forward.
On that path the zero-ablated loss is one single-position forward from the hook on (a zero
residual at every position makes every later position identical, so the logits are the same
everywhere; `ModelRunner.zero_loss`), not a full-batch pass: B2 (benchmarks/RESULTS.md).
A TransformerBridge has no `start_at_layer`: it always takes the hooked forward.
At `attn.hook_z` (and hook_q/k/v) the activation [B, C, n_heads, d_head] is handed out flattened
to [B, C, n_heads * d_head], the SAE's d_in, and a replacement is reshaped back before it is
spliced in (prepare.py turns off SAELens's own hook_z reshaping for the stream's SAEs).

Dtype boundary: the model runs in its own dtype (float32, bfloat16, float16), but everything a
runner returns is float32 (activations at the hook, per-token losses), so that every statistic
downstream accumulates in float32/float64 whatever the model's dtype; a replacement activation
handed back (the SAE's reconstruction) is cast to the model's dtype before it is spliced in.
"""

from __future__ import annotations

CE_CHUNK_BYTES = 1 << 20  # logits per chunk of the loss: 64 positions of a 4096-token vocabulary ...
CE_MIN_ROWS = 128  # ... but never fewer positions than this: with 8 rows of a 32k vocabulary the unembed
# matmul streams all of W_U per chunk and ran at 12 GFLOPS instead of 80 (B7); results are bitwise
# the same for any chunk size (each row's logits are one row of the matmul)




def hook_start_layer(hook: str, n_layers: int) -> int | None:
    """The layer whose input residual IS the hook's activation (resid_pre L -> L, resid_post L -> L+1)."""
    parts = hook.split(".")
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
        layer = int(parts[1])
        if parts[2] == "hook_resid_pre":
            return layer
        if parts[2] == "hook_resid_post":
            return layer + 1
    return None


class ModelRunner:
    """Clean, spliced and zero-ablated losses of one model, and its activation at the hook."""

    def __init__(self, model, hook: str, fast: bool = True):
        from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name

        from transformer_lens import HookedTransformer

        self.model, self.hook = model, hook
        self.start_layer = hook_start_layer(hook, model.cfg.n_layers)
        tok = model.tokenizer
        self.dtype = next(model.parameters()).dtype
        self.per_head = hook.endswith(("hook_z", "hook_q", "hook_k", "hook_v"))
        self.shape = None  # the hook's own activation shape [B, C, ...] of the last batch
        self.fast = (
            fast
            and isinstance(model, HookedTransformer)
            and self.start_layer is not None
            and model.cfg.positional_embedding_type != "shortformer"
            and not (tok is not None and getattr(tok, "padding_side", "right") == "left")
        )
        self.stop_at = extract_stop_at_layer_from_tlens_hook_name(hook)
        # Our own head (ln_final, unembed, log-softmax, gather) on the blocks' output: only where
        # the hook is in the blocks and the logits are not soft-capped (TL's loss otherwise).
        cap = getattr(model.cfg, "output_logits_soft_cap", None)
        self.own_head = self.fast and not (cap is not None and cap > 0)

    def final_hook(self) -> str:
        """The hook holding the residual the unembedding reads: ln_final's output, or the last block's."""
        cfg = self.model.cfg
        return "ln_final.hook_normalized" if cfg.normalization_type is not None else f"blocks.{cfg.n_layers - 1}.hook_resid_post"

    def log_probs(self, h):
        """Next-token log-probabilities from the normalized final residual h [N, d]: the unembed
        as `Unembed.forward` computes it, the logit soft cap where the model has one, log-softmax."""
        import torch

        model = self.model
        if getattr(self, "_w_t", None) is None:  # W_U transposed once per run, not per call
            self._w_t = model.unembed.W_U.T.contiguous()
        logits = torch.nn.functional.linear(h, self._w_t, model.unembed.b_U).float()  # float32 log-softmax whatever the model's dtype
        cap = getattr(model.cfg, "output_logits_soft_cap", None)
        if cap is not None and cap > 0:
            logits = cap * torch.tanh(logits / cap)
        return logits.log_softmax(-1)

    def clean_final(self, tokens):
        """(per-token clean loss [B, C-1] or None, activation at the hook [B, C, d], normalized
        final residual [B, C, d_model]). On the own-head path the loss is left to
        `clean_losses_and_kl` (computed there with the KL, from the same logits)."""
        store = {}

        def grab(name):
            def f(act, hook):  # noqa: ARG001
                store[name] = act.detach().clone()
                return act

            return f

        if self.own_head:
            resid = self.model.run_with_hooks(tokens, stop_at_layer=self.model.cfg.n_layers, fwd_hooks=[(self.hook, grab("x"))])
            h = self.model.ln_final(resid) if self.model.cfg.normalization_type is not None else resid
            return None, self._out(store["x"]), h
        loss = self.model.run_with_hooks(
            tokens, return_type="loss", loss_per_token=True, fwd_hooks=[(self.hook, grab("x")), (self.final_hook(), grab("h"))]
        )
        return loss.float(), self._out(store["x"]), store["h"]

    def head_loss(self, resid, tokens):
        """Per-token loss [B, C-1] from the residual after the last block, as TransformerLens's
        forward computes it (ln_final, the unembed as `Unembed.forward` does it, log-softmax,
        gather of the next token), but in chunks of positions whose logits fit in cache, never
        materialising [B, C, d_vocab], and without the last position's logits (no next token).
        Equal to TL's `return_type="loss"` to float32 rounding (bitwise on the demo); B2."""
        import torch

        model = self.model
        if model.cfg.normalization_type is not None:
            resid = model.ln_final(resid)
        n_b, n_ctx, d = resid.shape
        h = resid[:, :-1].reshape(-1, d)
        target = tokens[:, 1:].reshape(-1, 1).to(h.device)
        if getattr(self, "_w_t", None) is None:  # W_U transposed once per run, not per call (a 2.4 GB copy at gemma's 256k vocabulary)
            self._w_t = model.unembed.W_U.T.contiguous()
        W_T, b_U = self._w_t, model.unembed.b_U
        step = max(CE_MIN_ROWS, CE_CHUNK_BYTES // (h.element_size() * W_T.shape[0]))
        out = []
        for i in range(0, h.shape[0], step):
            logits = torch.nn.functional.linear(h[i : i + step], W_T, b_U)
            out.append(logits.float().log_softmax(-1).gather(-1, target[i : i + step]))
        return -torch.cat(out).view(n_b, n_ctx - 1)

    def clean(self, tokens):
        """(per-token loss [B, C-1], activation at the hook [B, C, d])."""
        store = {}

        def grab(act, hook):  # noqa: ARG001
            store["x"] = act.detach().clone()
            return act

        if self.own_head:
            resid = self.model.run_with_hooks(tokens, stop_at_layer=self.model.cfg.n_layers, fwd_hooks=[(self.hook, grab)])
            return self.head_loss(resid, tokens), self._out(store["x"])
        loss = self.model.run_with_hooks(tokens, return_type="loss", loss_per_token=True, fwd_hooks=[(self.hook, grab)])
        return loss.float(), self._out(store["x"])

    def _out(self, x):
        """The hook's activation as the stream sees it: float32, per-head hooks flattened."""
        self.shape = x.shape
        return (x.flatten(2) if self.per_head else x).float()

    def loss_with(self, tokens, x_new):
        """Per-token loss (float32) with the activation at the hook replaced by x_new (cast to the
        model's dtype, per-head hooks reshaped back)."""
        if self.per_head:
            x_new = x_new.reshape(*x_new.shape[:2], *self.shape[2:])
        return self._loss_with(tokens, x_new.to(self.dtype)).float()

    def _loss_with(self, tokens, x_new):
        if self.own_head:
            return self.head_loss(self.model(x_new, start_at_layer=self.start_layer, stop_at_layer=self.model.cfg.n_layers), tokens)
        if self.fast:
            return self.model(x_new, start_at_layer=self.start_layer, tokens=tokens, return_type="loss", loss_per_token=True)

        def replace(act, hook):  # noqa: ARG001
            return x_new

        return self.model.run_with_hooks(tokens, return_type="loss", loss_per_token=True, fwd_hooks=[(self.hook, replace)])

    def zero_loss_counted(self, tokens, x, counted):
        """Per-token loss with the activation zeroed only at counted positions (special tokens such
        as BOS keep theirs, as the splice leaves them): `[evals] zero_ablation = "counted"`."""
        import torch

        return self.loss_with(tokens, torch.where(counted[..., None], torch.zeros_like(x), x))

    def zero_loss(self, tokens, x):
        """Per-token loss with the activation at the hook zeroed at every position.

        Fast path: with every position's residual equal (zero) at the hook, and no positional
        signal added after it (standard/rotary/ALiBi positions act at the embedding or only on
        attention weights; shortformer and left padding are excluded from `fast`), each later
        layer sees identical positions (attention averages identical values), so the logits are
        the same at every position of every sequence: one single-position forward from the hook
        on, then a gather. Equal to the full pass up to float rounding (tests compare it with
        full hooked forwards and SAELens's run_evals); it saves one of the four CE passes per
        model (clean, zero-ablated, spliced per SAE)."""
        if not self.fast:
            import torch

            return self.loss_with(tokens, torch.zeros_like(x))

        logits = self.model(x.new_zeros((1, 1, x.shape[-1]), dtype=self.dtype), start_at_layer=self.start_layer, return_type="logits")
        log_probs = logits[0, 0].float().log_softmax(-1)
        return -log_probs[tokens[:, 1:]]

    def acts(self, tokens):
        """The activation at the hook only (the model stops after the hook's layer)."""
        store = {}

        def grab(act, hook):  # noqa: ARG001
            store["x"] = act.detach().clone()
            return act

        self.model.run_with_hooks(tokens, return_type=None, fwd_hooks=[(self.hook, grab)], stop_at_layer=self.stop_at)
        return self._out(store["x"])


def clean_losses_and_kl(runners: dict[str, "ModelRunner"], finals: dict, losses: dict, tokens):
    """Both models' clean per-token losses and KL(p_base || p_finetuned) per position [B, C-1],
    from their normalized final residuals, in chunks of positions: one chunk's logits of the two
    models at a time, never [B, C, d_vocab] (the loss of a model whose `losses` entry is given is
    kept). The KL sums over the ids both vocabularies have (the tokenizer check makes them the
    same tokens); a finetune's added tokens carry p_base = 0 and add nothing."""
    import torch

    rb, rf = runners["base"], runners["finetuned"]
    hb, hf = finals["base"], finals["finetuned"]
    n_b, n_ctx, d = hb.shape
    xb, xf = hb[:, :-1].reshape(-1, d), hf[:, :-1].reshape(-1, hf.shape[-1])
    target = tokens[:, 1:].reshape(-1, 1).to(xb.device)
    v_common = min(rb.model.cfg.d_vocab, rf.model.cfg.d_vocab)
    vocab = max(rb.model.cfg.d_vocab, rf.model.cfg.d_vocab)
    step = max(CE_MIN_ROWS, CE_CHUNK_BYTES // (4 * vocab))  # float32 logits; at least CE_MIN_ROWS positions per matmul
    out = {"base": [], "finetuned": [], "kl": []}
    for i in range(0, xb.shape[0], step):
        lb, lf = rb.log_probs(xb[i : i + step]), rf.log_probs(xf[i : i + step])
        for m, lp in (("base", lb), ("finetuned", lf)):
            if losses.get(m) is None:
                out[m].append(-lp.gather(-1, target[i : i + step]))
        lb, lf = lb[:, :v_common], lf[:, :v_common]
        # sum_v p_b (log p_b - log p_f): kl_div's one fused pass computes exactly exp(lb) * (lb - lf)
        # (bitwise the unfused expression), 4x faster than its four passes over the vocabulary
        out["kl"].append(torch.nn.functional.kl_div(lf, lb, reduction="none", log_target=True).sum(-1))
    shape = (n_b, n_ctx - 1)
    loss = {m: losses[m] if losses.get(m) is not None else torch.cat(out[m]).view(shape) for m in ("base", "finetuned")}
    return loss, torch.cat(out["kl"]).view(shape)


def runners(pair, hook: str) -> dict[str, ModelRunner]:
    """One ModelRunner per model of a loaded pair (explorer.models.LoadedPair)."""
    return {"base": ModelRunner(pair.base, hook), "finetuned": ModelRunner(pair.finetuned, hook)}
