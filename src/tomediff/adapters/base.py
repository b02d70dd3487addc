"""The adapter registry and the unwrapping of pipelines and LDM wrappers."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from tomediff.adapters.diffusers_caches import BlockCacheCheck, BlockSkipCheck, ReplayedOutputCheck
from tomediff.core import BlockSpec, GridSource, Site
from tomediff.core.spec import Caller
from tomediff.errors import UnsupportedModelError

__all__ = [
    "Adapter",
    "ForwardChunkingCheck",
    "PipelineCaller",
    "adapters",
    "find_adapter",
    "patched_by_tomesd",
    "pipeline_caller",
    "register_adapter",
    "resolve_model",
    "transformer_block_spec",
]


class Adapter:
    """Model knowledge for one family: which blocks to patch, at which level, and their token grid.

    Subclasses implement :meth:`matches` and :meth:`block_specs` and are registered with
    :func:`register_adapter`; the first match by descending ``priority`` wins.
    """

    name: ClassVar[str] = "adapter"
    priority: ClassVar[int] = 0
    # The timestep horizon T of the family (the step schedule's progress is 1 - t / T).
    timestep_scale: ClassVar[float] = 1000.0
    # The family is called with T - t (0 at pure noise, rising to T), e.g. Z-Image and Lumina2.
    timestep_rises: ClassVar[bool] = False
    # use_rand falls back to the top-left partition for an odd batch (tomesd's rule): such a batch may
    # be one half of classifier-free guidance run as its own call, and two halves partitioned apart
    # show artifacts. False for families whose calls carry whole predictions.
    odd_batch_top_left: ClassVar[bool] = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def block_specs(cls, model: nn.Module) -> list[BlockSpec]:
        raise NotImplementedError


_ADAPTERS: list[type[Adapter]] = []


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator adding an adapter to the registry."""
    if any(existing.name == cls.name for existing in _ADAPTERS):
        raise ValueError(  # a programming error in an adapter module, not a user error
            f"an adapter named {cls.name!r} is already registered"
        )
    _ADAPTERS.append(cls)
    _ADAPTERS.sort(key=lambda adapter: -adapter.priority)
    return cls


def adapters() -> tuple[type[Adapter], ...]:
    """Registered adapters, in the order they are tried."""
    return tuple(_ADAPTERS)


def find_adapter(model: nn.Module) -> type[Adapter]:
    for adapter in _ADAPTERS:
        if adapter.matches(model):
            return adapter
    names = ", ".join(a.name for a in _ADAPTERS)
    raise UnsupportedModelError(
        f"tomediff has no adapter for {type(model).__name__}: it contains no transformer block it "
        f"knows (tried: {names}). Pass a diffusers pipeline, UNet2DConditionModel, ControlNetModel, "
        "PixArt/DiT transformer, an LDM model, or a module containing BasicTransformerBlocks."
    )


def class_name_in(module: object, names: set[str]) -> bool:
    """Whether any class in ``module``'s MRO has one of ``names`` (no import of the model library)."""
    return any(klass.__name__ in names for klass in type(module).__mro__)


def resolve_model(obj: Any) -> nn.Module:
    """The module to patch: a pipeline's ``unet``/``transformer``, an LDM wrapper's
    ``model.diffusion_model``, or the module itself."""
    for attr in ("unet", "transformer"):
        candidate = getattr(obj, attr, None)
        if isinstance(candidate, nn.Module) and not isinstance(obj, nn.Module):
            return candidate
    inner = getattr(getattr(obj, "model", None), "diffusion_model", None)
    if isinstance(inner, nn.Module):
        return inner
    if isinstance(obj, nn.Module):
        return obj
    raise UnsupportedModelError(
        f"tomediff cannot patch a {type(obj).__name__}: expected a diffusers pipeline (with .unet or "
        ".transformer), a torch.nn.Module, or an LDM model with .model.diffusion_model."
    )


class PipelineCaller:
    """A diffusers pipeline as the :class:`~tomediff.core.spec.Caller` of the model it holds.

    Nothing is wrapped or added on the pipeline: it is only read, at each model call. It is held weakly,
    so the model's hooks never keep a pipeline (with its other models) alive.
    """

    def __init__(self, pipeline: Any) -> None:
        self.name = type(pipeline).__name__
        try:
            self._pipeline: Callable[[], Any] = weakref.ref(pipeline)
        except TypeError:  # an object that takes no weak reference is kept alive by the patch
            self._pipeline = lambda: pipeline

    def generation(self) -> object | None:
        # Each pipeline call sets its scheduler's timesteps (a new tensor every time), whichever way the
        # last generation ended (interrupted, failed) and wherever the next starts (img2img, custom
        # timesteps): the tensor object names the generation.
        timesteps = getattr(getattr(self._pipeline(), "scheduler", None), "timesteps", None)
        return timesteps if isinstance(timesteps, torch.Tensor) else None

    def guidance(self, sample: object) -> bool | None:
        pipeline = self._pipeline()
        try:
            guided = pipeline.do_classifier_free_guidance
        except AttributeError:  # a pipeline without it, one never called yet (no guidance scale), or gone
            return None
        if not guided:
            return False
        # A guided diffusers pipeline stacks one latent batch twice, [unconditional, conditional]; its
        # other calls (SD3's skip-layer guidance, InstructPix2Pix's three parts) are no such pair.
        if not isinstance(sample, torch.Tensor) or sample.shape[0] % 2:
            return False
        first, second = sample.chunk(2)
        return torch.equal(first, second)


