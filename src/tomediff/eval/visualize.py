"""See what merged: draw which tokens a merge plan put together, over the generated image.

Like the figures of the ToMe-for-SD paper: for one generation, one denoising step and one block,
every group of two or more tokens that the plan averages into one gets its own colour; tokens left
alone (their slot holds only themselves) stay clear.

Three layers, each usable alone:

* pure functions on one plan row — :func:`merge_groups` (slot vector ``[N]`` → group ids ``[h, w]``),
  :func:`group_overlay` (→ RGBA ``[h, w, 4]``), :func:`upsample_nearest` and :func:`blend`;
* :class:`PlanRecorder`, which collects plans through ``ToMeHandle.watch`` from any patched model;
* :func:`visualize_merges`, one generation of the bundled demo model with the plans of the chosen
  steps and blocks, and :func:`save_png` for the figure (image | overlay per step, a row per block).

>>> from tomediff.eval.visualize import visualize_merges, save_png
>>> vis = visualize_merges(class_id="Sneaker", seed=3)         # doctest: +SKIP
>>> vis.views[0].groups                                        # doctest: +SKIP
>>> save_png(vis, "merges.png")                                # doctest: +SKIP
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from tomediff.errors import ConfigError

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from tomediff.api import ToMeHandle
    from tomediff.core import PlanEvent
    from tomediff.eval.pipeline import DemoPipeline

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_SCALE",
    "CapturedPlan",
    "MergeView",
    "MergeVisualization",
    "PlanRecorder",
    "blend",
    "check_steps",
    "figure_size",
    "group_overlay",
    "group_palette",
    "merge_groups",
    "resolve_blocks",
    "resolve_class",
    "save_png",
    "upsample_nearest",
    "visualize_merges",
]

DEFAULT_ALPHA = 0.65  # opacity of a group's colour over the image
DEFAULT_SCALE = 8  # figure pixels per image pixel (the demo's 32×32 canvas becomes 256×256)
PAD, ROW_HEADER, CAPTION = 6, 16, 14  # figure layout in pixels, see figure_size

Half = Literal["cond", "uncond"]


# Pure functions on one plan row ------------------------------------------------------------------


def merge_groups(slots: Any, height: int, width: int) -> np.ndarray:
    """Group id of every token of one plan row: ``slots: [N]`` (``MergePlan.local_slot[b]``), row-major
    ``N = height * width`` → int64 ``[height, width]``.

    Tokens sharing a slot form a group. Groups of two or more tokens are numbered ``0, 1, ...`` in the
    order of their first token (row-major); a token alone in its slot (unmerged) gets ``-1``.
    """
    flat = np.asarray(slots).reshape(-1)
    if flat.size != height * width:
        raise ConfigError(
            f"a {height}x{width} token grid has {height * width} tokens but the slot vector has "
            f"{flat.size}; pass one row of the plan of that block (plan.local_slot[b])."
        )
    _, first, inverse, counts = np.unique(flat, return_index=True, return_inverse=True, return_counts=True)
    grouped = np.flatnonzero(counts >= 2)
    grouped = grouped[np.argsort(first[grouped], kind="stable")]
    rank = np.full(counts.size, -1, dtype=np.int64)
    rank[grouped] = np.arange(grouped.size)
    return rank[inverse.reshape(-1)].reshape(height, width)


def group_palette(count: int) -> np.ndarray:
    """``count`` distinct, deterministic RGB colours, uint8 ``[count, 3]``.

    Hue, saturation and value follow a 3-D low-discrepancy (R3) sequence, so neighbouring ids differ
    clearly; a colour already used is skipped, so every group gets a colour of its own.
    """
    a1, a2, a3 = 0.8191725133961645, 0.6710436067037893, 0.5497004779019703  # 1/phi3^k, R3 sequence
    colours: list[tuple[int, int, int]] = []
    seen: set[tuple[int, int, int]] = set()
    i = 0
    while len(colours) < count:
        hue = (0.5 + a1 * i) % 1.0
        saturation = 0.55 + 0.45 * ((0.5 + a2 * i) % 1.0)
        value = 0.65 + 0.35 * ((0.5 + a3 * i) % 1.0)
        rgb = tuple(round(c * 255) for c in colorsys.hsv_to_rgb(hue, saturation, value))
        if rgb not in seen:
            seen.add(rgb)  # type: ignore[arg-type]
            colours.append(rgb)  # type: ignore[arg-type]
        i += 1
    return np.array(colours, dtype=np.uint8).reshape(count, 3)


def group_overlay(groups: np.ndarray, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """RGBA overlay at token resolution: ``groups: [h, w]`` from :func:`merge_groups` → uint8
    ``[h, w, 4]``; group ``g`` gets ``group_palette(...)[g]`` at opacity ``alpha``, lone tokens
    (``-1``) are fully transparent."""
    if not 0 < alpha <= 1:
        raise ConfigError(f"alpha must be in (0, 1], got {alpha!r}: the opacity of a group's colour.")
    groups = np.asarray(groups)
    overlay = np.zeros((*groups.shape, 4), dtype=np.uint8)
    merged = groups >= 0
    palette = group_palette(int(groups.max()) + 1 if merged.any() else 0)
    overlay[merged, :3] = palette[groups[merged]]
    overlay[merged, 3] = max(1, round(alpha * 255))
    return overlay


def upsample_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``array: [h, w, ...]`` → ``[H, W, ...]`` by nearest neighbour; when ``H, W`` are multiples of
    ``h, w`` every token becomes a block of ``H/h × W/w`` equal pixels."""
    array = np.asarray(array)
    height, width = size
    rows = np.arange(height) * array.shape[0] // height
    cols = np.arange(width) * array.shape[1] // width
    return array[rows][:, cols]


