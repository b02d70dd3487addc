"""What an evaluation or a benchmark compares: settings (library and ToMeConfig options), named
presets, and patching a setting onto a UNet.

This module is the one description of a setting. Its records (eval's :class:`Setting`, the benchmark's
``MergeSettings``) and the command-line flags are derived from :func:`dataclasses.fields` of
:class:`~tomediff.ToMeConfig` (:data:`SETTING_FIELDS`), never re-declared.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, cast

from tomediff.config import (
    CACHE_CONTEXTS,
    CACHE_FORECASTS,
    CACHE_SELECTS,
    DOWNSAMPLE_MODES,
    METHODS,
    TOMESD_FIELDS,
    ToMeConfig,
    config_from,
    tomesd_arguments,
)
from tomediff.errors import ConfigError

if TYPE_CHECKING:  # the command line's flags come from this module; torch is imported where it is used
    import torch

__all__ = [
    "DIFFERENT_SEED_OFFSET",
    "LIBRARIES",
    "METHOD_FIELDS",
    "PRESETS",
    "SETTING_FIELDS",
    "VARIANTS",
    "NamedSetting",
    "Patch",
    "Preset",
    "Setting",
    "build_settings",
    "field_help",
    "parse_level_ratios",
    "parse_setting",
    "parse_value",
    "setting_fields",
    "tomesd_defaults",
]

# Added to every seed of the "different seed" control row: far from any seed a run uses otherwise.
DIFFERENT_SEED_OFFSET = 10_000_000

LIBRARIES = ("tomediff", "tomesd")

# Every ToMeConfig field a settings record holds: all but ``generator`` (a live object, not a setting).
SETTING_FIELDS: tuple[dataclasses.Field, ...] = tuple(
    f for f in dataclasses.fields(ToMeConfig) if f.name != "generator"
)
_FIELDS = {f.name: f for f in SETTING_FIELDS}

# The methods and controls beyond tomesd's options (method, downsample_*, level_ratios, min_tokens,
# reuse_*, start, stop): what the CLIs add one flag each for.
METHOD_FIELDS: tuple[str, ...] = tuple(
    f.name for f in SETTING_FIELDS if f.name not in (*TOMESD_FIELDS, "seed")
)

_CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS,
    "downsample_mode": DOWNSAMPLE_MODES,
    "cache_select": CACHE_SELECTS,
    "cache_context": CACHE_CONTEXTS,
    "cache_forecast": CACHE_FORECASTS,
}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def setting_fields(**defaults: Any) -> list[tuple[str, Any, Any]]:
    """``dataclasses.make_dataclass`` field specs for every :data:`SETTING_FIELDS` field: its type and
    ToMeConfig's default, unless ``defaults`` gives the record its own default."""
    unknown = set(defaults) - set(_FIELDS)
    if unknown:
        raise ConfigError(f"not ToMeConfig fields: {', '.join(sorted(unknown))}")
    return [
        (f.name, f.type, dataclasses.field(default=defaults.get(f.name, f.default))) for f in SETTING_FIELDS
    ]


def normalise(record: Any) -> ToMeConfig:
    """Validate a frozen settings record through ToMeConfig and store the values ToMeConfig normalises
    (``level_ratios`` as sorted pairs, numpy numbers as Python ones) back into it."""
    config = config_from(record)
    for f in SETTING_FIELDS:
        object.__setattr__(record, f.name, getattr(config, f.name))
    return config


def field_help(name: str) -> str:
    """The description of ToMeConfig field ``name`` from its docstring (the parameter reference)."""
    doc = inspect.cleandoc(ToMeConfig.__doc__ or "")
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        head = re.match(r"^\s{4}([a-z_, ]+):\s*(.*)$", line)
        if head and name in [n.strip() for n in head.group(1).split(",")]:
            text = [head.group(2)]
            for more in lines[i + 1 :]:
                if not more.startswith(" " * 8):
                    break
                text.append(more.strip())
            return " ".join(text).replace("``", "").replace("%", "%%")
    return name.replace("_", " ")


def parse_level_ratios(text: str) -> tuple[tuple[int, float], ...]:
    """``"1:0.6,2:0.3"`` (or with ``/`` between pairs) as validated ``((1, 0.6), (2, 0.3))``."""
    pairs = _parse_pairs("level_ratios", text, int, float, "LEVEL:RATIO", "1:0.6,2:0.3")
    value = ToMeConfig(level_ratios=pairs).level_ratios
    assert isinstance(value, tuple)  # ToMeConfig stores level_ratios as sorted (level, ratio) pairs
    return value


