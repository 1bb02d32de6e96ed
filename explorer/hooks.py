"""What a hook point is, in words, for the pages (no torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HookKind:
    label: str  # e.g. "residual stream", "MLP out"
    residual: bool  # a residual-stream hook: Study T's residual-stream numbers compare


_KINDS = {
    "hook_resid_pre": HookKind("residual stream", True),
    "hook_resid_mid": HookKind("residual stream", True),
    "hook_resid_post": HookKind("residual stream", True),
    "hook_mlp_out": HookKind("MLP out", False),
    "hook_attn_out": HookKind("attention out", False),
    "hook_z": HookKind("attention hook_z (per-head outputs before W_O)", False),
    "hook_post": HookKind("MLP hidden activations", False),
}


def hook_kind(hook: str | None) -> HookKind:
    """The kind of activation a TransformerLens hook name reads, e.g. blocks.6.hook_mlp_out -> MLP out."""
    last = str(hook or "").rsplit(".", 1)[-1]
    return _KINDS.get(last, HookKind(f"activation at {hook}" if hook else "activation", False))
