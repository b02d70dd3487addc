"""Command-line flags for the ToMeConfig fields and named settings, derived from ToMeConfig.

One flag per method field (``--reuse-steps``, ``--downsample-factor``, ...) generated from
:data:`tomediff.eval.settings.METHOD_FIELDS`, with its help taken from ToMeConfig's docstring, and the
repeatable ``--setting NAME[:key=value,...]`` for comparing several named settings in one run. Values
are checked by ToMeConfig itself; a bad one is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from tomediff.errors import CLIUsageError, ConfigError
from tomediff.eval.settings import (
    METHOD_FIELDS,
    PRESETS,
    SETTING_FIELDS,
    NamedSetting,
    check_unique,
    field_help,
    parse_setting,
    parse_value,
)

__all__ = [
    "add_method_arguments",
    "add_setting_argument",
    "check_named",
    "flag",
    "method_options",
]

_DEFAULTS = {f.name: f.default for f in SETTING_FIELDS}
_METAVARS = {"level_ratios": "L:R,...", "cache_intervals": "P:K,...", "skip_blocks": "FIRST,LAST"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _argument_type(name: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return parse_value(name, text)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = name  # what argparse names in "invalid ... value"
    return parse


def _default_text(name: str) -> str:
    value = _DEFAULTS[name]
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def add_method_arguments(parser: argparse.ArgumentParser, title: str) -> None:
    """One flag per ToMeConfig method field (``None`` when not given)."""
    group = parser.add_argument_group(
        "method options (ToMeConfig fields)",
        f"{title} Each takes ToMeConfig's values and is checked by it.",
    )
    for name in METHOD_FIELDS:
        help_text = f"{field_help(name)} Default: {_default_text(name)}"
        if str(dict((f.name, f.type) for f in SETTING_FIELDS)[name]) == "bool":
            group.add_argument(
                flag(name), action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        group.add_argument(
            flag(name),
            type=_argument_type(name),
            default=None,
            metavar=_METAVARS.get(name, name.upper()),
            help=help_text,
        )


def _setting_type(text: str) -> NamedSetting:
    try:
        return parse_setting(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


_setting_type.__name__ = "setting"


def add_setting_argument(parser: argparse.ArgumentParser, rows: str) -> None:
    presets = "; ".join(f"{name} = {preset.about}" for name, preset in PRESETS.items())
    parser.add_argument(
        "--setting",
        action="append",
        type=_setting_type,
        default=None,
        metavar="NAME[:KEY=VALUE,...]",
        help=f"repeatable: compare named settings in one run ({rows}). NAME is a preset, optionally with "
        "changes (merge+reuse:reuse_steps=3), or a new name with ToMeConfig options over ToMeConfig's "
        "defaults (r0.6:ratio=0.6,reuse_cfg=true; library=tomesd for tomesd; level ratios as "
        f"level_ratios=1:0.6/2:0.3). Presets: {presets}. Default: none (the classic rows)",
    )


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method flags given on the command line, as ToMeConfig options."""
    return {name: getattr(args, name) for name in METHOD_FIELDS if getattr(args, name, None) is not None}


def check_named(args: argparse.Namespace, classic_flags: dict[str, bool]) -> list[NamedSetting]:
    """The ``--setting`` values (unique names), refusing flags that describe the classic rows, which
    named settings replace (``classic_flags``: flag -> whether it was given). Raises CLIUsageError."""
    named = list(args.setting or [])
    if not named:
        return named
    try:
        check_unique(named)
    except ConfigError as error:
        raise CLIUsageError(f"--setting: {error}") from None
    given = [name for name, used in classic_flags.items() if used]
    given += [flag(name) for name in method_options(args)]
    if given:
        raise CLIUsageError(
            f"{', '.join(given)}: options of the classic rows, which --setting replaces; put them into "
            "each setting instead (e.g. --setting merge:reuse_steps=3)"
        )
    return named


def replace_options(record: Any, options: dict[str, Any], flag_of: Callable[[str], str] = flag) -> Any:
    """``dataclasses.replace(record, **options)``, a ConfigError becoming a CLIUsageError that names the
    flags."""
    try:
        return dataclasses.replace(record, **options)
    except ConfigError as error:
        flags = ", ".join(flag_of(n) for n in options)
        raise CLIUsageError(f"{flags}: {error}") from None
