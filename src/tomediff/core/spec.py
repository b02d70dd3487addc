"""What an adapter tells the core about a model: blocks, their merge sites and their token grid."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn

from tomediff.core.calls import find_input

__all__ = [
    "BlockSpec",
    "Caller",
    "EqualLengthsGrid",
    "GridSource",
    "ItemsVideoGrid",
    "KeywordGrid",
    "LatentListGrid",
    "LeadingShapeListGrid",
    "MarkedPositionIdsGrid",
    "PositionIdsGrid",
    "ShapeListGrid",
    "Site",
    "SiteKind",
    "SiteRole",
    "TokenGroups",
    "TrailingPositionIdsGrid",
    "VideoGrid",
    "grid_tokens",
]

SiteKind = Literal["attn", "crossattn", "mlp"]
SiteRole = Literal["tokens", "attention", "key_value", "call", "block"]


@dataclass(frozen=True)
class TokenGroups:
    """The image tokens of a call that holds several images, one after another in the blocks' sequence:
    an edit or in-context model's output image then its reference images (Flux Kontext, Flux.2 with
    reference images, Qwen-Image-Edit). Each image is a group with its own token grid, reduced on its
    own, so tokens of different images are never merged together.

    Attributes:
        grids: each group's token grid, ``(h, w)`` or ``(frames, h, w)``, in sequence order.
        outputs: how many of the leading groups the model predicts (1 for an edit model; Qwen-Image-Layered
            predicts every layer); the groups after them are reference images (``reference_ratio``).
    """

    grids: tuple[tuple[int, ...], ...]
    outputs: int = 1

    def __post_init__(self) -> None:
        if len(self.grids) < 2 or not 1 <= self.outputs <= len(self.grids):
            raise ValueError(
                f"TokenGroups needs at least two grids and 1 <= outputs <= {len(self.grids)}, got "
                f"grids={self.grids}, outputs={self.outputs}; a call with one image has a plain grid."
            )

    @property
    def sizes(self) -> tuple[int, ...]:
        """Each group's token count."""
        return tuple(math.prod(grid) for grid in self.grids)

    @property
    def num_tokens(self) -> int:
        return sum(self.sizes)

    def is_reference(self, index: int) -> bool:
        """Whether group ``index`` is a reference image (not predicted by the model)."""
        return index >= self.outputs


def grid_tokens(grid: tuple[int, ...] | TokenGroups) -> int:
    """How many image tokens a grid source's reading describes."""
    return grid.num_tokens if isinstance(grid, TokenGroups) else math.prod(grid)


@dataclass(frozen=True, eq=False)
class GridSource:
    """A module whose input reveals the token grid of the blocks inside it.

    Its first positional argument (or the first of ``input_names`` passed by keyword) is a
    ``[B, C, H, W]`` map; the blocks see ``(H // patch_size) × (W // patch_size)`` tokens.
    """

    module: nn.Module
    patch_size: int = 1
    input_names: tuple[str, ...] = ("hidden_states", "x", "sample")
    # When read() gives None: a call it cannot read one grid from, for the error message.
    unreadable_example: str = "e.g. an input that is not a [B, C, H, W] map"

    def read(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int] | None:
        """The token grid ``(h, w)`` of one call of :attr:`module`, or None when its input is not a map."""
        _, x = find_input(args, kwargs, self.input_names)
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            return None
        return int(x.shape[-2]) // self.patch_size, int(x.shape[-1]) // self.patch_size


