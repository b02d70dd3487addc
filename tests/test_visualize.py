"""``tomediff visualize`` and ``tomediff.eval.visualize``: the groups drawn are exactly the plan's groups."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import tomediff
from tomediff.cli import main as cli_main
from tomediff.cli import visualize_cmd
from tomediff.errors import ConfigError
from tomediff.eval import visualize as vz
from tomediff.eval.pipeline import DemoPipeline, load_demo_model

STEPS = 4  # a short generation: the plans of every step exist all the same


@pytest.fixture(scope="module")
def pipe() -> DemoPipeline:
    return load_demo_model()  # the bundled trained model (offline, about 1 s)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: the model is tiny, and on a busy machine more threads only wait on each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _exit_code(argv: list[str]) -> int:
    try:
        return cli_main.main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)


def _partition(labels: list) -> set[frozenset[int]]:
    """Tokens grouped by equal label (``None`` = no group); only groups of two or more."""
    groups: dict[object, set[int]] = {}
    for token, label in enumerate(labels):
        if label is not None:
            groups.setdefault(label, set()).add(token)
    return {frozenset(g) for g in groups.values()}


def _plan_partition(slots: np.ndarray) -> tuple[set[frozenset[int]], set[int]]:
    """The plan's groups of two or more tokens, and its lone tokens."""
    by_slot: dict[int, set[int]] = {}
    for token, slot in enumerate(slots.tolist()):
        by_slot.setdefault(slot, set()).add(token)
    groups = {frozenset(g) for g in by_slot.values() if len(g) >= 2}
    lone = {next(iter(g)) for g in by_slot.values() if len(g) == 1}
    return groups, lone


def _independent_plans(pipe: DemoPipeline, class_id: int, seed: int) -> dict[tuple[str, int], torch.Tensor]:
    """The plans of one generation, read straight from ``handle.watch`` (not through visualize)."""
    seen: dict[tuple[str, int], torch.Tensor] = {}
    handle = tomediff.apply_tome(pipe, ratio=0.5)
    stop = handle.watch(lambda e: seen.__setitem__((e.block, e.call - 1), e.plan.local_slot.clone()))
    try:
        pipe.generate_latents([class_id], [seed], STEPS, 3.0)
    finally:
        stop()
        handle.remove()
    return seen


# Pure functions -------------------------------------------------------------------------------------


def test_merge_groups_numbers_groups_of_two_or_more_and_leaves_lone_tokens_out() -> None:
    slots = np.array([4, 1, 4, 2, 3, 3])  # tokens 0, 2 share slot 4; 4, 5 share slot 3; 1 and 3 alone
    assert vz.merge_groups(slots, 2, 3).tolist() == [[0, -1, 0], [-1, 1, 1]]
    with pytest.raises(ConfigError, match="2x2 token grid has 4 tokens but the slot vector has 6"):
        vz.merge_groups(slots, 2, 2)


def test_palette_is_deterministic_and_distinct() -> None:
    palette = vz.group_palette(5000)
    assert palette.shape == (5000, 3) and palette.dtype == np.uint8
    assert len({tuple(c) for c in palette.tolist()}) == 5000
    assert np.array_equal(vz.group_palette(7), palette[:7])


def test_overlay_colours_groups_and_leaves_lone_tokens_clear() -> None:
    groups = np.array([[0, -1], [1, 0]])
    overlay = vz.group_overlay(groups, alpha=0.5)
    assert overlay.shape == (2, 2, 4)
    assert overlay[0, 1].tolist() == [0, 0, 0, 0]
    assert overlay[0, 0].tolist() == overlay[1, 1].tolist() and overlay[0, 0, 3] == 128
    assert overlay[1, 0, :3].tolist() != overlay[0, 0, :3].tolist()
    image = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
    picture = vz.blend(image, overlay)
    assert picture.shape == (4, 4, 3)
    assert (picture[0:2, 2:4] == image[0:2, 2:4, None]).all()  # the lone token's pixels: unchanged
    up = vz.upsample_nearest(overlay, (4, 4))
    assert (up[0:2, 0:2] == overlay[0, 0]).all() and (up[2:4, 0:2] == overlay[1, 0]).all()
    with pytest.raises(ConfigError, match="alpha must be in"):
        vz.group_overlay(groups, alpha=0)


