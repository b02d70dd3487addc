"""The pack's nodes: a simple one (method, ratio, seed) and an advanced one (the rest of ToMeConfig
that makes sense in a graph). Both validate through :class:`tomediff.ToMeConfig` and return a clone
of the model that samples with tomediff (see :mod:`.sampling`)."""

from __future__ import annotations

from typing import Any, ClassVar

import tomediff

from .sampling import attach

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "ToMeAdvanced", "ToMeSimple", "build_config"]

CATEGORY = "model_patches/tomediff"
SEED_RANGE = {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}
LEVELS = ["auto", "1", "2", "4", "8"]

REUSE_CFG_UNAVAILABLE = (
    "reuse_cfg needs a tomediff whose ToMeHandle has set_caller (to be told which ComfyUI calls hold an "
    "[uncond, cond] pair); update tomediff, or leave reuse_cfg off (reuse_level and reuse_steps work)."
)


def supports_guidance_caller() -> bool:
    """Whether the installed tomediff can be told per model call if the batch is a guidance pair."""
    return hasattr(tomediff.ToMeHandle, "set_caller")


def parse_level_ratios(text: str) -> dict[int, float] | None:
    """``"1:0.6, 2:0.3"`` as ``{1: 0.6, 2: 0.3}``; an empty text is None (one ratio for all levels)."""
    text = text.strip()
    if not text:
        return None
    ratios: dict[int, float] = {}
    for item in text.replace(";", ",").split(","):
        level, sep, ratio = item.partition(":")
        try:
            if not sep:
                raise ValueError
            ratios[int(level)] = float(ratio)
        except ValueError:
            raise tomediff.ConfigError(
                f"level_ratios {text!r} is not a list of level:ratio pairs; write e.g. '1:0.6, 2:0.3' "
                "(or leave it empty to use ratio)."
            ) from None
    return ratios


def build_config(**options: Any) -> tomediff.ToMeConfig:
    """The ToMeConfig of a node's widget values (raises tomediff's errors with a one-line message)."""
    if options.get("reuse_cfg"):
        # cfg_layout stays "auto": the sampling patch tells tomediff per model call whether the batch is
        # ComfyUI's [uncond, cond] pair (both halves in one call) or not (halves run apart).
        if not supports_guidance_caller():
            raise tomediff.ConfigError(REUSE_CFG_UNAVAILABLE)
    else:
        options.pop("reuse_cfg", None)
    if "max_downsample" in options:
        level = options.pop("max_downsample")
        if level not in LEVELS:
            raise tomediff.ConfigError(f"max_downsample must be one of {', '.join(LEVELS)}, got {level!r}.")
        options["max_downsample"] = None if level == "auto" else int(level)
    for name in ("kv_ratio", "reference_ratio"):
        if name in options and options[name] < 0:
            options[name] = None  # the widget's "same as ratio"
    if "level_ratios" in options:
        options["level_ratios"] = parse_level_ratios(options["level_ratios"])
    if "skip_first" in options or "skip_last" in options:
        options["skip_blocks"] = (options.pop("skip_first", 0), options.pop("skip_last", 0))
    return tomediff.ToMeConfig(**options)


def validation_message(**options: Any) -> bool | str:
    """ComfyUI's ``VALIDATE_INPUTS`` answer: True, or the one-line reason the settings are refused.

    Inputs fed from other nodes arrive as None at validation time; they are checked when the node runs.
    """
    if any(value is None for value in options.values()):
        return True
    try:
        build_config(**options)
    except tomediff.TomediffError as error:
        return " ".join(str(error).split())
    return True


class ToMeSimple:
    """Token merging (ToMe) or key/value downsampling (ToDo) on the model, while it samples."""

    DESCRIPTION = __doc__
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL",),
                "method": (
                    ["merge", "downsample"],
                    {
                        "default": "merge",
                        "tooltip": "merge: ToMe, similar tokens merged around self-attention. downsample: "
                        "ToDo, every query kept, keys/values from the 2x downsampled token grid.",
                    },
                ),
                "ratio": (
                    "FLOAT",
                    {
                        "default": 0.5,
                        "min": 0.0,
                        "max": 0.75,
                        "step": 0.05,
                        "tooltip": "merge: fraction of the tokens merged in each patched block (0 = off). "
                        "downsample: 0 = off, any other value downsamples 2x (use the advanced node "
                        "for other factors).",
                    },
                ),
                "seed": ("INT", {**SEED_RANGE, "tooltip": "seed of the random merge partitions"}),
            }
        }

    @staticmethod
    def options(method: str, ratio: float, seed: int) -> dict[str, Any]:
        if method == "downsample":
            # ToDo has no ratio: 0 turns it off, anything else is the usual 2x downsampling.
            return {"method": method, "downsample_factor": 1 if ratio == 0 else 2, "seed": seed}
        return {"method": method, "ratio": ratio, "seed": seed}

    @classmethod
    def VALIDATE_INPUTS(cls, method: Any = None, ratio: Any = None, seed: Any = None) -> bool | str:
        if method is None or ratio is None or seed is None:
            return True
        return validation_message(**cls.options(method, ratio, seed))

    def patch(self, model: Any, method: str, ratio: float, seed: int) -> tuple[Any]:
        return (attach(model, build_config(**self.options(method, ratio, seed))),)


