"""Finding and replacing a module call's token input among its positional and keyword arguments."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["Args", "Kwargs", "find_input", "replace_input"]

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