# One generation of the bundled model ------------------------------------------------------------------


def test_groups_drawn_are_exactly_the_plans_groups(pipe: DemoPipeline, tmp_path: Path) -> None:
    plans = _independent_plans(pipe, class_id=7, seed=3)
    for half, row in (("uncond", 0), ("cond", 1)):
        vis = vz.visualize_merges(
            pipe, "Sneaker", seed=3, num_steps=STEPS, step=[1, 3], block="all", half=half
        )
        assert vis.steps == (1, 3) and len(vis.blocks) == 3 and len(vis.views) == 6
        assert vis.image.shape == (32, 32)
        for view in vis.views:
            slots = plans[(view.block, view.step)][row].numpy()
            assert np.array_equal(view.slots, slots)
            groups, lone = _plan_partition(slots)
            assert groups, "a ratio of 0.5 must merge some tokens"
            # What is drawn: the overlay's colour classes at token level.
            overlay = view.overlay().reshape(-1, 4)
            colours = [tuple(px[:3]) if px[3] > 0 else None for px in overlay.tolist()]
            assert _partition(colours) == groups
            assert {t for t, c in enumerate(colours) if c is None} == lone
            assert view.num_groups == len(groups)
            assert view.tokens_in_groups == sum(len(g) for g in groups)
    # The PNG's overlay tiles are these pictures, pixel for pixel.
    scale = 2
    path = vz.save_png(vis, tmp_path / "fig.png", scale=scale)
    from PIL import Image

    with Image.open(path) as png:
        figure = np.asarray(png.convert("RGB"))
    assert (figure.shape[1], figure.shape[0]) == vz.figure_size(3, 2, (32, 32), scale)
    tile = 32 * scale
    for r, block in enumerate(vis.blocks):
        top = vz.PAD + r * (vz.ROW_HEADER + vz.CAPTION + tile + vz.PAD) + vz.ROW_HEADER + vz.CAPTION
        assert np.array_equal(
            figure[top : top + tile, vz.PAD : vz.PAD + tile, 0], np.kron(vis.image, np.ones((2, 2)))
        )
        for c, step in enumerate(vis.steps, start=1):
            left = vz.PAD + c * (tile + vz.PAD)
            expected = vz.upsample_nearest(vis.picture(vis.view(block, step)), (tile, tile))
            assert np.array_equal(figure[top : top + tile, left : left + tile], expected), (block, step)


