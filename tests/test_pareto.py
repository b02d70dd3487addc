"""The Pareto harness (``python -m tomediff.eval.pareto``): settings with diffusers caches, what they
build, the refusals, the Pareto front, the demo DiT pipeline under a cache, and one tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tomediff
from tomediff.errors import ConfigError
from tomediff.eval.pareto import (
    CACHE_KINDS,
    DEFAULT_SETTINGS,
    ParetoOptions,
    build_settings,
    main,
    pareto_front,
    parse_cache,
    parse_pareto_setting,
    run_pareto,
)
from tomediff.eval.pipeline import load_demo_dit
from tomediff.eval.testing import make_tiny_assets, make_tiny_dit_assets


class _Clock:
    current_timestep = 500


def test_cache_options_map_onto_diffusers_configs() -> None:
    from diffusers.hooks import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

    fbc = parse_cache("fbc:threshold=0.15").config()
    assert isinstance(fbc, FirstBlockCacheConfig) and fbc.threshold == 0.15
    taylor = parse_cache("taylorseer:interval=3/warmup=2/order=2").config()
    assert isinstance(taylor, TaylorSeerCacheConfig)
    assert (taylor.cache_interval, taylor.disable_cache_before_step, taylor.max_order) == (3, 2, 2)
    assert taylor.taylor_factors_dtype == torch.float32
    pab = parse_cache("pab:every=3/t_high=700").config(_Clock())
    assert isinstance(pab, PyramidAttentionBroadcastConfig)
    assert pab.spatial_attention_block_skip_range == 3
    assert pab.spatial_attention_timestep_skip_range == (100, 700)  # t_low kept at its default
    assert pab.current_timestep_callback() == 500
    faster = parse_cache("faster").config(_Clock())
    assert faster.is_guidance_distilled  # its guidance-half approximation needs video-shaped states
    mag = parse_cache("mag:threshold=0.1").config(mag_ratios=[1.0] * 4, steps=4)
    assert (mag.threshold, list(mag.mag_ratios), mag.num_inference_steps) == (0.1, [1.0] * 4, 4)
    assert parse_cache("fbc:threshold=0.1").text == "fbc:threshold=0.1"
    assert set(CACHE_KINDS) == {"fbc", "taylorseer", "pab", "faster", "mag", "sea"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("teacache", "unknown cache 'teacache'; caches are fbc, taylorseer"),
        ("fbc:interval=3", "fbc takes threshold, not 'interval'"),
        ("fbc:threshold=high", "threshold must be float, got 'high'"),
        ("taylorseer:interval=2.5", "interval must be int"),
        ("fbc:threshold", "expected KEY=VALUE"),
        ("fbc:threshold=-1", "threshold must be >= 0"),
    ],
)
def test_bad_cache_options_name_the_value_and_what_is_accepted(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_cache(text)


def test_settings_combine_tomediff_options_presets_and_a_cache() -> None:
    cache_only = parse_pareto_setting("fbc0.1:cache=fbc:threshold=0.1")
    assert cache_only.tome is None and cache_only.cache is not None
    assert cache_only.text == "cache=fbc:threshold=0.1"
    stack = parse_pareto_setting("st:ratio=0,kv_ratio=0.5,cache=fbc:threshold=0.2")
    assert stack.tome is not None and stack.cache is not None
    config = stack.tome.config()
    assert (config.ratio, config.kv_ratio) == (0.0, 0.5)
    stack = parse_pareto_setting("dit-hires-mag-merge")  # a preset of tomediff options and a cache
    assert stack.tome is not None and stack.cache == parse_cache("mag:threshold=1.0/max_skip=10")
    assert (stack.tome.config().ratio, stack.tome.config().skip_blocks) == (0.3, (1, 1))
    fastest = parse_pareto_setting("dit-mag")  # a harness preset: a measured Pareto-best point
    assert fastest.tome is None and fastest.cache == parse_cache("mag:threshold=0.4/max_skip=8")
    preset = parse_pareto_setting("downsample")
    assert preset.tome is not None and preset.tome.config().method == "downsample" and preset.cache is None
    with pytest.raises(ConfigError, match="one cache= per setting"):
        parse_pareto_setting("x:cache=fbc,cache=pab")
    with pytest.raises(ConfigError, match="give ToMeConfig options, a preset name or cache=KIND"):
        parse_pareto_setting("nothing")
    with pytest.raises(ConfigError, match="kv_ratio"):
        parse_pareto_setting("bad:kv_ratio=2")
    with pytest.raises(ConfigError, match="method must be one of"):  # a typo is an error, not a skip
        parse_pareto_setting("typo:method=merg")


def test_default_settings_parse_and_token_caching_runs_in_the_harness() -> None:
    settings = build_settings(DEFAULT_SETTINGS)
    assert len(settings) == len(DEFAULT_SETTINGS)
    token_cache = next(s for s in settings if s.tome is not None and s.tome.config().method == "cache")
    assert token_cache.cache is None


def test_pareto_front_keeps_points_no_other_beats_on_speed_and_psnr() -> None:
    points = {"a": (1.5, 30.0), "b": (2.0, 25.0), "c": (1.4, 29.0), "d": (2.0, 20.0), "e": (1.0, 40.0)}
    assert pareto_front(points) == {"a", "b", "e"}
    assert pareto_front({"x": (1.0, 1.0), "y": (1.0, 1.0)}) == {"x", "y"}  # ties dominate neither


def test_demo_dit_under_a_diffusers_cache_forgets_each_generation_and_detaches(tmp_path: Path) -> None:
    from diffusers.hooks import FirstBlockCacheConfig

    pipe = load_demo_dit(make_tiny_dit_assets(tmp_path))
    plain = pipe([0, 7], [1, 2], num_inference_steps=4)
    assert not hasattr(pipe.transformer, "_diffusers_hook")  # no cache: the pipeline adds nothing
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=10.0))  # every step after the first skips
    cached = pipe([0, 7], [1, 2], num_inference_steps=4)
    pipe([3, 4], [5, 6], num_inference_steps=4)  # another generation in between
    again = pipe([0, 7], [1, 2], num_inference_steps=4)
    pipe.transformer.disable_cache()
    assert not np.array_equal(cached, plain)
    np.testing.assert_array_equal(again, cached)  # the cache starts empty at each generation
    np.testing.assert_array_equal(pipe([0, 7], [1, 2], num_inference_steps=4), plain)


def test_run_writes_every_setting_with_speed_and_paired_metrics(tmp_path: Path) -> None:
    assets = make_tiny_dit_assets(make_tiny_assets(tmp_path / "assets"))
    settings = [
        parse_pareto_setting("fbc:cache=fbc:threshold=10"),
        parse_pareto_setting("kv:ratio=0,kv_ratio=0.5,cache=fbc:threshold=10"),
    ]
    options = ParetoOptions(
        settings=settings,
        out_dir=tmp_path / "out",
        samples_per_class=1,
        batch_size=5,
        steps=3,
        bootstrap=10,
        progress=False,
        assets_dir=assets,
    )
    rows = run_pareto(options, say=lambda _: None)
    assert [r["name"] for r in rows] == ["unaccelerated", "fbc", "kv"]
    assert rows[0]["psnr"] is None and rows[0]["speedup"] == 1.0
    assert all(r["num_images"] == 10 and len(r["batch_seconds"]) == 2 for r in rows)
    assert rows[1]["psnr"]["value"] < 100  # the cache changed the images
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["meta"]["steps"] == 3 and len(saved["meta"]["load_average_1min"]) == 3
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| unaccelerated | – | – |" in table and "cache=" not in table.split("\n")[2]


def test_run_on_the_high_resolution_dit_samples_its_1024_tokens(tmp_path: Path) -> None:
    from tomediff.eval.pareto import _dit_raw_vision

    assets = make_tiny_dit_assets(make_tiny_assets(tmp_path / "assets"), image_size=64)
    options = ParetoOptions(
        settings=[parse_pareto_setting("merge:ratio=0.5")],
        out_dir=tmp_path / "out",
        samples_per_class=1,
        batch_size=10,
        steps=2,
        bootstrap=10,
        progress=False,
        assets_dir=assets,
        image_size=64,
    )
    rows = run_pareto(options, say=lambda _: None)
    assert [r["num_images"] for r in rows] == [10, 10] and rows[1]["psnr"]["value"] < 100
    meta = json.loads((tmp_path / "out" / "results.json").read_text())["meta"]
    assert meta["image_tokens"] == 1024 and "image_size=64" in meta["model"]
    tokens = torch.randn(2, 1024, 4)
    latents = _dit_raw_vision(None, (tokens,), {})  # SeaCache's per-sample view, (C, T, H, W)
    assert [tuple(x.shape) for x in latents] == [(4, 1, 32, 32)] * 2
    assert torch.equal(latents[1][:, 0, 1, 2], tokens[1, 34])


def test_command_line_refuses_bad_settings_and_counts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--setting", "x:cache=nope"])
    assert exit_info.value.code == 2
    assert "unknown cache 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--steps", "0"])
    assert "--steps must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("preset", "full_steps"),
    [
        ("dit-tokencache", [0, 1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 18]),
        ("dit-tokencache-faster", [0, 1, 2, 3, 4, 6, 8, 12, 16]),
        ("dit-tokencache-fastest", [0, 1, 2, 3, 6, 10, 15]),
    ],
)
def test_token_cache_presets_compute_every_token_at_the_steps_the_docs_give(
    preset: str, full_steps: list[int]
) -> None:
    """The harness's 20 Euler steps (shift 1) through a tiny PixArt patched with the preset: the steps
    at which its block computes every image token (before ``start`` and at refreshes) are those
    docs/methods.md counts; the others run it on one dropped image token (``cache_ratio=0``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from conftest import tiny_pixart

    setting = parse_pareto_setting(preset)
    assert setting.tome is not None and setting.cache is None
    model = tiny_pixart()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 12, 16, generator=gen)
    kwargs = {
        "encoder_hidden_states": torch.randn(2, 8, 24, generator=gen),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(20)
    full = []
    with tomediff.apply_tome(model, setting.tome.config()) as handle:
        for step, t in enumerate(scheduler.timesteps.tolist()):
            model(x, timestep=torch.full((2,), t), return_dict=False, **kwargs)
            if all(s.tokens_after_merge == s.tokens for s in handle.state.stats.values()):
                full.append(step)
    assert full == full_steps