def pipeline_caller(obj: Any) -> Caller | None:
    """The :class:`PipelineCaller` of ``obj`` when it is a pipeline whose ``unet``/``transformer``
    :func:`resolve_model` patches; None for a model given on its own."""
    if isinstance(obj, nn.Module):
        return None
    if any(isinstance(getattr(obj, attr, None), nn.Module) for attr in ("unet", "transformer")):
        return PipelineCaller(obj)
    return None


class ForwardChunkingCheck:
    """Refuses MLP merging while diffusers' feed-forward chunking is on (it calls ``ff`` per chunk,
    so the merged sequence would be split before it could be unmerged)."""

    def __init__(self, block: nn.Module, name: str) -> None:
        self.block = block
        self.name = name

    def __call__(self) -> str | None:
        if getattr(self.block, "_chunk_size", None) is None:
            return None
        # diffusers' UNet2DConditionModel and the DiT transformers have no disable_forward_chunking()
        # (only UNet3D/motion/SD3 models do); every BasicTransformerBlock has set_chunk_feed_forward.
        return (
            f"merge_mlp=True cannot be used while feed-forward chunking is enabled on block '{self.name}' "
            f"(chunk size {self.block._chunk_size}: the feed-forward input is split into chunks before it "
            "could be unmerged). Turn chunking off on that block with "
            f"model.get_submodule('{self.name}').set_chunk_feed_forward(None) (on every block: "
            "for m in model.modules(): hasattr(m, 'set_chunk_feed_forward') and "
            "m.set_chunk_feed_forward(None)), or apply tomediff with merge_mlp=False."
        )


def patched_by_tomesd(module: nn.Module) -> bool:
    """Whether tomesd patched ``module``: it swaps a block's class for a ``ToMeBlock`` subclass that
    keeps the original class in ``_parent``."""
    return type(module).__name__ == "ToMeBlock" and hasattr(type(module), "_parent")


class TomesdPatchCheck:
    """Refuses merging in a block that tomesd patched after tomediff: tomesd's ``ToMeBlock`` merges
    the tokens itself, so tomediff's sites would get them merged twice."""

    def __init__(self, block: nn.Module, name: str) -> None:
        self.block = block
        self.name = name

    def __call__(self) -> str | None:
        if not patched_by_tomesd(self.block):
            return None
        return (
            f"block '{self.name}' is patched twice: tomediff first, then tomesd's apply_patch (its class is "
            "now tomesd's ToMeBlock), so its tokens would be merged twice. Keep one: "
            "tomediff.remove_patch(model) removes both (then apply the one you want), or "
            "tomesd.remove_patch(model) keeps tomediff's patch."
        )


class FirstReason:
    """Several ``Site.unsupported`` checks as one: the first message any of them returns."""

    def __init__(self, *checks: Callable[[], str | None]) -> None:
        self.checks = checks

    def __call__(self) -> str | None:
        for check in self.checks:
            if (reason := check()) is not None:
                return reason
        return None


def transformer_block_spec(
    name: str, block: nn.Module, downsample: int | None, grid: GridSource | None
) -> BlockSpec:
    """Spec of a diffusers or LDM ``BasicTransformerBlock`` (``attn1``, ``attn2``, ``ff``)."""
    sites: list[Site] = []
    tomesd = TomesdPatchCheck(block, name)  # the only blocks tomesd patches
    if isinstance(attn1 := getattr(block, "attn1", None), nn.Module):
        conflict = ReplayedOutputCheck(attn1, f"{name}.attn1")
        # Its attention call sees the image tokens alone: while a cache keeps attn1's output the
        # tokens are reduced there instead (diffusers_caches); attn2 and ff have no such call.
        inside = Site(attn1, "attn", role="call")
        sites.append(Site(attn1, "attn", unsupported=tomesd, conflict=conflict, inside=inside))
    if isinstance(attn2 := getattr(block, "attn2", None), nn.Module):
        conflict = ReplayedOutputCheck(attn2, f"{name}.attn2")
        sites.append(Site(attn2, "crossattn", unsupported=tomesd, conflict=conflict))
    if isinstance(ff := getattr(block, "ff", None), nn.Module):
        unsupported = FirstReason(tomesd, ForwardChunkingCheck(block, name))
        conflict = ReplayedOutputCheck(ff, f"{name}.ff")
        sites.append(Site(ff, "mlp", unsupported=unsupported, conflict=conflict))
    # The whole block (method="cache"): its input is the image tokens, the text comes as its context.
    whole = Site(
        block,
        "attn",
        role="block",
        mask_names=("attention_mask",),
        unsupported=tomesd,
        conflict=BlockCacheCheck(block, name),
        skipped=BlockSkipCheck(block),
    )
    return BlockSpec(
        name=name, block=block, downsample=downsample, grid=grid, sites=tuple(sites), block_site=whole
    )
