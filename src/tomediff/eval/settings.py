"""What an evaluation compares: settings (merging method and options) and patching them onto a UNet."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tomediff.config import ToMeConfig, config_from, tomesd_arguments

__all__ = ["DIFFERENT_SEED_OFFSET", "VARIANTS", "Patch", "Setting", "build_settings"]

# Added to every seed of the "different seed" control row: far from any seed a run uses otherwise.
DIFFERENT_SEED_OFFSET = 10_000_000

# Options varied one at a time, at the variant ratio, against the default (use_rand, highest level, attn).
VARIANTS: dict[str, dict[str, Any]] = {
    "no_rand": {"use_rand": False},
    "max_downsample_2": {"max_downsample": 2},
    "all_sites": {"merge_crossattn": True, "merge_mlp": True},
}


@dataclass(frozen=True)
class Setting:
    """One row of the evaluation: how (and whether) the UNet is merged while sampling.

    The merging fields are :class:`~tomediff.ToMeConfig` fields (see :meth:`tome_config`); ``library``,
    ``seed_offset`` and ``variant`` describe the row.
    """

    library: str = "none"  # "none" (unmerged), "tomediff" or "tomesd"
    ratio: float = 0.0
    use_rand: bool = True
    max_downsample: int | None = None
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    seed_offset: int = 0  # non-zero only for the "different seed" control
    variant: str = "default"

    @property
    def name(self) -> str:
        if self.seed_offset:
            return "unmerged, different seed"
        if self.library == "none":
            return "unmerged"
        extra = "" if self.variant == "default" else f" {self.variant}"
        return f"{self.library} r={self.ratio:g}{extra}"

    @property
    def slug(self) -> str:
        """Filesystem-safe unique id."""
        return self.name.replace(", ", "_").replace(" ", "_").replace("=", "")

    def tome_config(self) -> ToMeConfig:
        """The merging this setting applies (its fields are ToMeConfig fields, validated by it)."""
        return config_from(self)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}

    def apply(self, unet: torch.nn.Module) -> Patch:
        """Patch ``unet`` for this setting; the returned :class:`Patch` reseeds and removes it."""
        return Patch(self, unet)


class Patch:
    """A setting applied to a UNet: ``reseed(seed)`` before each batch, ``remove()`` at the end."""

    def __init__(self, setting: Setting, unet: torch.nn.Module) -> None:
        self.setting, self.unet, self._handle = setting, unet, None
        if setting.library == "tomediff":
            import tomediff

            self._handle = tomediff.apply_tome(unet, setting.tome_config())
        elif setting.library == "tomesd":
            try:
                import tomesd
            except ImportError as error:
                raise ImportError(
                    "--compare tomesd needs the tomesd package: pip install tomesd==0.1.3"
                ) from error
            tomesd.apply_patch(unet, **tomesd_arguments(setting.tome_config()))
        elif setting.library != "none":
            raise ValueError(f"unknown library {setting.library!r}; use 'none', 'tomediff' or 'tomesd'.")

    def reseed(self, seed: int) -> None:
        """Restart the partition RNG so a batch's merges depend only on (setting, batch index), not on
        which process ran it or what ran before — sharded and single-process runs then agree."""
        if self.setting.library == "tomediff":
            self._handle.reseed(seed)
        elif self.setting.library == "tomesd":
            # tomesd keeps its generator in the patched model's _tome_info; replace it with a seeded one.
            device = next(self.unet.parameters()).device
            self.unet._tome_info["args"]["generator"] = torch.Generator(device).manual_seed(seed)

    def remove(self) -> None:
        if self.setting.library == "tomediff":
            self._handle.remove()
        elif self.setting.library == "tomesd":
            import tomesd

            tomesd.remove_patch(self.unet)


def build_settings(
    ratios: Sequence[float] = (0.0, 0.3, 0.5, 0.6, 0.7),
    variants: Sequence[str] = tuple(VARIANTS),
    variant_ratio: float = 0.5,
    compare: Sequence[str] = (),
    different_seed: bool = True,
    compare_ratios: Sequence[float] | None = None,
) -> list[Setting]:
    """The unmerged baseline first, then the ratio sweep, the option variants, the comparisons
    (at ``compare_ratios``, default the sweep's ratios)."""
    settings = [Setting()]
    if different_seed:
        settings.append(Setting(seed_offset=DIFFERENT_SEED_OFFSET))
    nonzero = [float(r) for r in ratios if float(r) > 0]
    settings += [Setting(library="tomediff", ratio=r) for r in nonzero]
    for variant in variants:
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}.")
        settings.append(
            Setting(library="tomediff", ratio=variant_ratio, variant=variant, **VARIANTS[variant])
        )
    for method in compare:
        if method != "tomesd":
            raise ValueError(f"--compare supports 'tomesd', got {method!r}.")
        others = nonzero if compare_ratios is None else [float(r) for r in compare_ratios if float(r) > 0]
        settings += [Setting(library="tomesd", ratio=r) for r in others]
    return settings
