"""Regional torch.compile of every diffusers DiT family tomediff reduces (issue 15): each repeated block
compiled with ``fullgraph=True`` (any graph break inside a block raises), the compiled output equal to the
eager patched one, the tokens really reduced inside the compiled attention calls, and removal after
compiling back to the unpatched output. The families and their tiny random-weight configs are those of
the family test modules."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import tomediff
from conftest import assert_close, tiny_pixart
from test_dit_families import FAMILIES, tiny_sana
from test_dit_models import sd3_inputs, tiny_sd3, tome_hooks
from test_image_families import IMAGE_FAMILIES
from test_reference_tokens import FAMILIES as REFERENCE_FAMILIES
from test_video_families import VIDEO_FAMILIES
from tomediff.adapters import find_adapter

diffusers = pytest.importorskip("diffusers")

Inputs = tuple[tuple[Any, ...], dict[str, Any]]
IMAGE_GRID = (1, 5, 6)  # non-square, odd side
VIDEO_GRID = (3, 5, 3)  # odd frame count
BATCH = 2  # a guidance pair: random partitions are drawn (the default use_rand=True)


def _sd3_inputs(batch: int) -> Inputs:
    sample, kwargs = sd3_inputs(batch=batch, height=2 * IMAGE_GRID[1], width=2 * IMAGE_GRID[2])
    return (sample,), kwargs


def _map_inputs(channels: int, context: int, context_dim: int, batch: int) -> Inputs:
    """A ``[B, C, H, W]`` latent, a caption and a timestep (PixArt, Sana)."""
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, channels, 2 * IMAGE_GRID[1], 2 * IMAGE_GRID[2], generator=gen)
    caption = torch.randn(batch, context, context_dim, generator=gen)
    return (sample,), {"encoder_hidden_states": caption, "timestep": torch.full((batch,), 500)}


def _with_grid(
    inputs: Callable[[int, tuple[int, int, int]], Inputs], grid: tuple[int, int, int]
) -> Callable[[int], Inputs]:
    def at(batch: int) -> Inputs:
        return inputs(batch, grid)

    return at


# name -> (build, inputs for a batch)
COMPILE_FAMILIES: dict[str, tuple[Callable[[], nn.Module], Callable[[int], Inputs]]] = {
    **{
        name: (f.build, _with_grid(f.inputs, VIDEO_GRID if f.video else IMAGE_GRID))
        for name, f in FAMILIES.items()
    },
    **{name: (f.build, _with_grid(f.inputs, IMAGE_GRID)) for name, f in IMAGE_FAMILIES.items()},
    **{name: (f.build, _with_grid(f.inputs, VIDEO_GRID)) for name, f in VIDEO_FAMILIES.items()},
    "sd3": (tiny_sd3, _sd3_inputs),
    "pixart": (tiny_pixart, functools.partial(_map_inputs, 4, 5, 24)),
    "sana": (tiny_sana, functools.partial(_map_inputs, 4, 5, 8)),
}

SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "kv_ratio": {"ratio": 0.0, "kv_ratio": 0.5},
    "downsample": {"method": "downsample"},
}
# Reduced at block level (merging around the attention module): no keys to reduce alone.
NO_KV_RATIO = {"pixart", "sana", "sd3"}
# The default run: a cheap representative subset; every other family and setting is marked slow.
FAST = {("flux", s) for s in SETTINGS} | {("flux2", s) for s in SETTINGS} | {("wan", s) for s in SETTINGS}
FAST |= {("qwenimage", "default"), ("sd3", "default"), ("zimage", "default")}


class AttentionShapes(TorchFunctionMode):
    """Records ``(queries, keys)`` of every ``F.scaled_dot_product_attention`` call made while it is on,
    compiled calls included (below tomediff's mode, so it sees what tomediff passes on)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, int]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        # Tensor.unflatten's Python body calls super(), which dynamo cannot trace inside a mode.
        if func is torch.Tensor.unflatten:
            return torch.unflatten(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            named = {**dict(zip(("query", "key"), args, strict=False)), **kwargs}
            self.shapes.append((int(named["query"].shape[-2]), int(named["key"].shape[-2])))
        return func(*args, **kwargs)


# Linear attention (no softmax call): the token count its attention module receives instead, recorded by
# a pre-hook registered after tomediff's.
LINEAR_ATTENTION: dict[str, Callable[[Any], list[nn.Module]]] = {
    "sana": lambda model: [block.attn1 for block in model.transformer_blocks],
}


def run(model: nn.Module, inputs: Inputs, name: str) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The model's output and the ``(queries, keys)`` of each attention call it made."""
    spy = AttentionShapes()

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        keys = kwargs.get("encoder_hidden_states")  # downsampled keys/values, given as a context
        queries = int(args[0].shape[1])
        spy.shapes.append((queries, queries if keys is None else int(keys.shape[1])))

    linear = LINEAR_ATTENTION.get(name)
    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in linear(model)] if linear else []
    with spy, torch.no_grad():
        out = model(*inputs[0], **inputs[1])[0]
    for hook in hooks:
        hook.remove()
    if isinstance(out, list):  # Z-Image: one latent per sample
        out = torch.stack(out)
    return out, spy.shapes


def compile_blocks(model: nn.Module) -> list[nn.Module]:
    """Regional compilation as users do it: diffusers' ``compile_repeated_blocks`` where the model
    names its repeated blocks, else ``torch.compile`` on each transformer block in place; returns the
    compiled modules."""
    options: dict[str, Any] = {"fullgraph": True, "backend": "eager"}
    if getattr(model, "_repeated_blocks", None):
        model.compile_repeated_blocks(**options)  # type: ignore[operator]
    else:
        for spec in find_adapter(model).block_specs(model):
            spec.block.compile(**options)
    return [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]


# diffusers' own blocks that break the graph, unpatched as well
# (test_unpatched_blocks_of_the_xfailed_families_break_the_graph_too).
GRAPH_BREAKS_UNPATCHED = {
    "hidream": "HiDream's MoE feed-forward (moe_infer) loops over a data-dependent per-expert token count",
}


def _marks(name: str, setting: str) -> list[pytest.MarkDecorator]:
    marks = [] if (name, setting) in FAST else [pytest.mark.slow]
    if name in GRAPH_BREAKS_UNPATCHED:
        marks.append(pytest.mark.xfail(reason=GRAPH_BREAKS_UNPATCHED[name], strict=True))
    return marks


CASES = [
    pytest.param(name, setting, marks=_marks(name, setting), id=f"{name}-{setting}")
    for name in sorted(COMPILE_FAMILIES)
    for setting in SETTINGS
    if not (setting == "kv_ratio" and name in NO_KV_RATIO)
]


@pytest.mark.parametrize(("name", "setting"), CASES)
def test_compiled_blocks_reduce_without_graph_breaks_and_match_eager(name: str, setting: str) -> None:
    build, inputs_for = COMPILE_FAMILIES[name]
    model = build()
    inputs = inputs_for(BATCH)
    reference, base_shapes = run(model, inputs, name)
    handle = tomediff.apply_tome(model, **SETTINGS[setting])
    handle.reseed()
    eager, eager_shapes = run(model, inputs, name)
    assert not torch.equal(eager, reference)
    patched_blocks = [spec.block for spec in find_adapter(model).block_specs(model)]

    torch._dynamo.reset()
    compiled_modules = compile_blocks(model)
    # Every patched block runs inside a compiled region (its hooks included).
    compiled_ids = {id(sub) for module in compiled_modules for sub in module.modules()}
    assert all(id(block) in compiled_ids for block in patched_blocks)
    handle.reseed()  # the same random partitions as the eager call
    compiled, compiled_shapes = run(model, inputs, name)  # fullgraph=True: a graph break in a block raises
    assert compiled_shapes == eager_shapes and compiled_shapes != base_shapes
    assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    # Far closer to the reduced output than to the unpatched one (AuraFlow's downsampling moves the tiny
    # model's output by only 1e-4).
    assert (compiled - reference).abs().max() > 10 * (compiled - eager).abs().max()

    handle.remove()
    assert tome_hooks(model) == 0
    restored, restored_shapes = run(model, inputs, name)
    assert restored_shapes == base_shapes
    assert_close(restored, reference, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GRAPH_BREAKS_UNPATCHED))