def parse_cache_intervals(text: str) -> tuple[tuple[float, int], ...]:
    """``"0.4:3,0.7:4"`` (or with ``/`` between pairs) as validated ``((0.4, 3), (0.7, 4))``."""
    pairs = _parse_pairs("cache_intervals", text, float, int, "PROGRESS:INTERVAL", "0.4:3,0.7:4")
    value = ToMeConfig(method="cache", cache_intervals=pairs).cache_intervals
    assert isinstance(value, tuple)  # ToMeConfig stores cache_intervals as sorted pairs
    return value


def _parse_pairs(
    name: str, text: str, key: Callable[[str], Any], value: Callable[[str], Any], form: str, example: str
) -> tuple[tuple[Any, Any], ...]:
    """``text``'s ``KEY:VALUE`` pairs, separated by ``,`` or ``/``; ConfigError naming ``name`` else."""
    pairs = []
    for part in re.split(r"[,/]", text):
        if not part.strip():
            continue
        first, sep, second = part.partition(":")
        try:
            pairs.append((key(first), value(second)))
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigError(
                f"{name} must be {form} pairs such as {example} "
                f"({example.replace(',', '/')} inside --setting), got {text!r}"
            )
    return tuple(pairs)


def parse_value(name: str, text: str) -> Any:
    """The value of ToMeConfig field ``name`` written as ``text`` (as on a command line), validated by
    ToMeConfig on its own. Raises ConfigError naming the field and what it accepts."""
    if name not in _FIELDS:
        raise ConfigError(f"unknown option {name!r}; options are {', '.join(_FIELDS)}")
    kind = str(_FIELDS[name].type)
    word = text.strip()
    if "None" in kind and word.lower() == "none":
        value: Any = None
    elif name == "level_ratios":
        value = parse_level_ratios(word)
    elif name == "cache_intervals":
        value = parse_cache_intervals(word)
    elif kind.startswith("tuple[int"):  # e.g. skip_blocks: "1/1" (or "1,1" as a flag)
        try:
            value = tuple(int(part) for part in re.split(r"[,/]", word) if part.strip())
        except ValueError:
            raise ConfigError(f"{name} must be integers separated by / (e.g. 1/1), got {text!r}") from None
    elif kind == "bool":
        if word.lower() not in _TRUE + _FALSE:
            raise ConfigError(f"{name} must be true or false, got {text!r}")
        value = word.lower() in _TRUE
    elif kind.startswith("int"):
        try:
            value = int(word)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {text!r}") from None
    elif kind.startswith("float"):  # also "float | None" (kv_ratio)
        try:
            value = float(word)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {text!r}")
    else:
        value = word
        choices = _CHOICES.get(name)
        if choices is not None and value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {text!r}")
    if name not in ("level_ratios", "cache_intervals"):  # checked with their own messages
        # Alone, but beside the method a field only applies to; the caller checks the whole setting.
        context: dict[str, Any] = {"method": "downsample"} if name == "downsample_factor_time" else {}
        context = {"method": "cache"} if name.startswith("cache_") else context
        try:
            ToMeConfig(**context, **{name: value})
        except ConfigError as error:
            raise ConfigError(f"{name}={word}: {error}") from None
    return value


def tomesd_defaults() -> dict[str, Any]:
    """tomesd 0.1.3's ``apply_patch`` defaults, read from tomediff's copy of its signature."""
    from tomediff.api import apply_patch

    parameters = inspect.signature(apply_patch).parameters
    return {name: parameters[name].default for name in TOMESD_FIELDS}


@dataclass(frozen=True)
class Preset:
    """A named setting: the library and the ToMeConfig options over ToMeConfig's defaults (or a function
    returning them, for options read from the API: importing it takes seconds that the command line's
    help and usage errors need not wait)."""

    library: str
    options: Mapping[str, Any] | Callable[[], Mapping[str, Any]]
    about: str

    def resolved_options(self) -> Mapping[str, Any]:
        return self.options() if callable(self.options) else self.options