@dataclass(frozen=True, eq=False)
class PositionIdsGrid(GridSource):
    """A module given the position ids of its image tokens (Flux's ``img_ids``): ``[N, A]`` (or the
    deprecated ``[B, N, A]``) coordinates, row-major, with the row in column ``row_axis`` and the column
    in ``row_axis + 1``, stepping by any positive amount (Flux 3's pipeline scales them by 0.5). The
    grid is read from the first, second (the step) and last id (one small copy to the host per model
    call) and checked against ``N``; ids that are not one full row-major grid give None, and the blocks
    then say they cannot tell their grid.

    With ``group_axis``, ids whose column ``group_axis`` changes along the sequence are several images
    (Flux Kontext gives its reference image's tokens ``1`` there, Flux.2 ``10, 20, ...``): each run of
    one value must be a full row-major grid of its own, and the call gives their :class:`TokenGroups`
    (the first run is the image the model predicts, the others its references). That costs one more
    host copy, of the runs' lengths.

    Attributes:
        position: the ids' positional index in the module's call (when not passed by keyword).
        group_axis: the id column telling the images of a call apart, or None (one image per call).
        appended_ids: ``(name, position)`` of inputs holding the ids of further image tokens, given apart
            from these, that the blocks see after them (Flux 3's reference images, ``image_cond_ids``):
            read after these ids, as further images told apart by ``group_axis``.
    """

    input_names: tuple[str, ...] = ("img_ids",)
    position: int = 4
    row_axis: int = 1
    group_axis: int | None = None
    appended_ids: tuple[tuple[str, int], ...] = ()
    unreadable_example: str = "e.g. image tokens whose ids are not row-major grids"

    def __post_init__(self) -> None:
        if self.appended_ids and self.group_axis is None:
            raise ValueError("PositionIdsGrid reads appended_ids as further images: give it a group_axis.")

    @torch.compiler.disable  # reads a few values: small host copies, outside any compiled graph
    def read(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int] | TokenGroups | None:
        ids = args[self.position] if len(args) > self.position else None
        if ids is None:
            ids = next((kwargs[n] for n in self.input_names if kwargs.get(n) is not None), None)
        ids = _id_rows(ids, self.row_axis)
        if ids is None:
            return None
        appended = [
            args[position] if len(args) > position else kwargs.get(name)
            for name, position in self.appended_ids
        ]
        for more in appended:
            if more is None:
                continue
            more = _id_rows(more, self.row_axis)
            if more is None or more.shape[-1] != ids.shape[-1]:
                return None
            ids = torch.cat([ids, more])
        if self.group_axis is None or ids.shape[-1] <= self.group_axis:
            return self._one_grid(ids, 0, int(ids.shape[0]))
        _, counts = torch.unique_consecutive(ids[:, self.group_axis], return_counts=True)
        sizes = [int(n) for n in counts.tolist()]
        if len(sizes) == 1:
            return self._one_grid(ids, 0, sizes[0])
        grids: list[tuple[int, ...]] = []
        start = 0
        for size in sizes:
            grid = self._one_grid(ids, start, size)
            if grid is None:
                return None
            grids.append(grid)
            start += size
        return TokenGroups(tuple(grids))

    def _one_grid(self, ids: torch.Tensor, start: int, size: int) -> tuple[int, int] | None:
        """The grid of ids ``[start, start + size)``, or None when they are not one row-major grid."""
        if size == 1:
            return 1, 1
        rows = [start, start + 1, start + size - 1]  # the second id gives the step
        (row0, col0), (row1, col1), (row_last, col_last) = ids[
            rows, self.row_axis : self.row_axis + 2
        ].tolist()
        # Row-major: the second id is one step right (or one step down, in a grid one column wide).
        step = col1 - col0 if row1 == row0 else row1 - row0 if col1 == col0 else 0
        if not step > 0:
            return None
        height, width = (row_last - row0) / step + 1, (col_last - col0) / step + 1
        if abs(height - round(height)) > 1e-3 or abs(width - round(width)) > 1e-3:
            return None  # the last id is off the first two's step: no grid
        height, width = round(height), round(width)
        if height < 1 or width < 1 or height * width != size:
            return None
        return height, width


def _id_rows(ids: object, row_axis: int) -> torch.Tensor | None:
    """Position ids as ``[N, A]`` (the first sample's of ``[B, N, A]``), or None when they are no such ids."""
    if not isinstance(ids, torch.Tensor) or ids.dim() not in (2, 3) or ids.shape[-1] < row_axis + 2:
        return None
    return ids[0] if ids.dim() == 3 else ids


@dataclass(frozen=True, eq=False)
class TrailingPositionIdsGrid(PositionIdsGrid):
    """Position ids of the whole joint sequence (Krea 2's ``position_ids``, ``[text rows, image rows]``):
    the image rows are the last N, N being the token count of the call's first input (positional 0 or
    ``tokens_names``), and are read as :class:`PositionIdsGrid` reads its ids."""

    tokens_names: tuple[str, ...] = ("hidden_states",)

    def read(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int] | None:
        _, tokens = find_input(args, kwargs, self.tokens_names)
        ids = args[self.position] if len(args) > self.position else None
        if ids is None:
            ids = next((kwargs[n] for n in self.input_names if kwargs.get(n) is not None), None)
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or not isinstance(ids, torch.Tensor):
            return None
        num = int(tokens.shape[1])
        if ids.shape[-2] < num:
            return None
        return super().read((), {self.input_names[0]: ids[..., -num:, :]})


