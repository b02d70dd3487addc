"""Finding and replacing a module call's token input among its positional and keyword arguments."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["Args", "Kwargs", "find_input", "forward_parameters", "replace_input"]

Args = tuple[Any, ...]
Kwargs = dict[str, Any]


def find_input(args: Args, kwargs: Kwargs, names: Iterable[str]) -> tuple[int | str | None, Any]:
    """The token input of a call: positional 0, else the first of ``names`` given by keyword."""
    if args:
        return 0, args[0]
    for name in names:
        if kwargs.get(name) is not None:
            return name, kwargs[name]
    return None, None


def replace_input(args: Args, kwargs: Kwargs, where: int | str, value: Any) -> tuple[Args, Kwargs]:
    if isinstance(where, int):
        return (value, *args[1:]), kwargs
    return args, {**kwargs, where: value}


def forward_parameters(module: nn.Module) -> list[inspect.Parameter] | None:
    """The parameters of ``module.forward`` in order (None when its signature cannot be read)."""
    try:
        return list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