class ToMeAdvanced:
    """tomediff with the ToMeConfig settings that make sense in a graph (see docs/comfyui.md)."""

    DESCRIPTION = __doc__
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    OPTIONS: ClassVar[tuple[str, ...]] = (
        "method",
        "ratio",
        "kv_ratio",
        "reference_ratio",
        "max_downsample",
        "level_ratios",
        "sx",
        "sy",
        "use_rand",
        "merge_attn",
        "merge_crossattn",
        "merge_mlp",
        "downsample_factor",
        "downsample_factor_next",
        "downsample_mode",
        "start",
        "stop",
        "min_tokens",
        "reuse_level",
        "reuse_steps",
        "reuse_cfg",
        "skip_first",
        "skip_last",
        "seed",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        def boolean(default: bool, tooltip: str) -> tuple[str, dict[str, Any]]:
            return ("BOOLEAN", {"default": default, "tooltip": tooltip})

        def integer(default: int, tooltip: str, low: int = 0, high: int = 64) -> tuple[str, dict[str, Any]]:
            return ("INT", {"default": default, "min": low, "max": high, "tooltip": tooltip})

        def fraction(default: float, tooltip: str) -> tuple[str, dict[str, Any]]:
            return ("FLOAT", {"default": default, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": tooltip})

        return {
            "required": {
                "model": ("MODEL",),
                "method": (["merge", "downsample"], {"default": "merge"}),
                "ratio": fraction(0.5, "merge: fraction of each patched block's tokens merged"),
                "kv_ratio": (
                    "FLOAT",
                    {
                        "default": -1.0,
                        "min": -1.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "merge on Flux, SD3, Wan and Qwen-Image: fraction of the image "
                        "keys/values merged, apart from the queries (merged at ratio; 0 keeps them all); "
                        "-1 = with the queries",
                    },
                ),
                "reference_ratio": (
                    "FLOAT",
                    {
                        "default": -1.0,
                        "min": -1.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "merge on Flux Kontext and Qwen-Image-Edit: fraction of each reference "
                        "latent's tokens merged (queries and keys/values, each image on its own grid; 0 "
                        "keeps them all); -1 = like the sampled latent (ratio, kv_ratio)",
                    },
                ),
                "max_downsample": (
                    LEVELS,
                    {
                        "default": "auto",
                        "tooltip": "deepest UNet level patched (auto: the highest-resolution level with "
                        "transformer blocks: 1 on SD 1.x, 2 on SDXL)",
                    },
                ),
                "level_ratios": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "merge: a ratio per level, e.g. '1:0.6, 2:0.3' (replaces ratio and "
                        "max_downsample); empty = use ratio",
                    },
                ),
                "sx": integer(2, "width of the window holding one destination token", 1),
                "sy": integer(2, "height of that window", 1),
                "use_rand": boolean(True, "random destination token per window (else top-left)"),
                "merge_attn": boolean(True, "merge around self-attention"),
                "merge_crossattn": boolean(False, "merge around cross-attention (merge only)"),
                "merge_mlp": boolean(False, "merge around the feed-forward (merge only; lower quality)"),
                "downsample_factor": integer(2, "downsample: grid factor at the first patched level", 1),
                "downsample_factor_next": integer(1, "downsample: factor at the deeper levels", 1),
                "downsample_mode": (["nearest", "avg", "bilinear"], {"default": "nearest"}),
                "start": fraction(0.0, "active from this fraction of the denoising on"),
                "stop": fraction(1.0, "active until this fraction of the denoising"),
                "min_tokens": integer(0, "leave blocks with fewer tokens alone", 0, 1 << 20),
                "reuse_level": boolean(False, "merge: one matching per level and model call"),
                "reuse_steps": integer(1, "merge: recompute each block's matching every k steps", 1),
                "reuse_cfg": boolean(
                    False, "merge: both guidance halves share the matching of the conditional half"
                ),
                "skip_first": integer(0, "leave the first n selected blocks unreduced", 0, 1024),
                "skip_last": integer(0, "leave the last n selected blocks unreduced", 0, 1024),
                "seed": ("INT", {**SEED_RANGE, "tooltip": "seed of the random merge partitions"}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, **options: Any) -> bool | str:
        return validation_message(**{name: options.get(name) for name in cls.OPTIONS})

    def patch(self, model: Any, **options: Any) -> tuple[Any]:
        return (attach(model, build_config(**options)),)


NODE_CLASS_MAPPINGS = {"TomediffToMe": ToMeSimple, "TomediffToMeAdvanced": ToMeAdvanced}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TomediffToMe": "Token Merging (tomediff)",
    "TomediffToMeAdvanced": "Token Merging, advanced (tomediff)",
}
