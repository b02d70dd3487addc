"""Atomic patching, honest handles, numpy inputs, tomesd-compatible values and the error classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tomediff
from conftest import tiny_sd_unet, tiny_sd_unet_3level, unet_inputs
from tomediff import ToMeConfig
from tomediff.core.hooks import ToMeHook


@torch.no_grad()
def run_unet(unet: nn.Module) -> torch.Tensor:
    sample, timestep, context = unet_inputs()
    return unet(sample, timestep, context).sample


def tome_hooks(model: nn.Module) -> list[ToMeHook]:
    return [
        hook
        for module in model.modules()
        for table in (module._forward_pre_hooks, module._forward_hooks)
        for hook in table.values()
        if isinstance(hook, ToMeHook)
    ]


@pytest.mark.parametrize(
    "bad",
    [
        dict(seed=2**64),
        dict(ratio=0.9),
        dict(max_downsample=3),
        dict(ratoi=0.5),
        dict(merge_attn=False),
        dict(method="bogus"),
        dict(reuse_steps=0),
    ],
)
def test_a_failed_apply_leaves_the_previous_patch_in_place(bad: dict[str, object]) -> None:
    unet = tiny_sd_unet()
    first = tomediff.apply_tome(unet, ratio=0.5, use_rand=False)
    patched = run_unet(unet)
    hooks_before = tome_hooks(unet)
    with pytest.raises((ValueError, TypeError)):
        tomediff.apply_tome(unet, **bad)
    assert first.active
    assert tome_hooks(unet) == hooks_before
    assert torch.equal(run_unet(unet), patched)
    assert first.report().calls == 2  # the old patch is still the one that runs


def test_an_unsupported_object_leaves_nothing_behind() -> None:
    unet = tiny_sd_unet()
    handle = tomediff.apply_tome(unet, use_rand=False)
    with pytest.raises(tomediff.UnsupportedModelError):
        tomediff.apply_tome(object())
    assert handle.active


def test_a_handle_is_active_only_while_its_own_hooks_are_installed() -> None:
    unet = tiny_sd_unet()
    first = tomediff.apply_tome(unet, ratio=0.3)
    assert first.active and "active" in repr(first)
    second = tomediff.apply_tome(unet, ratio=0.6)
    assert not first.active and "removed" in repr(first)
    assert second.active and second.config.ratio == 0.6
    first.remove()  # removing a superseded handle must not touch the newer patch
    assert second.active and tome_hooks(unet)
    tomediff.remove_tome(unet)
    assert not second.active and not tome_hooks(unet)


def test_numpy_numbers_are_accepted_and_stored_as_python_types() -> None:
    cfg = ToMeConfig(
        ratio=np.float32(0.5),
        seed=np.int64(3),
        sx=np.int32(2),
        sy=np.int16(2),
        max_downsample=np.int64(2),
        use_rand=np.bool_(False),
    )
    assert cfg == ToMeConfig(ratio=0.5, seed=3, max_downsample=2, use_rand=False)
    for name, kind in (("ratio", float), ("seed", int), ("sx", int), ("sy", int), ("max_downsample", int)):
        assert type(getattr(cfg, name)) is kind, name
    assert type(cfg.use_rand) is bool
    assert hash(cfg) == hash(ToMeConfig(ratio=0.5, seed=3, max_downsample=2, use_rand=False))
    unet = tiny_sd_unet()
    handle = tomediff.apply_tome(unet, seed=np.int64(3))
    assert handle.config.seed == 3 and type(handle.config.seed) is int
    handle.reseed(np.uint64(7))


@pytest.mark.parametrize("value", [1.0, np.float64(2.0), True, np.bool_(True), "1"])
def test_integer_fields_still_refuse_non_integers(value: object) -> None:
    with pytest.raises(tomediff.ConfigError, match="seed must be an integer"):
        ToMeConfig(seed=value)  # type: ignore[arg-type]


def test_seed_range_is_what_torch_generators_accept() -> None:
    assert ToMeConfig(seed=2**64 - 1).seed == 2**64 - 1
    assert ToMeConfig(seed=-(2**63)).seed == -(2**63)
    with pytest.raises(tomediff.ConfigError, match=r"\[-2\*\*63, 2\*\*64 - 1\]"):
        ToMeConfig(seed=2**64)
    handle = tomediff.apply_tome(tiny_sd_unet())
    with pytest.raises(tomediff.ConfigError, match="seed=18446744073709551616 is outside"):
        handle.reseed(2**64)


def test_max_downsample_must_be_a_power_of_two() -> None:
    for value in (1, 2, 4, 8, 16, None):
        ToMeConfig(max_downsample=value)
    for value, hint in ((3, "Use 2"), (6, "Use 4"), (12, "Use 8")):
        with pytest.raises(tomediff.ConfigError, match=f"got {value}. {hint}, which selects the same levels"):
            tomediff.apply_tome(tiny_sd_unet(), max_downsample=value)


def test_apply_patch_takes_what_tomesd_takes() -> None:
    # numpy scalars, truthy ints for the switches, and a max_downsample that is not a power of two:
    # tomesd patches the levels whose downsampling is <= it, so 3 selects the same blocks as 2.
    unet = tiny_sd_unet_3level()
    tomediff.apply_tome(unet, ratio=0.3, max_downsample=2, use_rand=False)
    expected = run_unet(unet)
    one_level = tomediff.apply_tome(unet, ratio=0.3, max_downsample=1, use_rand=False).num_blocks
    for md in (3, np.int64(3), 3.5):
        tomediff.apply_patch(
            unet, ratio=np.float32(0.3), max_downsample=md, sx=np.int64(2), use_rand=0, merge_attn=1
        )
        assert torch.equal(run_unet(unet), expected), md
    handle = tomediff.apply_tome(unet, ratio=0.3, max_downsample=2)
    assert handle.num_blocks > one_level
    with pytest.raises(tomediff.ConfigError, match=r"max_downsample must be a power of two .* got 0"):
        tomediff.apply_patch(unet, max_downsample=0)
    assert handle.active


def test_a_model_patched_by_tomesd_is_refused_with_the_fix() -> None:
    tomesd = pytest.importorskip("tomesd")
    unet = tiny_sd_unet()
    clean = run_unet(unet)
    tomesd.apply_patch(unet, ratio=0.5, use_rand=False)
    for apply in (lambda: tomediff.apply_tome(unet), lambda: tomediff.apply_patch(unet)):
        with pytest.raises(tomediff.ConflictingPatchError, match=r"patched by tomesd .*tomesd\.remove_patch"):
            apply()
    assert not tome_hooks(unet)
    tomesd.remove_patch(unet)
    handle = tomediff.apply_tome(unet, ratio=0.0)  # after tomesd.remove_patch it works
    assert handle.active and torch.equal(run_unet(unet), clean)


def _layout(model: nn.Module) -> list[tuple[type, list[str], list[int], list[int]]]:
    """Each module's class, instance attributes and hook ids in order."""
    return [
        (type(m), sorted(vars(m)), list(m._forward_pre_hooks), list(m._forward_hooks))
        for m in model.modules()
    ]