def test_unpatched_blocks_of_the_xfailed_families_break_the_graph_too(name: str) -> None:
    """The families xfailed above break the graph in diffusers' own blocks, without tomediff."""
    build, inputs_for = COMPILE_FAMILIES[name]
    model = build()
    torch._dynamo.reset()
    compile_blocks(model)
    with pytest.raises((torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError)):
        run(model, inputs_for(BATCH), name)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["flux", "wan", "zimage"])
def test_the_random_draw_is_made_before_the_first_block(name: str) -> None:
    """Packed tokens (Flux), video latents (Wan) and latent lists (Z-Image) do not tell the grid at the
    model call: the call's one draw is made once the grid sources have read theirs, before any block
    (a block compiled on its own cannot draw from the CPU generator)."""
    build, inputs_for = COMPILE_FAMILIES[name]
    model = build()
    handle = tomediff.apply_tome(model)
    drawn: list[bool] = []

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:  # runs after tomediff's pre-hook
        drawn.append(handle.state.call.offsets is not None)

    hooks = [spec.block.register_forward_pre_hook(record) for spec in find_adapter(model).block_specs(model)]
    run(model, inputs_for(BATCH), name)
    for hook in hooks:
        hook.remove()
    assert drawn and all(drawn)
    assert handle.report().partition == "random"
    handle.remove()


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=[] if name in ("flux_kontext", "flux2", "qwen_edit") else [pytest.mark.slow])
        for name in sorted(REFERENCE_FAMILIES)
    ],
)
def test_edit_models_reference_groups_compile_with_their_random_draw(name: str) -> None:
    """An edit model's call (the predicted image, then reference images, each planned on its own grid) at
    a guidance pair: the one random draw covers every image's grid and is made before the blocks, so the
    compiled blocks reduce both images exactly as the eager ones."""
    family = REFERENCE_FAMILIES[name]
    model = family.build()
    inputs = family.inputs(BATCH)
    reference, base_shapes = run(model, inputs, name)
    handle = tomediff.apply_tome(model, ratio=0.5, reference_ratio=0.75)
    handle.reseed()
    eager, eager_shapes = run(model, inputs, name)
    assert handle.report().partition == "random" and eager_shapes != base_shapes
    torch._dynamo.reset()
    compile_blocks(model)
    handle.reseed()
    compiled, compiled_shapes = run(model, inputs, name)
    assert compiled_shapes == eager_shapes
    assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert (compiled - reference).abs().max() > 10 * (compiled - eager).abs().max()
    handle.remove()
    torch._dynamo.reset()