def test_defaults_are_the_middle_step_and_the_first_block_that_merges(pipe: DemoPipeline) -> None:
    vis = vz.visualize_merges(pipe, 0, num_steps=STEPS)
    handle = tomediff.apply_tome(pipe, ratio=0.5)
    first = handle.report().blocks[0].name
    handle.remove()
    assert vis.steps == (STEPS // 2,) and vis.blocks == (first,)
    assert vis.views[0].groups.shape == (16, 16)


def test_bad_step_block_class_or_half_are_named_before_generating(
    pipe: DemoPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("generated although the arguments are invalid")

    monkeypatch.setattr(pipe, "generate_latents", forbidden)
    with pytest.raises(ConfigError, match=r"step 4 is out of range: .* 4 denoising steps has steps 0\.\.3"):
        vz.visualize_merges(pipe, num_steps=STEPS, step=4)
    with pytest.raises(ConfigError, match=r"unknown block 'nope'.*0 = down_blocks\.0\.attentions\.0"):
        vz.visualize_merges(pipe, num_steps=STEPS, block="nope")
    with pytest.raises(ConfigError, match=r"unknown block 3"):
        vz.visualize_merges(pipe, num_steps=STEPS, block=3)
    with pytest.raises(ConfigError, match=r"unknown class 'Unicorn'.*7 = 'Sneaker'"):
        vz.visualize_merges(pipe, "Unicorn", num_steps=STEPS)
    with pytest.raises(ConfigError, match=r"half 'uncond' does not exist here; choose from cond"):
        vz.visualize_merges(pipe, num_steps=STEPS, guidance_scale=1.0, half="uncond")
    assert not any(m._forward_pre_hooks for m in pipe.unet.modules())  # the patch was removed


def test_a_block_that_merged_nothing_is_a_clear_error(pipe: DemoPipeline) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tomediff says it merges nothing
        with pytest.raises(ConfigError, match="no block merged at step"):
            vz.visualize_merges(pipe, num_steps=2, ratio=0.002)


# CLI ---------------------------------------------------------------------------------------------


def test_cli_writes_a_png_of_the_expected_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    out = tmp_path / "new" / "merges.png"
    argv = ["visualize", "--class", "Ankle boot", "--steps", str(STEPS), "--step", "1,2"]
    argv += ["--block", "0,2", "--scale", "3", "--out", str(out), "--threads", "1"]
    assert _exit_code(argv) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as png:
        png.verify()
    with Image.open(out) as png:
        assert png.size == vz.figure_size(2, 2, (32, 32), 3) == (6 + 3 * (96 + 6), 6 + 2 * (16 + 14 + 96 + 6))
    printed = capsys.readouterr().out
    assert "down_blocks.0.attentions.0.transformer_blocks.0 (16x16) step 1:" in printed
    assert f"wrote {out} (312x270 px)" in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--steps", "4", "--step", "4"],
            "--step: step 4 is out of range: a generation with 4 denoising steps",
        ),
        (["--step", "25"], "steps 0..19"),
        (["--step", "-1"], "expected an integer >= 0, got -1"),
        (
            ["--class", "Unicorn"],
            "--class: unknown class 'Unicorn'; use an index or a name: 0 = 'T-shirt/top'",
        ),
        (["--class", "10"], "unknown class '10'"),
        (["--out", "merges.jpg"], "--out merges.jpg must name a .png file"),
        (["--out", "/proc/nope/x.png"], "--out's folder /proc/nope is not a writable directory"),
        (["--ratio", "0.9"], "ratio 0.9 is out of range"),
        (["--alpha", "0"], "alpha must be in (0, 1]"),
        (["--max-downsample", "3"], "expected a power of two"),
        (["--half", "uncond", "--guidance", "1"], "--half uncond needs --guidance other than 1"),
        (["--assets", "/nonexistent"], "--assets /nonexistent lacks demo_model.json"),
    ],
)
def test_bad_arguments_fail_in_one_line_before_any_work(
    argv: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started although the arguments are invalid")

    monkeypatch.setattr(vz, "visualize_merges", forbidden)
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "m.png")]
    assert _exit_code(["visualize", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert len(err.splitlines()) == 1 and err.startswith("tomediff visualize: error: ")


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            "nope",
            "--block: unknown block 'nope': with these settings the blocks that merge are 0 = down_blocks",
        ),
        ("5", "unknown block 5"),
    ],
)
def test_cli_bad_block_exits_2_before_generating(
    block: str,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("generated although the block is invalid")

    monkeypatch.setattr(DemoPipeline, "generate_latents", forbidden)
    out = tmp_path / "m.png"
    assert _exit_code(["visualize", "--block", block, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "up_blocks.2.attentions.1.transformer_blocks.0" in err, err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_help_gives_every_default_and_matches_the_library() -> None:
    parser = cli_main.build_parser()
    sub = parser._subparsers._group_actions[0].choices["visualize"]  # type: ignore[union-attr]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and "Default" in action.help, action.option_strings
    defaults = {a.dest: a.default for a in sub._actions}
    assert defaults["scale"] == vz.DEFAULT_SCALE and defaults["alpha"] == vz.DEFAULT_ALPHA
    assert visualize_cmd.DEFAULT_OUT.suffix == ".png"
