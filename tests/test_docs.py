"""The README and docs/ name only what exists: no removed option or model id, every `tomediff.x.y`
resolves, every keyword of an `apply_tome(...)`/`tome(...)`/`ToMeConfig(...)` call is a ToMeConfig field,
every flag given to a subcommand is one it takes, and every Python block parses."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib
import io
import re
from pathlib import Path

import pytest

from tomediff import ToMeConfig

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/results/HISTORY.md is left out: it keeps superseded pages verbatim, as they were.
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIG_CALLS = ("apply_tome", "tome", "ToMeConfig", "apply_reducer")


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def resolve(dotted: str) -> object:
    """Import the longest module prefix of ``dotted`` and look the rest up as attributes."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(dotted)


def call_arguments(text: str, name: str) -> list[str]:
    """The argument text of every ``name(...)`` call in ``text`` (parentheses balanced)."""
    found = []
    for match in re.finditer(rf"(?<!\w){name}\(", text):
        depth, start = 1, match.end()
        for position in range(start, len(text)):
            depth += {"(": 1, ")": -1}.get(text[position], 0)
            if depth == 0:
                found.append(text[start:position])
                break
    return found


# Spellings that no longer work, and what replaced them.
REMOVED = {
    "planner=": "the ideal is `apply_reducer(model, KeepReducer(), cfg)`",
    "torch_dtype=": "diffusers 0.42 deprecates it: `dtype=`",
    "runwayml/stable-diffusion-v1-5": "the repository is gone: `stable-diffusion-v1-5/stable-diffusion-v1-5`",
}


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_no_page_shows_a_removed_option_or_model_id(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    stale = {spelling: fix for spelling, fix in REMOVED.items() if spelling in text}
    assert not stale, f"{page_id(page)} shows removed spellings (and their fix): {stale}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_tomediff_name_a_page_mentions_exists(page: Path) -> None:
    names = set(re.findall(r"(?<![\w/.-])tomediff(?:\.[A-Za-z_]\w*)+", page.read_text(encoding="utf-8")))
    missing = []
    for name in sorted(names):
        try:
            resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"{page_id(page)} names APIs that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_keyword_of_a_config_call_a_page_shows_is_a_config_field(page: Path) -> None:
    fields = {f.name for f in dataclasses.fields(ToMeConfig)} | {"config"}
    text = page.read_text(encoding="utf-8")
    unknown = []
    for name in CONFIG_CALLS:
        for arguments in call_arguments(text, name):
            # Keyword names at the top level of the call; `==` comparisons and nested calls excluded.
            flat = re.sub(r"\([^()]*\)|\{[^{}]*\}", "", arguments)
            for keyword in re.findall(r"(?<![=!<>])\b([A-Za-z_]\w*)\s*=(?!=)", flat):
                if keyword not in fields:
                    unknown.append(f"{name}(... {keyword}=)")
    assert not unknown, f"{page_id(page)} shows keywords ToMeConfig does not have: {unknown}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_python_block_of_a_page_parses(page: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)\n```", page.read_text(encoding="utf-8"), re.DOTALL)
    for block in blocks:
        ast.parse(block, filename=page_id(page))


def help_text(command: str) -> str:
    from tomediff.cli.main import main

    with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit):
        main([command, "--help"])
    return out.getvalue()


# How a page may start each subcommand; the flags after it must be ones that subcommand takes.
COMMAND_FORMS = {
    "bench": r"tomediff bench|tomediff\.cli\.bench_cmd",
    "demo": r"tomediff demo",
    "eval": r"tomediff eval|-m tomediff\.eval(?![\w.])",
    "visualize": r"tomediff visualize",
}


@pytest.mark.parametrize("command", sorted(COMMAND_FORMS))
def test_every_flag_the_pages_pass_to_a_subcommand_exists(command: str) -> None:
    known = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", help_text(command)))
    unknown = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8").replace("\\\n", " ")  # join continued shell lines
        for match in re.finditer(rf"(?:{COMMAND_FORMS[command]})([^\n`|;#]*)", text):
            flags = re.findall(r"(?<![\w-])--[a-z][\w-]*", match.group(1))
            unknown += [f"{page_id(page)}: {flag}" for flag in flags if flag not in known]
    assert not unknown, f"`tomediff {command}` has no such option: {sorted(set(unknown))}"
