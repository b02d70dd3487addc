"""tomediff: training-free token merging (ToMe) for diffusion models.

>>> import tomediff
>>> handle = tomediff.apply_tome(pipe, ratio=0.5)   # doctest: +SKIP
>>> handle.remove()                                  # doctest: +SKIP
"""

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

__version__ = "0.1.0"

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