def blend(image: np.ndarray, overlay: np.ndarray) -> np.ndarray:
    """``image``: uint8 ``[H, W]`` (grey) or ``[H, W, 3]``; ``overlay``: RGBA ``[h, w, 4]`` at any
    resolution, upsampled to ``H × W`` (nearest). Returns uint8 ``[H, W, 3]``: each pixel
    ``(image * (255 - a) + colour * a) / 255``, rounded; where ``a = 0`` the image is unchanged."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ConfigError(f"image must be [H, W] or [H, W, 3] uint8, got shape {image.shape}.")
    up = upsample_nearest(overlay, image.shape[:2]).astype(np.int32)
    alpha = up[:, :, 3:4]
    mixed = image.astype(np.int32) * (255 - alpha) + up[:, :, :3] * alpha
    return ((mixed + 127) // 255).astype(np.uint8)


# Collecting plans ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CapturedPlan:
    """One block's plan in one model call: ``slots`` is ``plan.local_slot`` as int64 ``[B, N]``."""

    block: str
    call: int
    height: int
    width: int
    slots: np.ndarray


class PlanRecorder:
    """Keep the plans a patched model makes (through ``handle.watch``), for the chosen calls and blocks.

    ``calls`` are 1-based model call numbers, counted per thread (in a pipeline whose CFG halves share
    one batch, call ``k`` is denoising step ``k - 1``, whichever other threads share the model);
    ``None`` keeps every call, likewise ``blocks``. Works with
    any model tomediff patches::

        handle = tomediff.apply_tome(pipe, ratio=0.5)
        with PlanRecorder(handle, calls={10}) as recorder:
            pipe(prompt, num_inference_steps=20)
        plan = recorder.plans[0]          # plan.slots[b] -> merge_groups(plan.slots[b], h, w)
    """

    def __init__(
        self, handle: ToMeHandle, calls: Sequence[int] | None = None, blocks: Sequence[str] | None = None
    ) -> None:
        self.calls = None if calls is None else frozenset(calls)
        self.blocks = None if blocks is None else frozenset(blocks)
        self.plans: list[CapturedPlan] = []
        self._handle = handle
        self._stop: Any = None

    def __call__(self, event: PlanEvent) -> None:
        if (self.calls is not None and event.call not in self.calls) or (
            self.blocks is not None and event.block not in self.blocks
        ):
            return
        local_slot = getattr(event.plan, "local_slot", None)
        if local_slot is None:  # a plan that does not merge (the benchmarks' keep-and-copy reference)
            return
        slots = local_slot.detach().to("cpu", copy=True).numpy()
        self.plans.append(CapturedPlan(event.block, event.call, event.height, event.width, slots))

    def __enter__(self) -> PlanRecorder:
        self._stop = self._handle.watch(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None


# One generation of the bundled model ---------------------------------------------------------------


@dataclass(frozen=True)
class MergeView:
    """What one block merged at one step, for one batch row.

    Attributes:
        block: the block's qualified name.
        step: 0-based denoising step.
        slots: int64 ``[N]``, the plan's ``local_slot`` row (``N = height * width``, row-major).
        groups: int64 ``[height, width]`` from :func:`merge_groups` (``-1`` = unmerged).
    """

    block: str
    step: int
    height: int
    width: int
    slots: np.ndarray
    groups: np.ndarray

    @property
    def num_groups(self) -> int:
        """Groups of two or more tokens."""
        return int(self.groups.max()) + 1 if (self.groups >= 0).any() else 0

    @property
    def tokens_in_groups(self) -> int:
        return int((self.groups >= 0).sum())

    def overlay(self, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
        """RGBA ``[height, width, 4]`` at token resolution (see :func:`group_overlay`)."""
        return group_overlay(self.groups, alpha)


@dataclass(frozen=True)
class MergeVisualization:
    """One generation and the merges seen in it.

    Attributes:
        image: uint8 ``[H, W]``: the generated image as the model's tokens cover it (for the demo
            model the 32×32 canvas: the 28×28 Fashion-MNIST image and its 2-pixel padding).
        views: one :class:`MergeView` per (block, step), blocks in model order, then steps.
        blocks, steps: what the views cover, in figure order (rows, columns).
        title: class, seed and settings, for the figure.
    """

    image: np.ndarray
    views: tuple[MergeView, ...]
    blocks: tuple[str, ...]
    steps: tuple[int, ...]
    num_steps: int
    title: str

    def view(self, block: str, step: int) -> MergeView:
        for view in self.views:
            if view.block == block and view.step == step:
                return view
        raise KeyError(f"no view for block {block!r} at step {step}")

    def picture(self, view: MergeView, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
        """uint8 ``[H, W, 3]``: ``view``'s groups blended over the image."""
        return blend(self.image, view.overlay(alpha))

    def figure(self, scale: int = DEFAULT_SCALE, alpha: float = DEFAULT_ALPHA) -> PILImage.Image:
        """The figure as a PIL image: a row per block (its name above), the image then one overlay per
        step; its size is :func:`figure_size`."""
        from PIL import Image, ImageDraw

        if scale < 1:
            raise ConfigError(f"scale must be a positive integer, got {scale!r}.")
        height, width = self.image.shape[:2]
        tile_w, tile_h = width * scale, height * scale
        canvas = Image.new(
            "RGB", figure_size(len(self.blocks), len(self.steps), (height, width), scale), "white"
        )
        draw = ImageDraw.Draw(canvas)

        def tile(pixels: np.ndarray) -> Image.Image:
            return Image.fromarray(upsample_nearest(pixels, (tile_h, tile_w))).convert("RGB")

        for row, block in enumerate(self.blocks):
            top = PAD + row * (ROW_HEADER + CAPTION + tile_h + PAD)
            first = self.view(block, self.steps[0])
            _text(draw, (PAD, top), f"{block} ({first.height}x{first.width} tokens)", canvas.width - 2 * PAD)
            captions = [self.title] + [
                f"step {s}/{self.num_steps}: {self.view(block, s).num_groups} groups, "
                f"{self.view(block, s).tokens_in_groups}/{first.height * first.width} tokens"
                for s in self.steps
            ]
            pictures = [self.image] + [self.picture(self.view(block, s), alpha) for s in self.steps]
            for col, (caption, pixels) in enumerate(zip(captions, pictures, strict=True)):
                left = PAD + col * (tile_w + PAD)
                _text(draw, (left, top + ROW_HEADER), caption, tile_w)
                canvas.paste(tile(pixels), (left, top + ROW_HEADER + CAPTION))
        return canvas


def figure_size(rows: int, steps: int, image_size: tuple[int, int], scale: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of a figure with ``rows`` blocks and ``steps`` overlays per row."""
    tile_h, tile_w = image_size[0] * scale, image_size[1] * scale
    return PAD + (1 + steps) * (tile_w + PAD), PAD + rows * (ROW_HEADER + CAPTION + tile_h + PAD)


def _text(draw: Any, xy: tuple[int, int], text: str, max_width: int) -> None:
    """Draw ``text``, shortened with an ellipsis to fit ``max_width`` pixels."""
    shown = text
    while shown and draw.textlength(shown) > max_width:
        shown = shown[:-2] + "…"
        if len(shown) <= 1:
            break
    draw.text(xy, shown, fill="black")


def save_png(
    visualization: MergeVisualization,
    path: str | Path,
    scale: int = DEFAULT_SCALE,
    alpha: float = DEFAULT_ALPHA,
) -> Path:
    """Write :meth:`MergeVisualization.figure` to ``path`` (PNG; parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    visualization.figure(scale, alpha).save(path, format="PNG")
    return path


def resolve_class(class_id: int | str, class_names: Sequence[str]) -> int:
    """A class index or name (case-insensitive) → its index; ConfigError naming the valid values."""
    if isinstance(class_id, (int, np.integer)) and not isinstance(class_id, bool):
        if 0 <= int(class_id) < len(class_names):
            return int(class_id)
    elif isinstance(class_id, str):
        text = class_id.strip()
        if text.isdigit() and int(text) < len(class_names):
            return int(text)
        lowered = [name.lower() for name in class_names]
        if text.lower() in lowered:
            return lowered.index(text.lower())
    valid = ", ".join(f"{i} = {name!r}" for i, name in enumerate(class_names))
    raise ConfigError(f"unknown class {class_id!r}; use an index or a name: {valid}.")


def check_steps(steps: Sequence[int], num_steps: int) -> tuple[int, ...]:
    """Validate 0-based denoising steps against ``num_steps``; ConfigError naming the valid range."""
    if num_steps < 1:
        raise ConfigError(f"num_steps must be a positive integer, got {num_steps!r}.")
    bad: list[object] = [s for s in steps if isinstance(s, bool) or not isinstance(s, (int, np.integer))]
    bad += [s for s in steps if s not in bad and not 0 <= s < num_steps]
    if bad or not steps:
        what = ", ".join(map(repr, bad)) if bad else "none"
        raise ConfigError(
            f"step {what} is out of range: a generation with {num_steps} denoising steps has steps "
            f"0..{num_steps - 1} (0 = the noisiest)."
        )
    return tuple(dict.fromkeys(int(s) for s in steps))


def resolve_blocks(
    blocks: str | int | Sequence[str | int] | None, patched: Sequence[str]
) -> tuple[str, ...] | None:
    """Blocks by qualified name or index into ``patched``; ``"all"`` = every patched block; ``None`` =
    the first that merges (decided after the generation). ConfigError naming the valid values."""
    if blocks is None:
        return None
    if isinstance(blocks, (str, int)):
        blocks = [blocks]
    if list(blocks) == ["all"]:
        return tuple(patched)
    chosen: list[str] = []
    for block in blocks:
        if isinstance(block, str) and block.strip().isdigit():
            block = int(block.strip())
        if isinstance(block, int) and not isinstance(block, bool) and 0 <= block < len(patched):
            chosen.append(patched[block])
        elif isinstance(block, str) and block in patched:
            chosen.append(block)
        else:
            raise ConfigError(
                f"unknown block {block!r}: with these settings the blocks that merge are "
                f"{_listing(patched)} (give a name or an index, or 'all')."
            )
    return tuple(dict.fromkeys(chosen))


def _listing(names: Sequence[str]) -> str:
    return "; ".join(f"{i} = {name}" for i, name in enumerate(names)) or "none"


def visualize_merges(
    pipe: DemoPipeline | None = None,
    class_id: int | str = 0,
    seed: int = 0,
    num_steps: int = 20,
    step: int | Sequence[int] | None = None,
    block: str | int | Sequence[str | int] | None = None,
    ratio: float = 0.5,
    guidance_scale: float = 3.0,
    half: Half = "cond",
    assets_dir: str | Path | None = None,
    **tome_options: Any,
) -> MergeVisualization:
    """Generate one image with the bundled demo model under tomediff and keep the merges of the chosen
    steps and blocks.

    Args:
        pipe: a :class:`~tomediff.eval.pipeline.DemoPipeline` without a patch (patched here and restored
            after); None loads the bundled model (or the one in ``assets_dir``).
        class_id: the prompt: a class index or name (``"Sneaker"``).
        seed: the noise seed of the image.
        num_steps: denoising steps of the generation (DPM-Solver++).
        step: 0-based step(s) to show. Default: the middle one, ``num_steps // 2``.
        block: block(s) by qualified name or by index among the blocks that merge, or ``"all"``.
            Default: the first block that merges.
        ratio: merge ratio; ``tome_options`` go to :func:`tomediff.apply_tome` too (``max_downsample=2``
            also merges, and shows, the next level).
        half: which classifier-free-guidance half of the batch: ``"cond"`` (the prompt) or ``"uncond"``;
            with ``guidance_scale=1`` there is only ``"cond"``.

    Raises:
        ConfigError: a step, block, class or half that does not exist; the message names the valid ones.
    """
    import tomediff
    from tomediff.eval.data import to_uint8
    from tomediff.eval.model import latents_to_images

    steps = check_steps(
        [num_steps // 2] if step is None else [step] if isinstance(step, (int, np.integer)) else list(step),
        num_steps,
    )
    use_cfg = guidance_scale != 1.0
    halves = ("uncond", "cond") if use_cfg else ("cond",)
    if half not in halves:
        raise ConfigError(
            f"half {half!r} does not exist here; choose from {', '.join(halves)}"
            + ("" if use_cfg else " (guidance_scale=1 runs no unconditional half)")
            + "."
        )
    if pipe is None:
        from tomediff.eval.pipeline import load_demo_model

        pipe = load_demo_model(assets_dir)
    class_index = resolve_class(class_id, pipe.class_names)
    handle = tomediff.apply_tome(pipe, ratio=ratio, **tome_options)
    try:
        patched = [b.name for b in handle.report().blocks]
        chosen = resolve_blocks(block, patched)
        with PlanRecorder(handle, calls=[s + 1 for s in steps], blocks=chosen) as recorder:
            latents = pipe.generate_latents([class_index], [seed], num_steps, guidance_scale)
    finally:
        handle.remove()
    image = to_uint8(latents_to_images(latents.float()))[0]
    captured = {(p.block, p.call - 1): p for p in recorder.plans}
    made = [b for b in patched if all((b, s) in captured for s in steps)]
    if chosen is None:
        if not made:
            raise ConfigError(
                f"no block merged at step(s) {', '.join(map(str, steps))} with ratio={ratio}; patched "
                f"blocks: {_listing(patched)}. Use a larger ratio."
            )
        chosen = (made[0],)
    missing = [b for b in chosen if b not in made]
    if missing:
        raise ConfigError(
            f"block {missing[0]!r} made no merge plan at step(s) {', '.join(map(str, steps))} (it merges "
            f"nothing with these settings); the blocks that merged: {_listing(made)}."
        )
    row = halves.index(half)  # CFG batches are [uncond, cond]
    views = []
    for name in chosen:
        for s in steps:
            plan = captured[(name, s)]
            slots = plan.slots[row]
            views.append(
                MergeView(
                    name, s, plan.height, plan.width, slots, merge_groups(slots, plan.height, plan.width)
                )
            )
    title = f"{pipe.class_names[class_index]!r}, seed {seed}, ratio {ratio:g}"
    return MergeVisualization(image, tuple(views), tuple(chosen), steps, num_steps, title)