@dataclass(frozen=True, eq=False)
class MarkedPositionIdsGrid(PositionIdsGrid):
    """Position ids of a packed sequence (Ideogram 4's ``position_ids``, ``[B, S, A]``) whose image tokens are
    marked in a per-token role tensor (``role_names``, at ``role_position``: ``[B, S]``, ``image_role`` for an
    image token). The image tokens must be the last N of every row, N alike for the batch, and their ids are
    read as :class:`PositionIdsGrid` reads its ids; else None (e.g. a row packing several samples)."""

    role_names: tuple[str, ...] = ("indicator",)
    role_position: int = 5
    image_role: int = 0
    unreadable_example: str = "a row packing several samples, or image tokens that do not end every row"

    @torch.compiler.disable  # counts the image tokens: one host copy per model call
    def read(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int] | None:
        roles = args[self.role_position] if len(args) > self.role_position else None
        if roles is None:
            roles = next((kwargs[n] for n in self.role_names if kwargs.get(n) is not None), None)
        ids = args[self.position] if len(args) > self.position else None
        if ids is None:
            ids = next((kwargs[n] for n in self.input_names if kwargs.get(n) is not None), None)
        if not isinstance(roles, torch.Tensor) or roles.dim() != 2 or not isinstance(ids, torch.Tensor):
            return None
        image = roles == self.image_role
        counts = image.sum(dim=1)
        num = int(counts[0])
        if num == 0 or ids.shape[-2] != roles.shape[1]:
            return None
        if not (bool((counts == num).all()) and bool(image[:, -num:].all())):
            return None
        return super().read((), {self.input_names[0]: ids[..., -num:, :]})


@dataclass(frozen=True, eq=False)
class EqualLengthsGrid(GridSource):
    """A ``[B, C, H, W]`` map (as :class:`GridSource`) whose blocks place each sample's image tokens after
    its own caption (Lumina2): one layout for the batch only when every sample's caption has the same
    length, i.e. the rows of the mask ``mask_names`` (or at ``mask_position``) have equal sums; else
    None, and the blocks then say they cannot tell their grid."""

    mask_names: tuple[str, ...] = ("encoder_attention_mask",)
    mask_position: int = 3
    unreadable_example: str = (
        "its samples' captions have different lengths (encoder_attention_mask), so their image tokens sit "
        "at different places; call the model with captions of one length, or one sample per call"
    )

    @torch.compiler.disable  # compares the caption lengths: one host copy, as the model itself makes
    def read(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int] | None:
        grid = super().read(args, kwargs)
        mask = args[self.mask_position] if len(args) > self.mask_position else None
        if mask is None:
            mask = next((kwargs[n] for n in self.mask_names if kwargs.get(n) is not None), None)
        if grid is None or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return grid
        lengths = mask.sum(dim=1)
        return grid if bool((lengths == lengths[0]).all()) else None


@dataclass(frozen=True, eq=False)
class LatentListGrid(GridSource):
    """A module given its latents as a list of per-sample ``[C, F, H, W]`` tensors (Z-Image's ``x``) and
    its patch sizes as arguments (``patch_size`` and ``f_patch_size``, by keyword or at
    ``patch_positions``, else ``default_patch``): its blocks see ``F/pf × H/p × W/p`` tokens per sample.
    Samples of different shapes, or a nested list (Z-Image Omni's several images per sample), give None."""

    input_names: tuple[str, ...] = ("x",)
    patch_names: tuple[str, str] = ("patch_size", "f_patch_size")
    patch_positions: tuple[int, int] = (7, 8)
    default_patch: tuple[int, int] = (2, 1)
    unreadable_example: str = (
        "latents of different shapes in one call, or several images per sample as in Z-Image Omni"
    )

    def read(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...] | None:  # type: ignore[override]
        _, latents = find_input(args, kwargs, self.input_names)
        if not isinstance(latents, (list, tuple)) or not latents:
            return None
        if not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in latents):
            return None
        shape = latents[0].shape
        if any(x.shape != shape for x in latents):
            return None
        patch, time_patch = (
            args[position] if len(args) > position else kwargs.get(name, default)
            for name, position, default in zip(
                self.patch_names, self.patch_positions, self.default_patch, strict=True
            )
        )
        return int(shape[1]) // int(time_patch), int(shape[2]) // int(patch), int(shape[3]) // int(patch)


