"""tomediff's ComfyUI node pack: token merging (ToMe) and downsampling (ToDo) that hook the diffusion
model only while the patched model samples. Needs the ``tomediff`` package (``pip install tomediff``);
inside a git clone of the tomediff repository its ``src`` folder is used when it is not installed."""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import tomediff  # noqa: F401
except ImportError:  # a git clone of the repository: use its own source
    _SOURCE = Path(__file__).resolve().parents[2] / "src"
    if not (_SOURCE / "tomediff" / "__init__.py").is_file():
        raise
    sys.path.append(str(_SOURCE))

from .tome_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
