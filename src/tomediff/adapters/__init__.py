"""Model families tomediff knows, one adapter each, found through a registry.

Adding a family (e.g. SD3's ``JointTransformerBlock`` or Flux's double/single-stream blocks) is a new
module here that subclasses :class:`Adapter`, returns :class:`~tomediff.core.BlockSpec`s (with
custom :class:`~tomediff.core.Site`s where only image tokens merge) and is decorated with
:func:`register_adapter`; the core does not change.
"""

from tomediff.adapters import (
    diffusers_controlnets,
    diffusers_dit,
    diffusers_image,
    diffusers_mmdit,
    diffusers_unet,
    diffusers_video,
    generic,
    ldm,
)
from tomediff.adapters.base import (
    Adapter,
    adapters,
    find_adapter,
    pipeline_caller,
    register_adapter,
    resolve_model,
)

__all__ = [
    "Adapter",
    "adapters",
    "diffusers_controlnets",
    "diffusers_dit",
    "diffusers_image",
    "diffusers_mmdit",
    "diffusers_unet",
    "diffusers_video",
    "find_adapter",
    "generic",
    "ldm",
    "pipeline_caller",
    "register_adapter",
    "resolve_model",
]
