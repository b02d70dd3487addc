"""The README's examples run exactly as written: the offline one prints the report the README shows."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch

import tomediff
from test_dit_models import Spy, flux_inputs, tiny_flux, tome_hooks

README = Path(__file__).resolve().parents[1] / "README.md"


def fenced_block_after(marker: str) -> str:
    """The fenced code block that follows the HTML comment ``<!-- marker: ... -->`` in the README."""
    text = README.read_text(encoding="utf-8")
    found = re.search(rf"<!-- {re.escape(marker)}:[^>]*-->\n```[a-z]*\n(.*?)\n```", text, re.DOTALL)
    assert found, f"README.md has no fenced block after the marker <!-- {marker}: ... -->"
    return found.group(1)


def test_offline_example_runs_as_written_and_prints_the_report_shown(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("safetensors")
    code = fenced_block_after("offline-example")
    # The example's own `assert` checks that removal restores the unmerged images bit for bit.
    exec(compile(code, f"{README} (offline example)", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out

    shown = fenced_block_after("offline-example-report").splitlines()
    assert shown[0].startswith("tomediff on UNet2DConditionModel") and "3 blocks patched" in shown[0]
    assert "3 blocks patched" in printed
    # The per-block rows and the effective ratio are what the README promises the user will see.
    for line in shown[1:]:
        assert line in printed.splitlines(), f"README shows {line!r}, the example printed:\n{printed}"
    assert re.search(r"mean \|merged - unmerged\| \(0-255\): \d", printed)


def test_flux_stack_recipe_runs_as_written() -> None:
    """The README's FLUX.1 stack (MagCache with the published FLUX.1-dev ratios + merging 0.3 outside the
    first and last block), on a tiny Flux: MagCache computes 8 of 28 steps, merging is on the inner blocks,
    and taking both off gives the unpatched model's output bit for bit."""
    code = fenced_block_after("flux-stack-example")
    model = tiny_flux()
    x, kwargs = flux_inputs(batch=1, height=8, width=8)
    with torch.no_grad():
        before = model(x, **kwargs)[0]
    pipe = types.SimpleNamespace(transformer=model)
    exec(compile(code, f"{README} (FLUX.1 stack)", "exec"), {"__name__": "__readme__", "pipe": pipe})

    inner = [model.transformer_blocks[1], model.single_transformer_blocks[0]]
    assert tome_hooks(model) > 0 and all(tome_hooks(block) > 0 for block in inner)
    assert tome_hooks(model.transformer_blocks[0]) == tome_hooks(model.single_transformer_blocks[-1]) == 0
    last_attention = model.single_transformer_blocks[-1].attn.to_q
    calls = []
    counter = last_attention.register_forward_pre_hook(lambda *_: calls.append(1))
    first, merged = Spy(), Spy()
    spies = [
        model.transformer_blocks[0].attn.register_forward_pre_hook(first, with_kwargs=True),
        model.transformer_blocks[1].attn.register_forward_pre_hook(merged, with_kwargs=True),
    ]
    with torch.no_grad():
        for step in range(28):
            with model.cache_context("cond"):
                model(x, **{**kwargs, "timestep": torch.full((1,), 1 - step / 28)})
    counter.remove()
    for handle in spies:
        handle.remove()
    assert len(calls) == 8
    # 64 image tokens: the first block attends over all of them, an inner one over 64 - 0.3 * 64 = 45.
    assert {call["tokens"] for call in first.calls} == {64}
    assert {call["tokens"] for call in merged.calls} == {64 - int(0.3 * 64)}

    model.disable_cache()
    tomediff.remove_tome(model)
    with torch.no_grad():
        assert torch.equal(model(x, **kwargs)[0], before)