PRESETS: dict[str, Preset] = {
    "tomesd-default": Preset(
        "tomesd", tomesd_defaults, "tomesd 0.1.3 with its defaults (ratio 0.5, level 1, use_rand, attn)"
    ),
    "merge": Preset("tomediff", {"method": "merge", "ratio": 0.5}, "ToMe, ratio 0.5 (tomediff's defaults)"),
    "downsample": Preset(
        "tomediff",
        {"method": "downsample", "downsample_factor": 2},
        "ToDo: keys/values of self-attention from the 2x-downsampled grid",
    ),
    "merge+reuse": Preset(
        "tomediff",
        {"method": "merge", "ratio": 0.5, "reuse_level": True, "reuse_steps": 2},
        "ToMe 0.5, one matching per level per call, recomputed every 2nd call",
    ),
    "merge+schedule": Preset(
        "tomediff",
        {"method": "merge", "ratio": 0.5, "start": 0.0, "stop": 0.5},
        "ToMe 0.5 in the first half of the denoising only",
    ),
    "fast": Preset(
        "tomediff",
        {"method": "merge", "ratio": 0.7, "reuse_steps": 2},
        "ToMe 0.7, each block's matching recomputed every 2nd call (docs/methods.md's recommendation)",
    ),
    "merge-levels": Preset(
        "tomediff",
        {"method": "merge", "level_ratios": ((1, 0.6), (2, 0.3))},
        "ToMe with a ratio per level: 0.6 at the top level, 0.3 at the next",
    ),
    "cache": Preset(
        "tomediff",
        {"method": "cache", "cache_interval": 3, "cache_ratio": 0.25},
        "token caching: every block computes all tokens every 3rd step, a quarter of them between",
    ),
}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class NamedSetting:
    """One named setting of a comparison: ``library`` and the ToMeConfig ``options`` it sets (the
    others keep ToMeConfig's defaults; validated, so :meth:`config` never raises)."""

    name: str
    library: str
    options: tuple[tuple[str, Any], ...]

    def config(self) -> ToMeConfig:
        return ToMeConfig(**dict(self.options))

    @property
    def text(self) -> str:
        """The options as ``key=value,...`` (what ``--setting NAME:...`` would take)."""
        return ",".join(f"{k}={_format(v)}" for k, v in self.options)


def _format(value: Any) -> str:
    if isinstance(value, tuple):
        return "/".join(f"{v[0]}:{v[1]:g}" if isinstance(v, tuple) else f"{v}" for v in value)
    return str(value).lower() if isinstance(value, bool) else f"{value}"


