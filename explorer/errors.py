"""User-facing errors.

Every problem a researcher can cause with a config, a path or a URL is raised as an
`ExplorerError` subclass whose message names the problem and the fix. The CLI prints the
message and exits non-zero; the app shows it with `st.error`. Nothing else should reach a user.
"""

from __future__ import annotations


class ExplorerError(Exception):
    """Base class: the message is meant for the user, as is."""


class ConfigError(ExplorerError):
    """A config has unknown keys, wrong types or impossible values."""


class UnknownModelError(ExplorerError):
    """A TransformerLens model name that TransformerLens does not know."""


class MissingPathError(ExplorerError):
    """A local path in a spec or config does not exist or lacks a required file."""


class HookNotFoundError(ExplorerError):
    """The hook point is not a hook of the model."""


class HookMismatchError(ExplorerError):
    """An SAE is asked to run at another hook than the one it was trained at."""


class DimensionMismatchError(ExplorerError):
    """The SAE's d_in differs from the model's width at the hook."""


class TokenizerMismatchError(ExplorerError):
    """The base and finetuned tokenizers disagree beyond the allowed threshold."""


class UnknownSAEError(ExplorerError):
    """An SAELens release or SAE id that SAELens does not list."""


class CorpusError(ExplorerError):
    """The corpus is missing, empty, malformed or smaller than requested."""


class RunError(ExplorerError):
    """A run directory is missing, incomplete, corrupted or of another schema version."""
