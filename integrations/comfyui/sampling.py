"""tomediff inside ComfyUI: hooks on the shared diffusion model only while one ModelPatcher clone samples.

ComfyUI's clones of a model share one ``diffusion_model`` module; options and wrappers live on each
clone. So the node never touches the module: it registers :class:`SamplingPatch` as the clone's
``OUTER_SAMPLE`` wrapper under :data:`PATCH_KEY`, which calls :func:`tomediff.apply_tome` when that
clone starts sampling and removes the hooks in ``finally`` when it stops (or fails). Every other clone
of the same model, sampled before, after or in between, runs the unpatched module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import comfy.patcher_extension as patcher_extension
import torch

import tomediff

from .dit_attention import AttentionReport, DitAttention, call_seed, dit_family, dit_options_error

__all__ = ["PATCH_KEY", "SamplingPatch", "attach", "call_seed", "comfy_tome_patch_in", "refuse_comfy_tome"]

# One tomediff patch per clone: registering again under this key replaces the previous one.
PATCH_KEY = "tomediff"

_LOG = logging.getLogger("comfyui.tomediff")


def _names(patch: Callable[..., Any]) -> tuple[str, str]:
    return getattr(patch, "__qualname__", ""), getattr(patch, "__module__", "") or ""


def comfy_tome_patch_in(model_options: dict[str, Any]) -> bool:
    """Whether ComfyUI's own ``TomePatchModel`` (comfy_extras/nodes_tomesd.py, also copied into Forge)
    patches the model these options belong to: it adds its functions as ``attn1_patch`` and
    ``attn1_output_patch``, defined inside ``TomePatchModel.execute``."""
    patches = model_options.get("transformer_options", {}).get("patches", {})
    found: Iterable[Callable[..., Any]] = (
        *patches.get("attn1_patch", ()),
        *patches.get("attn1_output_patch", ()),
    )
    for patch in found:
        qualname, module = _names(patch)
        if qualname.startswith("TomePatchModel.") or module.endswith("nodes_tomesd"):
            return True
    return False


def refuse_comfy_tome(model_options: dict[str, Any]) -> None:
    """Raise when ``TomePatchModel`` patches the same model: both would merge self-attention tokens."""
    if comfy_tome_patch_in(model_options):
        raise tomediff.ConflictingPatchError(
            "this model is already patched by ComfyUI's TomePatchModel node, which merges the same "
            "self-attention tokens; tomediff on top would merge twice. Remove or bypass one of the two "
            "nodes (tomediff's node covers what TomePatchModel does, and SDXL too)."
        )


class _SamplerCalls:
    """``APPLY_MODEL`` wrapper for one sampling run, and tomediff's caller of the patched model
    (:meth:`tomediff.ToMeHandle.set_caller`).

    * It reseeds the partition generator per model call from the node's seed and the call's sigma, so
      random partitions do not depend on how ComfyUI splits guidance into calls (it batches
      ``[uncond, cond]`` when memory allows, else one call each). The generator is the patch's own
      (``ToMeConfig.generator``), reseeded directly: restarting it through the handle would also start a
      new generation and drop the plans ``reuse_steps`` keeps.
    * It tells tomediff whether a call is a guidance pair, for ``reuse_cfg``: only a call whose
      ``transformer_options["cond_or_uncond"]`` is ``[1, 0]`` stacks ``[uncond, cond]``; when ComfyUI runs
      the halves apart an even batch holds several images of one half, which plan per sample.
    """

    name = "ComfyUI's sampler"

    def __init__(self, handle: tomediff.ToMeHandle, generator: torch.Generator, seed: int) -> None:
        self.generator = generator
        self.seed = seed
        self.cond_or_uncond: list[int] = []
        handle.set_caller(self)

    def generation(self) -> object | None:
        return None  # each sampling run applies a new patch, whose plans start empty

    def guidance(self, sample: object) -> bool | None:
        return self.cond_or_uncond == [1, 0]

    def __call__(self, executor: Any, x: Any, t: Any, *args: Any, **kwargs: Any) -> Any:
        transformer_options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        self.cond_or_uncond = list(transformer_options.get("cond_or_uncond") or ())
        self.generator.manual_seed(call_seed(self.seed, float(t.reshape(-1)[0])))
        return executor(x, t, *args, **kwargs)


class SamplingPatch:
    """``OUTER_SAMPLE`` wrapper: tomediff on the diffusion model for the length of one sampling run.

    Attributes:
        config: the validated settings.
        last_report: :meth:`tomediff.ToMeHandle.report` of the latest run (an
            :class:`~.dit_attention.AttentionReport` on ComfyUI's DiTs; None before a run), also logged
            at INFO level on the ``comfyui.tomediff`` logger.
    """

    def __init__(self, config: tomediff.ToMeConfig) -> None:
        self.config = config
        self.last_report: tomediff.ToMeReport | AttentionReport | None = None

    def __call__(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        guider = executor.class_obj
        model_options = guider.model_options
        # A TomePatchModel placed after this node patches the same clone: caught here.
        refuse_comfy_tome(model_options)
        diffusion_model = guider.model_patcher.model.diffusion_model
        wrappers = model_options.setdefault("transformer_options", {}).setdefault("wrappers", {})
        per_call = wrappers.setdefault(patcher_extension.WrappersMP.APPLY_MODEL, {})
        family = dit_family(diffusion_model)
        if family is not None:  # ComfyUI's own DiTs: reduced in its attention override
            _refuse_dit_options(self.config, family)
            override = DitAttention(self.config, family, diffusion_model)
            per_call[PATCH_KEY] = [override]
            try:
                return executor(*args, **kwargs)
            finally:
                per_call.pop(PATCH_KEY, None)
                self.last_report = override.report
                _LOG.info("%s", self.last_report)
        generator = torch.Generator()
        handle = tomediff.apply_tome(diffusion_model, self.config.replace(generator=generator))
        clashes = replaced_attention(model_options, handle.report())
        if clashes:
            handle.remove()
            raise tomediff.ConflictingPatchError(
                f"another node replaces the attention that tomediff reduces in {', '.join(clashes)} "
                "(ComfyUI then calls its projections directly, so tomediff could not act there); limit "
                "tomediff's levels (max_downsample, level_ratios, skip_first/skip_last) or remove that node."
            )
        per_call[PATCH_KEY] = [_SamplerCalls(handle, generator, self.config.seed)]
        try:
            return executor(*args, **kwargs)
        finally:
            per_call.pop(PATCH_KEY, None)
            self.last_report = handle.report()
            handle.remove()
            _LOG.info("%s", self.last_report)


# tomediff's site kinds and the ComfyUI attention each one acts on in a BasicTransformerBlock.
_SITE_ATTENTION = {"attn": "attn1", "crossattn": "attn2"}
_UNET_PARTS = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


def _comfy_block_key(name: str) -> tuple[str, int, int] | None:
    """ComfyUI's ``(block, number, transformer_index)`` key of a patched block's name
    (``input_blocks.4.1.transformer_blocks.0`` -> ``("input", 4, 0)``)."""
    parts = name.split(".")
    part = _UNET_PARTS.get(parts[0])
    if part is None or not parts[-1].isdigit():
        return None
    number = 0 if part == "middle" else int(parts[1])
    return part, number, int(parts[-1])


def replaced_attention(model_options: dict[str, Any], report: tomediff.ToMeReport) -> list[str]:
    """The patched sites whose attention another node replaces (``set_model_attn1_replace`` and the
    like): ComfyUI then calls ``to_q``/``to_k``/``to_v`` itself and tomediff's hooks on the attention
    module would never run."""
    replace = model_options.get("transformer_options", {}).get("patches_replace", {})
    clashes = []
    for block in report.blocks:
        key = _comfy_block_key(block.name)
        for kind in block.sites if key is not None else ():
            attention = _SITE_ATTENTION.get(kind)
            table = replace.get(attention, {}) if attention else {}
            if key in table or key[:2] in table:
                clashes.append(f"{block.name} ({attention})")
    return clashes


def _refuse_dit_options(config: tomediff.ToMeConfig, family: str) -> None:
    message = dit_options_error(config, family)
    if message is not None:
        raise tomediff.ConfigError(message)


def attach(model: Any, config: tomediff.ToMeConfig) -> Any:
    """A clone of the ``ModelPatcher`` ``model`` that samples with tomediff (``model`` is unchanged);
    a tomediff patch already on ``model`` is replaced, not stacked."""
    refuse_comfy_tome(model.model_options)
    family = dit_family(model.model.diffusion_model)  # reads the class name only
    if family is not None:
        _refuse_dit_options(config, family)
    elif config.kv_ratio is not None:
        raise tomediff.ConfigError(
            f"kv_ratio={config.kv_ratio} applies to ComfyUI's Flux, SD3, Wan and Qwen-Image models (merged "
            f"at their attention calls), not to this {type(model.model).__name__} model; set kv_ratio to -1."
        )
    elif config.reference_ratio is not None:
        raise tomediff.ConfigError(
            f"reference_ratio={config.reference_ratio} applies to ComfyUI's Flux (Kontext) and Qwen-Image "
            f"(Edit) models, which take reference latents, not to this {type(model.model).__name__} model; "
            "set reference_ratio to -1."
        )
    patched = model.clone()
    patched.remove_wrappers_with_key(patcher_extension.WrappersMP.OUTER_SAMPLE, PATCH_KEY)
    patched.add_wrapper_with_key(patcher_extension.WrappersMP.OUTER_SAMPLE, PATCH_KEY, SamplingPatch(config))
    return patched
