"""tomediff: training-free token merging (ToMe) for diffusion models.

>>> import tomediff
>>> handle = tomediff.apply_tome(pipe, ratio=0.5)   # doctest: +SKIP
>>> handle.remove()                                  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from tomediff.errors import (
    CLIUsageError,
    ConfigError,
    ConflictingPatchError,
    MergeCallError,
    NothingToPatchError,
    ResumeMismatchError,
    TomediffError,
    UnknownOptionError,
    UnsupportedModelError,
)

if TYPE_CHECKING:
    from tomediff.api import (
        BlockReport,
        ToMeHandle,
        ToMeReport,
        apply_patch,
        apply_reducer,
        apply_tome,
        remove_patch,
        remove_tome,
        tome,
    )
    from tomediff.config import ToMeConfig

__version__ = "0.1.0"

# Public names that need torch, and the module defining each. They are imported on first use (PEP 562)
# so that what needs none of them (`tomediff --help`, a usage error, `import tomediff.errors`) does not
# wait seconds for torch and diffusers.
_LAZY: dict[str, str] = {
    **dict.fromkeys(
        (
            "BlockReport",
            "ToMeHandle",
            "ToMeReport",
            "apply_patch",
            "apply_reducer",
            "apply_tome",
            "remove_patch",
            "remove_tome",
            "tome",
        ),
        "tomediff.api",
    ),
    "ToMeConfig": "tomediff.config",
}

__all__ = [
    "BlockReport",
    "CLIUsageError",
    "ConfigError",
    "ConflictingPatchError",
    "MergeCallError",
    "NothingToPatchError",
    "ResumeMismatchError",
    "ToMeConfig",
    "ToMeHandle",
    "ToMeReport",
    "TomediffError",
    "UnknownOptionError",
    "UnsupportedModelError",
    "__version__",
    "apply_patch",
    "apply_reducer",
    "apply_tome",
    "remove_patch",
    "remove_tome",
    "tome",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # `import tomediff; tomediff.ops...` worked while this file imported everything eagerly.
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