def test_remove_patch_removes_a_patch_made_by_tomesd_itself() -> None:
    tomesd = pytest.importorskip("tomesd")
    unet = tiny_sd_unet()
    clean, layout = run_unet(unet), _layout(unet)
    tomesd.apply_patch(unet, ratio=0.5, use_rand=False)
    assert not torch.equal(run_unet(unet), clean)
    # a drop-in user (import tomediff as tomesd) unpatches with tomediff's remove_patch
    assert tomediff.remove_patch(unet) is unet
    assert _layout(unet) == layout  # original classes, no _tome_info, no size hook
    assert torch.equal(run_unet(unet), clean)
    assert tomediff.apply_tome(unet, ratio=0.5).active  # no longer refused as tomesd-patched


def test_tomesd_applied_after_tomediff_is_named_at_call_time() -> None:
    tomesd = pytest.importorskip("tomesd")
    unet = tiny_sd_unet()
    clean = run_unet(unet)
    tomediff.apply_tome(unet, ratio=0.5)
    tomesd.apply_patch(unet, ratio=0.5)
    with pytest.raises(tomediff.MergeCallError, match=r"patched twice: tomediff first, then tomesd"):
        run_unet(unet)
    tomediff.remove_patch(unet)  # the way out the message names removes both
    assert not tome_hooks(unet) and torch.equal(run_unet(unet), clean)


def test_tome_context_manager_restores_an_earlier_patch() -> None:
    unet = tiny_sd_unet()
    clean = run_unet(unet)
    first = tomediff.apply_tome(unet, ratio=0.3, use_rand=False)
    patched, layout = run_unet(unet), _layout(unet)
    with tomediff.tome(unet, ratio=0.6, use_rand=False) as inner:
        assert inner.active and not first.active
        assert not torch.equal(run_unet(unet), patched)
    assert first.active and not inner.active
    assert _layout(unet) == layout  # the same hooks, ids and order as before the block
    assert torch.equal(run_unet(unet), patched)
    # A patch applied inside the block is the user's: it stays, and the earlier one is not stacked on it.
    with tomediff.tome(unet, ratio=0.6):
        second = tomediff.apply_tome(unet, ratio=0.5, use_rand=False)
    assert second.active and not first.active
    second.remove()
    assert not tome_hooks(unet) and torch.equal(run_unet(unet), clean)


def test_remove_tome_returns_what_it_was_given() -> None:
    class Pipeline:  # not a Module, has .unet (like DiffusionPipeline)
        def __init__(self, unet: nn.Module) -> None:
            self.unet = unet

    pipe = Pipeline(tiny_sd_unet())
    tomediff.apply_tome(pipe)
    assert tomediff.remove_tome(pipe) is pipe and not tome_hooks(pipe.unet)
    assert tomediff.remove_tome(pipe.unet) is pipe.unet