def parse_setting(text: str) -> NamedSetting:
    """``NAME`` (a preset), ``PRESET:key=value,...`` (a preset with changes) or ``NAME:key=value,...``
    (ToMeConfig's defaults with changes; ``library=tomesd`` for tomesd). Raises ConfigError."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not _NAME.match(name):
        raise ConfigError(
            f"setting name {name!r} must start with a letter or digit and use only letters, digits and "
            "_ . + - (e.g. merge or r0.6:ratio=0.6)"
        )
    preset = PRESETS.get(name)
    if preset is None and not rest.strip():
        raise ConfigError(
            f"unknown preset {name!r}; presets are {', '.join(PRESETS)}, or give options: "
            f"{name}:ratio=0.6,reuse_steps=2"
        )
    library = preset.library if preset else "tomediff"
    options = dict(preset.resolved_options()) if preset else {}
    for item in rest.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"setting {name!r}: expected key=value, got {item.strip()!r}")
        if key == "library":
            if value.strip() not in LIBRARIES:
                raise ConfigError(f"setting {name!r}: library must be one of {', '.join(LIBRARIES)}")
            library = value.strip()
            continue
        options[key] = parse_value(key, value)
    try:
        config = ToMeConfig(**options)
    except ConfigError as error:
        raise ConfigError(f"setting {name!r}: {error}") from None
    if library == "tomesd":
        extra = [n for n in options if n not in TOMESD_FIELDS and options[n] != _FIELDS[n].default]
        if extra:
            raise ConfigError(
                f"setting {name!r}: tomesd takes only {', '.join(TOMESD_FIELDS)}; drop {', '.join(extra)} "
                "(or use library=tomediff)"
            )
    given = tuple((f.name, getattr(config, f.name)) for f in SETTING_FIELDS if f.name in options)
    return NamedSetting(name, library, given)


def check_unique(settings: Sequence[NamedSetting]) -> None:
    names = [s.name for s in settings]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(
            f"setting name(s) {', '.join(repeated)} given twice; name each setting once "
            "(e.g. --setting r3:ratio=0.3 --setting r6:ratio=0.6)"
        )


# Options varied one at a time, at the variant ratio, against the default (use_rand, highest level, attn).
VARIANTS: dict[str, dict[str, Any]] = {
    "no_rand": {"use_rand": False},
    "max_downsample_2": {"max_downsample": 2},
    "all_sites": {"merge_crossattn": True, "merge_mlp": True},
}

_SettingFields = dataclasses.make_dataclass("_SettingFields", setting_fields(ratio=0.0), frozen=True)


@dataclass(frozen=True)
class Setting(_SettingFields):  # type: ignore[misc, valid-type]
    """One row of the evaluation: how (and whether) the UNet is merged while sampling.

    Every ToMeConfig field (but ``generator``) is a field, with ToMeConfig's default (``ratio``: 0, the
    unmerged row); :meth:`tome_config` builds the config. ``library``, ``seed_offset``, ``variant`` and
    ``label`` (the name of a ``--setting``) describe the row.
    """

    library: str = "none"  # "none" (unmerged), "tomediff" or "tomesd"
    seed_offset: int = 0  # non-zero only for the "different seed" control
    variant: str = "default"
    label: str = ""

    def __post_init__(self) -> None:
        if self.library not in ("none", *LIBRARIES):
            raise ValueError(f"unknown library {self.library!r}; use 'none', 'tomediff' or 'tomesd'.")
        normalise(self)

    @classmethod
    def named(cls, setting: NamedSetting) -> Setting:
        """The row of a named setting (``--setting``)."""
        config = setting.config()
        values = {f.name: getattr(config, f.name) for f in SETTING_FIELDS}
        return cls(library=setting.library, variant=setting.name, label=setting.name, **values)

    @property
    def name(self) -> str:
        if self.seed_offset:
            return "unmerged, different seed"
        if self.library == "none":
            return "unmerged"
        if self.label:
            return self.label
        extra = "" if self.variant == "default" else f" {self.variant}"
        methods = "".join(
            f" {n}={_format(getattr(self, n))}"
            for n in METHOD_FIELDS
            if getattr(self, n) != _FIELDS[n].default and n != "level_ratios"
        )
        if self.level_ratios is not None:
            return f"{self.library} levels={_format(self.level_ratios)}{methods}{extra}"
        return f"{self.library} r={self.ratio:g}{methods}{extra}"

    @property
    def slug(self) -> str:
        """Filesystem-safe unique id."""
        return (
            self.name.replace(", ", "_")
            .replace(" ", "_")
            .replace("=", "")
            .replace("/", "_")
            .replace(":", "-")
        )

    def tome_config(self) -> ToMeConfig:
        """The merging this setting applies (its fields are ToMeConfig fields, validated by it)."""
        return config_from(self)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}

    def apply(self, unet: torch.nn.Module, pipeline: Any = None) -> Patch:
        """Patch ``unet`` for this setting; the returned :class:`Patch` reseeds and removes it.

        tomediff patches through ``pipeline`` (whose ``unet`` is ``unet``) when given, so it can ask the
        pipeline where generations start and whether a batch is a guidance pair (``reuse_steps``,
        ``reuse_cfg``)."""
        return Patch(self, unet, pipeline)


class Patch:
    """A setting applied to a UNet: ``reseed(seed)`` before each batch, ``remove()`` at the end."""

    def __init__(self, setting: Setting, unet: torch.nn.Module, pipeline: Any = None) -> None:
        self.setting, self.unet, self._handle = setting, unet, None
        if setting.library == "tomediff":
            import tomediff

            self._handle = tomediff.apply_tome(unet if pipeline is None else pipeline, setting.tome_config())
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
            assert self._handle is not None  # __init__ applied tomediff for this library
            self._handle.reseed(seed)
        elif self.setting.library == "tomesd":
            # tomesd keeps its generator in the patched model's _tome_info; replace it with a seeded one.
            import torch

            device = next(self.unet.parameters()).device
            cast(Any, self.unet)._tome_info["args"]["generator"] = torch.Generator(device).manual_seed(seed)

    def remove(self) -> None:
        if self.setting.library == "tomediff":
            assert self._handle is not None  # __init__ applied tomediff for this library
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
    options: Mapping[str, Any] | None = None,
    named: Sequence[NamedSetting] = (),
) -> list[Setting]:
    """The unmerged baseline first (and the different-seed control), then either the ``named``
    settings, or the ratio sweep, the option variants and the comparisons (at ``compare_ratios``,
    default the sweep's ratios). ``options`` (ToMeConfig fields) apply to every tomediff row of the
    sweep and the variants."""
    settings = [Setting()]
    if different_seed:
        settings.append(Setting(seed_offset=DIFFERENT_SEED_OFFSET))
    if named:
        check_unique(named)
        return settings + [Setting.named(s) for s in named]
    extra = dict(options or {})
    nonzero = [float(r) for r in ratios if float(r) > 0]
    settings += [Setting(library="tomediff", **{**extra, "ratio": r}) for r in nonzero]
    for variant in variants:
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}.")
        values = {**extra, "ratio": variant_ratio, **VARIANTS[variant]}
        settings.append(Setting(library="tomediff", variant=variant, **values))
    for method in compare:
        if method != "tomesd":
            raise ValueError(f"--compare supports 'tomesd', got {method!r}.")
        others = nonzero if compare_ratios is None else [float(r) for r in compare_ratios if float(r) > 0]
        settings += [Setting(library="tomesd", ratio=r) for r in others]
    return settings