@dataclass(frozen=True, eq=False)
class VideoGrid(GridSource):
    """A module whose input is a ``[B, C, F, H, W]`` video latent, patchified by ``patch_size = (pt,
    ph, pw)``: its blocks see ``F/pt`` frames of ``(H/ph) × (W/pw)`` tokens, frame after frame.

    :meth:`read` gives ``(frames, height, width)``; a ``[B, C, H, W]`` input (an image) is one frame.
    """

    video_patch: tuple[int, int, int] = (1, 1, 1)
    frames_axis: int = 2  # CogVideoX's input is [B, F, C, H, W]: 1
    spatial_axes: tuple[int, int] = (-2, -1)  # Kandinsky 5's input is [B, F, H, W, C]: (2, 3)

    def read(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...] | None:  # type: ignore[override]
        _, x = find_input(args, kwargs, self.input_names)
        if not isinstance(x, torch.Tensor) or x.dim() not in (4, 5):
            return None
        pt, ph, pw = self.video_patch
        frames = math.ceil(int(x.shape[self.frames_axis]) / pt) if x.dim() == 5 else 1
        height_axis, width_axis = self.spatial_axes
        return frames, int(x.shape[height_axis]) // ph, int(x.shape[width_axis]) // pw


@dataclass(frozen=True, eq=False)
class ItemsVideoGrid(VideoGrid):
    """A :class:`VideoGrid` whose input may also be ``[B, items, C, F, H, W]``: several latents of one shape
    (JoyImage-Edit's reference images and the generated image), whose tokens the model lays out one item
    after the other, the generated one first: each item is an image of its own, ``F/pt × H/ph × W/pw``
    tokens, and the call gives their :class:`TokenGroups` (one item: its plain grid)."""

    def read(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...] | TokenGroups | None:  # type: ignore[override]
        _, x = find_input(args, kwargs, self.input_names)
        if isinstance(x, torch.Tensor) and x.dim() == 6:
            pt, ph, pw = self.video_patch
            item = (math.ceil(int(x.shape[3]) / pt), int(x.shape[4]) // ph, int(x.shape[5]) // pw)
            items = int(x.shape[1])
            return TokenGroups((item,) * items) if items > 1 else item
        return super().read(args, kwargs)


@dataclass(frozen=True, eq=False)
class KeywordGrid(GridSource):
    """A module told its token grid as integer arguments (LTX-Video's ``num_frames``, ``height``,
    ``width``, in tokens), by keyword or at ``positions`` in its call."""

    input_names: tuple[str, ...] = ("num_frames", "height", "width")
    positions: tuple[int, ...] = (4, 5, 6)

    def read(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...] | None:  # type: ignore[override]
        values = []
        for name, position in zip(self.input_names, self.positions, strict=True):
            value = args[position] if len(args) > position else kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = int(value)
            if not isinstance(value, int) or value < 1:
                return None
            values.append(value)
        return tuple(values)


@dataclass(frozen=True, eq=False)
class ShapeListGrid(GridSource):
    """A module told its grids as a list (Qwen-Image's ``img_shapes``): per sample, a list of
    ``(frames, height, width)`` token grids, or one such tuple. Every sample must list the same grids
    (else None, and the blocks then say they cannot tell their grid): one grid gives it, several (an
    edit model's output image then its reference images) give their :class:`TokenGroups`.

    Attributes:
        position: the list's positional index in the module's call (when not passed by keyword).
        references: how many of the trailing grids of a sample are reference images; None: all but the
            first (an edit model's layout). Qwen-Image-Layered predicts every grid but its last.
    """

    input_names: tuple[str, ...] = ("img_shapes",)
    position: int = 4
    references: int | None = None
    unreadable_example: str = "e.g. samples listing different img_shapes in one call"

    def read(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...] | TokenGroups | None:  # type: ignore[override]
        shapes = args[self.position] if len(args) > self.position else None
        if shapes is None:
            shapes = next((kwargs[n] for n in self.input_names if kwargs.get(n) is not None), None)
        if not isinstance(shapes, (list, tuple)) or not shapes or not isinstance(shapes[0], (list, tuple)):
            return None
        if shapes[0] and not isinstance(shapes[0][0], (list, tuple)):  # one grid per sample
            shapes = [[sample] for sample in shapes]
        grids = _as_grids(shapes[0])
        if not grids or any(grid is None for grid in grids):
            return None
        if any(_as_grids(sample) != grids for sample in shapes[1:]):
            return None  # the samples' images differ: no one layout for the batch
        if len(grids) == 1:
            return grids[0]
        references = len(grids) - 1 if self.references is None else self.references
        if not 1 <= references < len(grids):
            return None
        return TokenGroups(grids, outputs=len(grids) - references)  # type: ignore[arg-type]


def _frames_grid(shape: object) -> tuple[int, int, int] | None:
    """A ``(frames, height, width)`` tuple of positive ints, else None."""
    if not isinstance(shape, (list, tuple)) or len(shape) != 3:
        return None
    if not all(isinstance(v, int) and v > 0 for v in shape):
        return None
    return int(shape[0]), int(shape[1]), int(shape[2])


def _as_grids(sample: object) -> tuple[tuple[int, int, int] | None, ...] | None:
    if not isinstance(sample, (list, tuple)):
        return None
    return tuple(_frames_grid(grid) for grid in sample)


@dataclass(frozen=True, eq=False)
class LeadingShapeListGrid(ShapeListGrid):
    """A module told, per sample, the ``(frames, height, width)`` token grids of the images it lays out one
    after the other, the generated one first (JoyImage-Edit-Plus's ``shape_list``: the generated image, then
    its reference images), then padding up to the longest sample: read as :class:`ShapeListGrid` reads
    ``img_shapes`` (one grid, or the images' :class:`TokenGroups` when every sample lists the same grids;
    else None). The blocks' image tokens are the first of their input; what follows them is padding."""

    input_names: tuple[str, ...] = ("shape_list",)
    unreadable_example: str = (
        "samples listing different images in one call's shape_list (their reference images, or the "
        "generated image's grid); give every sample of a call the same images' sizes, or call the model "
        "one sample at a time"
    )


@dataclass(frozen=True, eq=False)
class Site:
    """A submodule whose token input is merged and whose output is unmerged.

    Attributes:
        module: the submodule (``attn1``, ``attn2``, ``ff``, ...).
        kind: which config switch enables it (``merge_attn``, ``merge_crossattn``, ``merge_mlp``).
        input_names: keyword names its token input may be passed by (else positional 0).
        mask_names: keyword names of an attention mask; for self-attention (no context passed) its
            token axes are merged too.
        context_names: keyword names of the key/value context; when one is given the keys are not
            the merged tokens and the mask is left alone.
        unsupported: called at each merge; a returned message means the site cannot merge in the
            module's current configuration and is raised as an error (never skipped silently).
        conflict: for a site whose output is unmerged, called when the patch is applied and at each
            merge; a returned message means something attached to the module (a cache replaying its
            output) makes merging around it wrong: the site is then reduced :attr:`inside` the module
            if it can be, else the message is raised as an error.
        role: what the site computes from the block's image tokens, which decides what each method
            does there. ``"tokens"``: its input is the token sequence, and a self-attention takes its
            keys from it (``attn1``, feed-forwards): merged, or for ``method="downsample"`` given
            reduced keys/values as its context. ``"attention"``: an attention that computes keys and
            values inside from the image tokens and others (MMDiT joint attention): merged; methods
            that reduce keys and values alone act on its ``"key_value"`` sites instead.
            ``"key_value"``: a projection computing keys or values from the image tokens (``to_k``,
            ``to_v``): reduced by ``method="downsample"``, left alone by merging. ``"call"``: an
            attention module (diffusers ``Attention`` / ``AttentionModuleMixin``) whose attention call
            (``F.scaled_dot_product_attention``, after the processor applied rotary positions) gets
            fewer image keys/values, and with merging fewer queries, whose outputs are copied back
            (:class:`tomediff.core.attention.AttentionCallAction`).
        text_first: the token input is ``[other tokens (text), the block's N image tokens]``
            concatenated (Flux's single-stream blocks); only the last N tokens are reduced.
        rotary_names: keyword names of a rotary position table (a tensor or diffusers' ``(cos, sin)``
            tuple, each ``[S, D]`` and shared by the batch) whose last N rows belong to the image
            tokens: reduced along with them, so each kept token keeps its own position. Such a block
            needs one plan for the whole batch (:attr:`BlockSpec.batch_shared`).
        image_first: (``"call"`` sites) the attention sequence is ``[the N image tokens, others]``
            (SD3's joint attention); with ``text_first`` it is ``[others, image]``; with neither, the
            sequence must be the N image tokens alone.
        extra_keys: (``"call"`` sites, ``text_first``) the keys may hold more tokens than the queries,
            before them (tokens only attended to: PRX's text, GLM-Image's cached condition-image tokens);
            the image tokens are the last N of the queries and of the keys. With ``image_first`` the extra
            keys come after them (NucleusMoE-Image's text): the image tokens are the first N of both.
        per_sample: (``"call"`` sites) the module may call attention once per sample, in batch order,
            with a batch of one (Mochi, whose text length differs per sample): each call gets the plan
            of its sample.
        call_only_for_kv: (``"call"`` sites) the block also has a block-level site merging this
            attention's tokens (with ``method="merge"``); the call site then acts only for what that one
            cannot do: key/value reduction (``method="downsample"``, ``kv_ratio``).
        output_index: (``"block"`` sites) where the block's output tuple holds its image tokens (Flux
            and SD3 blocks return ``(text, image)``: 1); a block returning one tensor ignores it.
        skipped: (``"block"`` sites) called when the block is entered, before it is planned: True when
            something attached to the block (a cache passing the block's input through at the steps it
            skips) will not run it in this call; the block then makes no plan.
        inside: the ``"call"`` site of this module's own attention call, for a site whose output is
            unmerged. While a cache keeps this module's output across steps (:attr:`conflict`), this
            site stands down and ``inside`` reduces the tokens inside the module instead: its output
            then keeps the full token order, so whatever the cache keeps, replays or extrapolates is
            what it would keep from the unpatched module's output, computed with fewer tokens. None:
            such a conflict is refused.
    """

    module: nn.Module
    kind: SiteKind
    input_names: tuple[str, ...] = ("hidden_states", "x")
    mask_names: tuple[str, ...] = ("attention_mask", "mask")
    context_names: tuple[str, ...] = ("encoder_hidden_states", "context")
    unsupported: Callable[[], str | None] | None = None
    conflict: Callable[[], str | None] | None = None
    skipped: Callable[[], bool] | None = None
    role: SiteRole = "tokens"
    text_first: bool = False
    rotary_names: tuple[str, ...] = ()
    image_first: bool = False
    extra_keys: bool = False
    call_only_for_kv: bool = False
    output_index: int = 0
    inside: Site | None = None
    per_sample: bool = False


@dataclass(frozen=True, eq=False)
class BlockSpec:
    """A transformer block to patch.

    Attributes:
        name: qualified name inside the patched model (for reports and errors).
        block: the block module; its input ``[B, N, C]`` is the similarity metric.
        downsample: how much its token grid is downsampled relative to the model's full-resolution
            token grid (1, 2, 4, ...), or None when only a call can tell.
        grid: where its ``h × w`` token grid comes from; None infers it from the patched model's
            input size (``ceil`` halving per level, as in a UNet).
        sites: the merge sites inside the block.
        batch_shared: every batch element must be reduced alike (one plan for the batch), because a
            table shared by the batch is reduced with the tokens (rotary positions).
        image_last: the block's input is ``[other tokens (text), the N image tokens]`` (Flux.2's
            single-stream blocks): N comes from its grid source, and the last N tokens are the metric.
        block_site: the block itself as a site (role ``"block"``), for methods acting around the whole
            block (``method="cache"``): its token input is the image tokens alone, other streams (text)
            are passed apart, and its output holds them at ``output_index``. None when the adapter
            does not declare one (such methods then refuse the block).
        image_first: the block's input is ``[the N image tokens, other tokens]`` (text, padding; Z-Image's
            and HiDream's single-stream blocks): N comes from its grid source, the first N are the metric.
        sequence_first: the block's input is ``[tokens, batch, channels]`` (ERNIE-Image).
    """

    name: str
    block: nn.Module
    downsample: int | None
    grid: GridSource | None
    sites: tuple[Site, ...]
    input_names: tuple[str, ...] = ("hidden_states", "x")
    batch_shared: bool = False
    image_last: bool = False
    block_site: Site | None = None
    image_first: bool = False
    sequence_first: bool = False


class Caller(Protocol):
    """What the code calling the patched model (a pipeline) tells about each of its model calls; asked
    at the start of every call, in the calling thread.

    Attributes:
        name: what it is, for messages (e.g. the pipeline's class name).
    """

    name: str

    def generation(self) -> object | None:
        """An object that stays the same (``is``) within one generation and is another one in the next
        (None when it cannot tell)."""
        ...

    def guidance(self, sample: object) -> bool | None:
        """Whether the current call, whose main input is ``sample``, stacks the two halves of
        classifier-free guidance as ``[unconditional, conditional]`` (None when it cannot tell)."""
        ...
