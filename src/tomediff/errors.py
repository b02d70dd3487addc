"""The library's own exception classes.

Every error tomediff raises on purpose is a :class:`TomediffError`, so ``except tomediff.TomediffError``
catches exactly those. Each subclass also derives from the built-in exception it has always been
(``ValueError``, ``TypeError`` or ``RuntimeError``), so existing ``except ValueError`` code keeps working.

>>> import tomediff
>>> try:
...     tomediff.ToMeConfig(ratio=2.0)
... except tomediff.ConfigError as error:
...     print(type(error).__mro__[1:3])
(<class 'tomediff.errors.TomediffError'>, <class 'ValueError'>)
"""

from __future__ import annotations

__all__ = [
    "CLIUsageError",
    "ConfigError",
    "ConflictingPatchError",
    "MergeCallError",
    "NothingToPatchError",
    "ResumeMismatchError",
    "TomediffError",
    "UnknownOptionError",
    "UnsupportedModelError",
]


class TomediffError(Exception):
    """Base class of every error raised by tomediff on purpose."""


class ConfigError(TomediffError, ValueError):
    """A setting is out of range or of the wrong type (``ratio=2``, ``sx=0``, ``seed=2**64``, ...)."""


class UnknownOptionError(TomediffError, TypeError):
    """A keyword that is not a :class:`~tomediff.ToMeConfig` field (``apply_tome(model, ratoi=0.5)``)."""


class UnsupportedModelError(TomediffError, TypeError):
    """The object holds no transformer block any registered adapter knows."""


class NothingToPatchError(TomediffError, ValueError):
    """The settings select no block or no merge site of the model, so merging would do nothing."""


class ConflictingPatchError(TomediffError, RuntimeError):
    """The model is already patched by another token-merging implementation (tomesd), or carries
    another library's hook that merging cannot work with (a diffusers cache replaying the output of a
    merge site)."""


class MergeCallError(TomediffError, RuntimeError):
    """A patched model was called in a way merging cannot handle (feed-forward chunking with
    ``merge_mlp``, a token count whose grid cannot be known)."""


class ResumeMismatchError(TomediffError, RuntimeError):
    """``tomediff eval`` found finished results in ``--out`` made with different settings."""


class CLIUsageError(TomediffError, ValueError):
    """A command-line argument is invalid; the CLIs print the message and exit with status 2."""