def test_error_classes_are_also_the_builtin_ones() -> None:
    assert issubclass(tomediff.ConfigError, ValueError)
    assert issubclass(tomediff.NothingToPatchError, ValueError)
    assert issubclass(tomediff.UnknownOptionError, TypeError)
    assert issubclass(tomediff.UnsupportedModelError, TypeError)
    assert issubclass(tomediff.ConflictingPatchError, RuntimeError)
    for cls in (
        tomediff.ConfigError,
        tomediff.NothingToPatchError,
        tomediff.UnknownOptionError,
        tomediff.UnsupportedModelError,
        tomediff.ConflictingPatchError,
        tomediff.MergeCallError,
        tomediff.ResumeMismatchError,
        tomediff.CLIUsageError,
    ):
        assert issubclass(cls, tomediff.TomediffError)
    with pytest.raises(tomediff.UnknownOptionError, match=r"Unknown ToMeConfig option.*ratoi.*Valid options"):
        tomediff.apply_tome(tiny_sd_unet(), ratoi=0.5)
    with pytest.raises(tomediff.NothingToPatchError, match="selects none"):
        from conftest import tiny_sdxl_unet

        tomediff.apply_tome(tiny_sdxl_unet(), max_downsample=1)


def test_settings_records_are_derived_from_tomeconfig() -> None:
    import dataclasses
    import inspect

    from tomediff.bench.variants import MergeSettings
    from tomediff.config import TOMESD_FIELDS, config_from, tomesd_arguments
    from tomediff.eval.settings import Setting

    tome_fields = {f.name for f in dataclasses.fields(ToMeConfig)}
    assert {f.name for f in dataclasses.fields(MergeSettings)} <= tome_fields
    assert {f.name for f in dataclasses.fields(Setting)} - {
        "library",
        "seed_offset",
        "variant",
        "label",
    } <= tome_fields
    assert tuple(inspect.signature(tomediff.apply_patch).parameters)[1:] == TOMESD_FIELDS
    tomesd = pytest.importorskip("tomesd")
    assert tuple(inspect.signature(tomesd.apply_patch).parameters)[1:] == TOMESD_FIELDS
    settings = MergeSettings(ratio=0.5, max_downsample=2, merge_mlp=True)
    assert settings.tome_config() == ToMeConfig(ratio=0.5, max_downsample=2, use_rand=False, merge_mlp=True)
    assert tomesd_arguments(Setting(library="tomesd", ratio=0.3).tome_config())["max_downsample"] == 1
    assert config_from(Setting(library="tomediff", ratio=0.3), seed=4).seed == 4
    with pytest.raises(tomediff.ConfigError, match=r"ratio=0\.9 is outside"):
        MergeSettings(ratio=0.9, max_downsample=1)


def test_every_settings_description_is_derived_from_tomeconfig_fields() -> None:
    """Bench records, eval rows, the CLI flags and --setting keys all come from ToMeConfig's fields:
    a new field appears in each without being declared again."""
    import dataclasses

    from tomediff.bench.variants import MergeSettings
    from tomediff.cli import bench_cmd, eval_cmd
    from tomediff.config import TOMESD_FIELDS
    from tomediff.eval.settings import METHOD_FIELDS, SETTING_FIELDS, Setting, parse_setting

    names = [f.name for f in dataclasses.fields(ToMeConfig) if f.name != "generator"]
    assert [f.name for f in SETTING_FIELDS] == names
    assert [f.name for f in dataclasses.fields(MergeSettings)] == names
    assert [f.name for f in dataclasses.fields(Setting)][: len(names)] == names
    assert set(METHOD_FIELDS) == set(names) - set(TOMESD_FIELDS) - {"seed"}
    defaults = {f.name: f.default for f in dataclasses.fields(ToMeConfig)}
    assert all(
        f.default == defaults[f.name] for f in dataclasses.fields(MergeSettings) if f.name != "use_rand"
    )
    for module in (bench_cmd, eval_cmd):
        import argparse

        parser = argparse.ArgumentParser()
        module.register(parser.add_subparsers())
        sub = next(iter(parser._subparsers._group_actions[0].choices.values()))  # type: ignore[union-attr]
        flags = {o for a in sub._actions for o in a.option_strings}
        assert {"--" + n.replace("_", "-") for n in METHOD_FIELDS} <= flags, module.__name__
    # Every field is a --setting key, parsed into the same ToMeConfig.
    custom = parse_setting("x:method=downsample,downsample_factor=4,downsample_mode=avg,min_tokens=8")
    assert custom.config() == ToMeConfig(
        method="downsample", downsample_factor=4, downsample_mode="avg", min_tokens=8
    )
    row = Setting.named(parse_setting("merge-levels"))
    assert row.tome_config() == ToMeConfig(level_ratios={1: 0.6, 2: 0.3})
    assert MergeSettings.of(row.tome_config()).tome_config() == row.tome_config()
