"""method="cache": token-wise caching of whole blocks' residuals (refresh steps, partial steps, and the
rules that keep caches of different generations, batches, calls and threads apart)."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import tomediff
from conftest import tiny_pixart
from family_support import tiny_wan_shaped
from tomediff.core.hooks import has_hooks
from tomediff.errors import ConfigError, ConflictingPatchError, MergeCallError

diffusers = pytest.importorskip("diffusers")

TEXT = 5
HEIGHT, WIDTH = 6, 8  # 48 image tokens
TIMESTEPS = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]  # Flux takes sigma (t / 1000)


def tiny_flux(num_layers: int = 1, num_single_layers: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def image_ids() -> torch.Tensor:
    ids = torch.zeros(HEIGHT, WIDTH, 3)
    ids[..., 1] = torch.arange(HEIGHT)[:, None]
    ids[..., 2] = torch.arange(WIDTH)[None, :]
    return ids.reshape(-1, 3)


def flux_case(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, dict[str, Any]]:
    """Start latents and the conditioning of one generation (``seed`` makes another prompt)."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, HEIGHT * WIDTH, 8, generator=gen)
    kwargs = {
        "encoder_hidden_states": torch.randn(batch, TEXT, 16, generator=gen),
        "pooled_projections": torch.randn(batch, 8, generator=gen),
        "img_ids": image_ids(),
        "txt_ids": torch.zeros(TEXT, 3),
        "return_dict": False,
    }
    return latents, kwargs


@torch.no_grad()
def flux_step(model: nn.Module, x: torch.Tensor, kwargs: dict[str, Any], t: float) -> torch.Tensor:
    return model(x, timestep=torch.full((x.shape[0],), t), **kwargs)[0]


@torch.no_grad()
def trajectory(
    model: nn.Module, case: tuple[torch.Tensor, dict[str, Any]], timesteps: list[float] = TIMESTEPS
) -> list[torch.Tensor]:
    """Euler steps of a flow-matching sampler: the model output at every step."""
    x, kwargs = case
    outputs = []
    for t, t_next in zip(timesteps, [*timesteps[1:], 0.0], strict=True):
        out = flux_step(model, x, kwargs, t)
        outputs.append(out)
        x = x + (t_next - t) * out
    return outputs


def count_tokens(module: nn.Module) -> tuple[list[int], Callable[[], None]]:
    """The token count of every call of ``module`` (its first input's dim 1)."""
    seen: list[int] = []

    def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        seen.append(int(x.shape[1]))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    return seen, handle.remove


# Config -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cache_interval": 1}, "cache_interval must be an integer of at least 2"),
        ({"cache_interval": 2.5}, "cache_interval must be an integer, got 2.5"),
        ({"cache_ratio": -0.1}, "cache_ratio=-0.1 is outside [0, 1]"),
        ({"cache_ratio": 1.5}, "cache_ratio=1.5 is outside [0, 1]"),
        ({"cache_ratio": float("nan")}, "cache_ratio=nan is outside [0, 1]"),
        ({"cache_select": "random"}, "cache_select must be one of 'change', 'stride', got 'random'"),
        ({"cache_context": "some"}, "cache_context must be one of 'all', 'computed', got 'some'"),
        ({"cache_forecast": "quadratic"}, "cache_forecast must be one of 'none', 'linear', got 'quadratic'"),
        (
            {"cache_intervals": {0.4: 1}},
            "cache_intervals[0.4]=1: an interval must be an integer of at least 2",
        ),
        ({"cache_intervals": {1.5: 3}}, "cache_intervals progress 1.5 is outside [0, 1]"),
        ({"cache_intervals": {0.4: 2.5}}, "cache_intervals[0.4] must be an integer, got 2.5"),
        ({"cache_intervals": {}}, "cache_intervals must map progress points to refresh intervals"),
        ({"cache_intervals": ((0.4, 3), (0.4, 4))}, "cache_intervals lists progress 0.4 twice"),
        ({"cache_intervals": "0.4:3"}, "cache_intervals must map progress points to refresh intervals"),
        ({"merge_mlp": True}, "method='cache' acts on whole blocks"),
        ({"reuse_steps": 2}, "reuse_steps apply to method='merge' only"),
    ],
)
def test_config_refuses_bad_cache_settings(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        tomediff.ToMeConfig(method="cache", **options)


def test_cache_fields_need_method_cache() -> None:
    with pytest.raises(ConfigError, match=r"cache_ratio apply to method='cache' only \(got method='merge'\)"):
        tomediff.ToMeConfig(cache_ratio=0.5)
    config = tomediff.ToMeConfig(method="cache", cache_interval=4, cache_ratio=0.5, cache_select="stride")
    assert (config.cache_interval, config.cache_ratio, config.cache_select) == (4, 0.5, "stride")


def test_cache_intervals_are_stored_sorted_and_give_the_interval_by_progress() -> None:
    config = tomediff.ToMeConfig(method="cache", cache_interval=2, cache_intervals={0.7: 4, 0.4: 3})
    assert config.cache_intervals == ((0.4, 3), (0.7, 4))
    assert [config.interval_at(p) for p in (None, 0.0, 0.39, 0.4, 0.69, 0.7, 1.0)] == [2, 2, 2, 3, 3, 4, 4]
    assert hash(config) == hash(
        tomediff.ToMeConfig(method="cache", cache_interval=2, cache_intervals=config.cache_intervals)
    )
    with pytest.raises(ConfigError, match=r"cache_intervals apply to method='cache' only"):
        tomediff.ToMeConfig(cache_intervals={0.4: 3})


def test_setting_string_parses() -> None:
    from tomediff.eval.settings import parse_setting

    config = parse_setting(
        "c:method=cache,cache_interval=3,cache_ratio=0.25,cache_select=stride,cache_context=computed,"
        "cache_forecast=linear"
    ).config()
    assert (config.method, config.cache_interval, config.cache_ratio) == ("cache", 3, 0.25)
    assert (config.cache_context, config.cache_forecast) == ("computed", "linear")
    assert parse_setting("cache").config().method == "cache"
    setting = parse_setting("c:method=cache,cache_interval=2,cache_intervals=0.7:4/0.4:3")
    assert setting.config().cache_intervals == ((0.4, 3), (0.7, 4))
    assert "cache_intervals=0.4:3/0.7:4" in setting.text
    with pytest.raises(ConfigError, match=r"cache_intervals must be PROGRESS:INTERVAL pairs .*got '0.4'"):
        parse_setting("c:method=cache,cache_intervals=0.4")
    with pytest.raises(ConfigError, match=r"cache_intervals\[0.4\]=1: an interval must be"):
        parse_setting("c:method=cache,cache_intervals=0.4:1")
    with pytest.raises(ConfigError, match="cache_ratio=2"):
        parse_setting("c:method=cache,cache_ratio=2")


# Token choice ------------------------------------------------------------------------------------


def test_changed_tokens_picks_the_largest_relative_change() -> None:
    from tomediff.ops import changed_tokens

    reference = torch.ones(2, 6, 4)
    x = reference.clone()
    x[0, [1, 4]] += 1.0  # row 0: tokens 1 and 4 moved
    x[1, [0, 5]] += 2.0
    x[1, 2] += 0.5
    assert changed_tokens(x, reference, 2, shared=False).tolist() == [[1, 4], [0, 5]]
    shared = changed_tokens(x, reference, 2, shared=True)  # summed over the batch: 0 and 5 (2.0 each)
    assert shared.tolist() == [[0, 5], [0, 5]]


def test_strided_tokens_cover_every_token_within_their_spacing() -> None:
    from tomediff.ops import strided_tokens

    seen = set()
    for step in range(4):  # 48 tokens, 12 a step: spacing 4
        index = strided_tokens(2, 48, 12, step, torch.device("cpu"))
        assert index.shape == (2, 12)
        assert index[0].tolist() == sorted(set(index[0].tolist()))
        seen.update(index[0].tolist())
    assert seen == set(range(48))
    assert strided_tokens(1, 10, 3, 0, torch.device("cpu")).shape == (1, 3)


def test_fill_from_cache_puts_the_computed_tokens_among_input_plus_residual_in_either_way() -> None:
    from tomediff.ops import fill_from_cache

    gen = torch.Generator().manual_seed(0)
    x, residual = torch.randn(2, 6, 4, generator=gen), torch.randn(2, 6, 4, generator=gen)
    index, computed = torch.tensor([[1, 4], [0, 5]]), torch.randn(2, 2, 4, generator=gen)
    expected = x + residual
    for row in range(2):
        expected[row, index[row]] = computed[row]
    assert torch.equal(fill_from_cache(x, residual, index, computed), expected)
    owned = residual.clone()
    full = fill_from_cache(x, owned, index, computed, in_place=True)
    assert torch.equal(full, expected) and full.data_ptr() == owned.data_ptr()  # built in the temporary
    assert torch.equal(fill_from_cache(x, residual, None, None), x + residual)  # nothing computed


# Outputs ------------------------------------------------------------------------------------------


def tiny_sd3() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
    ).eval()


def image_model_case(name: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """A start latent and the conditioning of SD3 (``name == "sd3"``) or PixArt."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 12, 16, generator=gen)
    if name == "sd3":
        kwargs = {
            "encoder_hidden_states": torch.randn(2, TEXT, 16, generator=gen),
            "pooled_projections": torch.randn(2, 8, generator=gen),
        }
    else:
        kwargs = {
            "encoder_hidden_states": torch.randn(2, TEXT, 24, generator=gen),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
    return x, kwargs


@torch.no_grad()
def image_model_trajectory(name: str, model: nn.Module) -> list[torch.Tensor]:
    """SD3 / PixArt over a short trajectory (timesteps in [0, 1000]), each output fed back."""
    x, kwargs = image_model_case(name)
    outputs = []
    for t in (900, 700, 500, 300):
        out = model(x, timestep=torch.full((2,), t), return_dict=False, **kwargs)[0][:, :4]
        outputs.append(out)
        x = x - 0.2 * out
    return outputs


@pytest.mark.parametrize("family", ["flux", "sd3", "pixart"])
def test_ratio_one_is_bit_exact_at_every_step(family: str) -> None:
    model = {"flux": tiny_flux, "sd3": tiny_sd3, "pixart": tiny_pixart}[family]()

    def run() -> list[torch.Tensor]:
        return trajectory(model, flux_case()) if family == "flux" else image_model_trajectory(family, model)

    reference = run()
    with tomediff.apply_tome(model, method="cache", cache_interval=2, cache_ratio=1.0) as handle:
        cached = run()
        assert "partial 0" in str(handle.report())  # every call computed every token
    for step, (ours, theirs) in enumerate(zip(cached, reference, strict=True)):
        assert torch.equal(ours, theirs), f"step {step}"


@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_image_models_cache_between_refreshes(family: str) -> None:
    model = {"sd3": tiny_sd3, "pixart": tiny_pixart}[family]()
    reference = image_model_trajectory(family, model)
    with tomediff.apply_tome(model, method="cache", cache_interval=2, cache_ratio=0.5) as handle:
        cached = image_model_trajectory(family, model)
        report = str(handle.report())
    assert torch.equal(cached[0], reference[0])  # the first step refreshes
    assert not torch.equal(cached[1], reference[1])  # the second computes half the tokens
    assert "refresh 2, partial 2 per block" in report


def unpatched_steps(model: nn.Module) -> tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]:
    """The conditioning, and the inputs and outputs of every step of the unpatched trajectory (to give a
    patched model the same inputs step by step)."""
    x, kwargs = flux_case()
    inputs, outputs = [], []
    for t, t_next in zip(TIMESTEPS, [*TIMESTEPS[1:], 0.0], strict=True):
        out = flux_step(model, x, kwargs, t)
        inputs.append(x)
        outputs.append(out)
        x = x + (t_next - t) * out
    return kwargs, inputs, outputs


@pytest.mark.parametrize(
    ("select", "forecast"), [("change", "none"), ("stride", "none"), ("change", "linear")]
)
def test_refresh_steps_equal_unpatched_and_partial_steps_compute_the_ratio(
    select: str, forecast: str
) -> None:
    model = tiny_flux()
    kwargs, inputs, outputs = unpatched_steps(model)
    double, single = model.transformer_blocks[0], model.single_transformer_blocks[0]
    ff_tokens, stop_ff = count_tokens(double.ff)  # image tokens only
    single_tokens, stop_single = count_tokens(single.norm)  # [text, image]
    config = tomediff.ToMeConfig(
        method="cache", cache_interval=3, cache_ratio=0.25, cache_select=select, cache_forecast=forecast
    )
    with tomediff.apply_tome(model, config) as handle:
        for step, t in enumerate(TIMESTEPS):
            out = flux_step(model, inputs[step], kwargs, t)
            if step % 3 == 0:
                assert torch.equal(out, outputs[step]), f"refresh step {step}"
            else:
                assert not torch.equal(out, outputs[step]), f"partial step {step} computed everything"
        report = handle.report()
    stop_ff()
    stop_single()
    computed = round(0.25 * HEIGHT * WIDTH)
    expected = [HEIGHT * WIDTH if step % 3 == 0 else computed for step in range(len(TIMESTEPS))]
    assert ff_tokens == expected
    assert single_tokens == [TEXT + n for n in expected]
    assert [(b.last_call.tokens, b.last_call.tokens_after_merge) for b in report.blocks] == [(48, 48)] * 2
    text = str(report)
    assert "cache_interval=3, cache_ratio=0.25" in text and f"cache_forecast={forecast}" in text
    assert "refresh 3, partial 4 per block" in text


def test_a_start_delays_caching_and_its_first_active_step_refreshes() -> None:
    """``start`` gives token caching a warm-up: before it every step is the unpatched model's, the first
    step after it refreshes (computes every token), and the interval counts from there."""
    model = tiny_flux()
    kwargs, inputs, outputs = unpatched_steps(model)
    ff_tokens, stop_ff = count_tokens(model.transformer_blocks[0].ff)
    # Progress 1 - t: 0, 0.1, 0.2 before the start; 0.3 (step 3) is the first active step.
    with tomediff.apply_tome(model, method="cache", cache_interval=3, cache_ratio=0.25, start=0.25) as handle:
        steps = [flux_step(model, inputs[step], kwargs, t) for step, t in enumerate(TIMESTEPS)]
        text = str(handle.report())
    stop_ff()
    refreshed = [0, 1, 2, 3, 6]
    for step, (ours, theirs) in enumerate(zip(steps, outputs, strict=True)):
        assert torch.equal(ours, theirs) == (step in refreshed), f"step {step}"
    assert ff_tokens == [48, 48, 48, 48, 12, 12, 48]
    assert "refresh 2, partial 2 per block" in text


def test_cache_intervals_lengthen_the_interval_from_their_progress_on() -> None:
    """``cache_interval=2`` with ``cache_intervals={0.35: 3}``: refreshes at progress 0 and 0.2 every 2nd
    step, then from 0.35 on every 3rd step counted from the last refresh (0.5); the refresh steps give
    the unpatched outputs, the others compute a quarter of the image tokens."""
    model = tiny_flux()
    kwargs, inputs, outputs = unpatched_steps(model)
    ff_tokens, stop_ff = count_tokens(model.transformer_blocks[0].ff)
    config = tomediff.ToMeConfig(
        method="cache", cache_interval=2, cache_intervals={0.35: 3}, cache_ratio=0.25
    )
    with tomediff.apply_tome(model, config) as handle:
        steps = [flux_step(model, inputs[step], kwargs, t) for step, t in enumerate(TIMESTEPS)]
        text = str(handle.report())
    stop_ff()
    refreshed = [0, 2, 5]
    for step, (ours, theirs) in enumerate(zip(steps, outputs, strict=True)):
        assert torch.equal(ours, theirs) == (step in refreshed), f"step {step}"
    assert ff_tokens == [48 if step in refreshed else 12 for step in range(len(TIMESTEPS))]
    assert "refresh every 2 steps, from progress 0.35 every 3" in text
    assert "refresh 3, partial 4 per block" in text


def test_cache_intervals_need_the_timestep() -> None:
    """A call whose timestep the patch could not read (a model called without one) has no progress to
    choose the interval by: refused, not run at ``cache_interval``."""
    from types import SimpleNamespace

    from tomediff.core.reducers import PlanRequest
    from tomediff.core.state import ThreadMemory
    from tomediff.core.token_cache import TokenCacheReducer

    config = tomediff.ToMeConfig(method="cache", cache_interval=2, cache_intervals={0.5: 3})
    memory = ThreadMemory()
    memory.advance(None)
    state = SimpleNamespace(thread_memory=lambda: memory, progress=lambda t: 1.0 - t / 1000.0)
    request = PlanRequest(torch.zeros(1, 4, 8), 2, 2, None, None, 0, "block")  # type: ignore[arg-type]
    with pytest.raises(MergeCallError, match="cache_intervals changes the refresh interval"):
        TokenCacheReducer(config).plan(state, request)  # type: ignore[arg-type]
    memory.advance(500.0)
    plan = TokenCacheReducer(config).plan(state, request)  # type: ignore[arg-type]
    assert plan.refresh


@torch.no_grad()
def repeated_step(family: str, model: nn.Module) -> Callable[[float], torch.Tensor]:
    """A function calling ``model`` on one input of ``family`` at a timestep (as a fraction of 1)."""
    if family == "flux":
        x, kwargs = flux_case()
        return lambda t: flux_step(model, x, kwargs, t)
    x, kwargs = image_model_case(family)
    return lambda t: model(x, timestep=torch.full((2,), 1000.0 * t), return_dict=False, **kwargs)[0]


@pytest.mark.parametrize("family", ["flux", "sd3", "pixart"])
def test_computed_tokens_attend_to_every_token_through_kept_keys(family: str) -> None:
    """The same input at two all but equal timesteps, a refresh then a partial step: with
    cache_context="all" the computed tokens see the keys and values kept at the refresh for the others,
    all but the unpatched model's, so the partial step gives all but the unpatched output; attending to
    the computed tokens alone does not."""
    model = {"flux": tiny_flux, "sd3": tiny_sd3, "pixart": tiny_pixart}[family]()
    step = repeated_step(family, model)
    reference = step(0.7 - 1e-6)
    errors = {}
    for context in ("all", "computed"):
        with tomediff.apply_tome(
            model, method="cache", cache_interval=2, cache_ratio=0.25, cache_context=context
        ) as handle:
            step(0.7)  # the refresh
            partial = step(0.7 - 1e-6)
            assert "partial 1 per block" in str(handle.report())
        errors[context] = ((partial - reference).norm() / reference.norm()).item()
    assert errors["all"] < 1e-4  # 4e-6 measured for each family
    assert errors["computed"] > 1e-3  # 1e-2 to 2e-2


@pytest.mark.parametrize("cache_ratio", [0.25, 0.0])
@pytest.mark.parametrize("family", ["flux", "sd3", "pixart"])
def test_linear_forecast_just_after_a_refresh_gives_the_unpatched_output(
    family: str, cache_ratio: float
) -> None:
    """cache_forecast="linear" through each attention layout (Flux: text then image, SD3: image then
    text, PixArt: image alone): after two refreshes, a partial step at all but the last refresh's time,
    on its input, moves every kept residual, key and value a hundred-thousandth of the way between the
    refreshes past the last one, so its output is all but the unpatched model's. With cache_ratio=0 no
    image token is computed between refreshes and no keys or values are kept: every image token's
    residual is forecast, to the same end."""
    model = {"flux": tiny_flux, "sd3": tiny_sd3, "pixart": tiny_pixart}[family]()
    step = repeated_step(family, model)
    reference = step(0.7 - 1e-6)
    with tomediff.apply_tome(
        model, method="cache", cache_interval=2, cache_ratio=cache_ratio, cache_forecast="linear"
    ) as handle:
        step(0.8)  # a refresh
        away = step(0.75)  # forecast from one refresh: its residuals, keys and values as kept
        step(0.7)  # the second refresh
        partial = step(0.7 - 1e-6)
        report = str(handle.report())
        entries = [kept[0] for kept in handle.state.thread_memory().plans.values()]
    assert "refresh 2, partial 2 per block" in report
    assert ("no image token computed between" in report) == (cache_ratio == 0)
    assert entries and all(bool(e.keys_values) == (cache_ratio > 0) for e in entries)
    assert ((partial - reference).norm() / reference.norm()).item() < 1e-4
    assert ((away - step(0.75)).norm() / reference.norm()).item() > 1e-3  # the forecast is not exact


def test_linear_forecast_moves_the_refresh_residuals_and_keys_along_their_slopes() -> None:
    """cache_forecast="linear", on made-up tensors (one block, image tokens only, float64): refreshes at
    t=1.0 and 0.8, then partial steps at 0.7 (tokens 0, 1 computed) and 0.6 (tokens 2, 3). A token not
    computed gets its residual, key and value of the last refresh moved along their change between the
    two refreshes (per unit of t) to the call's t; what a partial step computes serves that call only."""
    from tomediff.core.spec import Site
    from tomediff.core.token_cache import BlockCacheAction, CacheEntry, CachePlan, _CachedKeysMode

    gen = torch.Generator().manual_seed(0)
    batch, heads, num, dim = 1, 2, 6, 4
    channels = heads * dim
    site = Site(nn.Identity(), "attn", role="call")
    action, entry = BlockCacheAction(), CacheEntry()

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def step(time: float, index: list[int] | None, keys: torch.Tensor, values: torch.Tensor) -> tuple:
        """One block call: its attention call (queries = the computed tokens' keys), then its output."""
        x = randn(batch, num, channels)
        rows = None if index is None else torch.tensor([index])
        plan = CachePlan(entry, x, rows, None if rows is None else rows[0], False, time)
        chosen = slice(None) if index is None else index
        with _CachedKeysMode(plan, site, "block"):
            attention = torch.nn.functional.scaled_dot_product_attention(
                keys[:, :, chosen], keys[:, :, chosen], values[:, :, chosen]
            )
        computed = randn(batch, num if index is None else len(index), channels)
        full = action.after(plan, computed)
        return x, computed, full, attention

    keys = [randn(batch, heads, num, dim) for _ in range(4)]
    values = [randn(batch, heads, num, dim) for _ in range(4)]
    x1, out1, _, _ = step(1.0, None, keys[0], values[0])
    x2, out2, _, _ = step(0.8, None, keys[1], values[1])
    r1, r2 = out1 - x1, out2 - x2

    def moved(at_refresh: torch.Tensor, before: torch.Tensor, time: float) -> torch.Tensor:
        return at_refresh + (at_refresh - before) * (time - 0.8) / (0.8 - 1.0)

    x3, out3, full3, attention3 = step(0.7, [0, 1], keys[2], values[2])
    others = [2, 3, 4, 5]
    torch.testing.assert_close(full3[:, others], (x3 + moved(r2, r1, 0.7))[:, others], rtol=0, atol=1e-12)
    assert torch.equal(full3[:, [0, 1]], out3)
    moved_keys, moved_values = (moved(t[1], t[0], 0.7) for t in (keys, values))
    torch.testing.assert_close(
        attention3,
        torch.nn.functional.scaled_dot_product_attention(
            keys[2][:, :, [0, 1]],
            torch.cat([keys[2][:, :, [0, 1]], moved_keys[:, :, others]], dim=2),
            torch.cat([values[2][:, :, [0, 1]], moved_values[:, :, others]], dim=2),
        ),
        rtol=0,
        atol=1e-12,
    )
    # At 0.6 tokens 0 and 1, computed at 0.7, are again the refresh's forecast: twice its change.
    x4, out4, full4, attention4 = step(0.6, [2, 3], keys[3], values[3])
    others = [0, 1, 4, 5]
    torch.testing.assert_close(full4[:, others], (x4 + r2 + (r2 - r1))[:, others], rtol=0, atol=1e-12)
    assert torch.equal(full4[:, [2, 3]], out4)
    moved_keys, moved_values = (moved(t[1], t[0], 0.6) for t in (keys, values))
    full_keys, full_values = moved_keys.clone(), moved_values.clone()
    full_keys[:, :, [2, 3]], full_values[:, :, [2, 3]] = keys[3][:, :, [2, 3]], values[3][:, :, [2, 3]]
    torch.testing.assert_close(
        attention4,
        torch.nn.functional.scaled_dot_product_attention(keys[3][:, :, [2, 3]], full_keys, full_values),
        rtol=0,
        atol=1e-12,
    )


def test_ratio_zero_fills_every_image_token_from_the_forecast() -> None:
    """cache_ratio=0 on made-up tensors (float64): after refreshes at t=1.0 and 0.8, a partial step at
    0.7 gives every image token its input plus the last refresh's residual moved along its change to
    0.7; the one token the block ran on for its layout is dropped, and nothing is renewed."""
    from tomediff.core.token_cache import BlockCacheAction, CacheEntry, CachePlan

    gen = torch.Generator().manual_seed(0)
    action, entry = BlockCacheAction(), CacheEntry()
    shape = (2, 6, 8)

    def step(time: float, index: list[int] | None) -> tuple[torch.Tensor, torch.Tensor, Any]:
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        rows = None if index is None else torch.tensor([index, index])
        plan = CachePlan(entry, x, rows, None, False, time, forecast_only=True)
        computed = torch.randn(shape[0], shape[1] if index is None else len(index), shape[2], generator=gen)
        return x, computed.double(), action.after(plan, computed.double())

    x1, out1, _ = step(1.0, None)
    x2, out2, _ = step(0.8, None)
    kept = entry.residual.clone()
    x3, _, full = step(0.7, [0])
    r1, r2 = out1 - x1, out2 - x2
    torch.testing.assert_close(full, x3 + r2 + (r2 - r1) * 0.5, rtol=0, atol=1e-12)
    assert torch.equal(entry.residual, kept)
    plan = CachePlan(entry, x3, torch.tensor([[0], [0]]), None, False, 0.7, forecast_only=True)
    assert plan.num_merged == 0


def test_kept_keys_need_an_attention_call_the_mode_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    def attention_by_hand(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **_: Any
    ) -> torch.Tensor:
        weights = (query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5).softmax(dim=-1)
        return weights @ value

    # An attention backend computing attention another way: no F.scaled_dot_product_attention call.
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", attention_by_hand)
    model = tiny_flux()
    step = repeated_step("flux", model)
    with (
        tomediff.apply_tome(model, method="cache", cache_interval=2, cache_ratio=0.25),
        pytest.raises(MergeCallError, match="saw no attention call"),
    ):
        step(0.7)


def test_partial_steps_stay_close_to_unpatched() -> None:
    model = tiny_flux()
    reference = trajectory(model, flux_case())
    with tomediff.apply_tome(model, method="cache", cache_interval=3, cache_ratio=0.5):
        cached = trajectory(model, flux_case())
    error = (cached[-1] - reference[-1]).norm() / reference[-1].norm()
    assert 0 < error < 0.5  # cached tokens move with their input: far closer than noise (error ~1.4)


# Generations, batches, calls, threads -------------------------------------------------------------


def fresh_result(case: tuple[torch.Tensor, dict[str, Any]], **options: Any) -> list[torch.Tensor]:
    model = tiny_flux()
    with tomediff.apply_tome(model, method="cache", **options):
        return trajectory(model, case)


def test_a_second_generation_equals_a_fresh_models() -> None:
    model = tiny_flux()
    handle = tomediff.apply_tome(model, method="cache", cache_interval=3, cache_ratio=0.25)
    trajectory(model, flux_case(seed=1))  # another prompt first
    second = trajectory(model, flux_case(seed=2))  # the timestep going up starts a new generation
    smaller = trajectory(model, flux_case(batch=1, seed=2))  # and a batch-size change
    handle.remove()
    for ours, fresh in zip(second, fresh_result(flux_case(seed=2)), strict=True):
        assert torch.equal(ours, fresh)
    for ours, fresh in zip(smaller, fresh_result(flux_case(batch=1, seed=2)), strict=True):
        assert torch.equal(ours, fresh)


def test_new_generation_separates_one_that_starts_lower() -> None:
    def cut_short_then_lower(mark: bool) -> list[torch.Tensor]:
        model = tiny_flux()
        with tomediff.apply_tome(model, method="cache", cache_interval=3, cache_ratio=0.25) as handle:
            trajectory(model, flux_case(seed=1), TIMESTEPS[:2])  # cut short at t = 0.9
            if mark:
                handle.new_generation()
            return trajectory(model, flux_case(seed=2), TIMESTEPS[2:])  # img2img-like: starts lower

    model = tiny_flux()
    with tomediff.apply_tome(model, method="cache", cache_interval=3, cache_ratio=0.25):
        fresh = trajectory(model, flux_case(seed=2), TIMESTEPS[2:])
    marked = cut_short_then_lower(mark=True)
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(marked, fresh, strict=True))
    # Unmarked, the timesteps alone see one generation: its second step reuses the first prompt's cache.
    assert not torch.equal(cut_short_then_lower(mark=False)[0], fresh[0])


def test_demo_dit_classes_back_to_back_equal_a_fresh_patch() -> None:
    from tomediff.eval import load_demo_dit

    pipe = load_demo_dit()
    with tomediff.apply_tome(pipe, method="cache", cache_interval=3, cache_ratio=0.25):
        pipe.generate_latents([1, 2], [0, 1], 4)
        second = pipe.generate_latents([7, 8], [0, 1], 4)
        smaller = pipe.generate_latents([7], [0], 4)
    with tomediff.apply_tome(pipe, method="cache", cache_interval=3, cache_ratio=0.25):
        fresh = pipe.generate_latents([7, 8], [0, 1], 4)
    with tomediff.apply_tome(pipe, method="cache", cache_interval=3, cache_ratio=0.25):
        fresh_smaller = pipe.generate_latents([7], [0], 4)
    assert torch.equal(second, fresh)
    assert torch.equal(smaller, fresh_smaller)


def test_guidance_halves_as_two_calls_keep_their_own_caches() -> None:
    model = tiny_flux()
    uncond, cond = flux_case(batch=1, seed=4), flux_case(batch=1, seed=5)
    expected_uncond = fresh_result(uncond)
    expected_cond = fresh_result(cond)
    with tomediff.apply_tome(model, method="cache", cache_interval=3, cache_ratio=0.25):
        xu, xc = uncond[0], cond[0]
        for step, (t, t_next) in enumerate(zip(TIMESTEPS, [*TIMESTEPS[1:], 0.0], strict=True)):
            out_u = flux_step(model, xu, uncond[1], t)  # two calls at one timestep
            out_c = flux_step(model, xc, cond[1], t)
            assert torch.equal(out_u, expected_uncond[step]), step
            assert torch.equal(out_c, expected_cond[step]), step
            xu, xc = xu + (t_next - t) * out_u, xc + (t_next - t) * out_c


def test_threads_keep_their_own_caches() -> None:
    model = tiny_flux()
    cases = [flux_case(seed=6), flux_case(seed=7)]
    expected = [fresh_result(case) for case in cases]
    results: list[list[torch.Tensor]] = [[], []]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            x, kwargs = cases[index]
            for t, t_next in zip(TIMESTEPS, [*TIMESTEPS[1:], 0.0], strict=True):
                barrier.wait(timeout=30)  # steps of the two threads interleave
                out = flux_step(model, x, kwargs, t)
                results[index].append(out)
                x = x + (t_next - t) * out
        except BaseException as error:  # reported by the main thread
            errors.append(error)
            barrier.abort()

    with tomediff.apply_tome(model, method="cache", cache_interval=3, cache_ratio=0.25):
        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors
    for index in range(2):
        for ours, fresh in zip(results[index], expected[index], strict=True):
            assert torch.equal(ours, fresh)


# Removal and refusals -----------------------------------------------------------------------------


def test_removal_leaves_nothing_and_frees_the_caches() -> None:
    model = tiny_flux()
    reference = trajectory(model, flux_case())
    handle = tomediff.apply_tome(model, method="cache", cache_interval=3, cache_ratio=0.25)
    trajectory(model, flux_case())
    memory = handle.state.thread_memory()
    assert len(memory.plans) == 2  # one cache per block
    handle.remove()
    assert memory.plans == {}
    assert not has_hooks(model)
    assert not any(getattr(m, t) for m in model.modules() for t in ("_forward_pre_hooks", "_forward_hooks"))
    for ours, theirs in zip(trajectory(model, flux_case()), reference, strict=True):
        assert torch.equal(ours, theirs)
    again = tomediff.apply_tome(model, method="cache")
    trajectory(model, flux_case())
    memory = again.state.thread_memory()
    assert memory.plans
    tomediff.remove_tome(model)  # removing by model frees them too
    assert memory.plans == {}


def test_models_without_a_block_layout_are_refused() -> None:
    wan = tiny_wan_shaped("WanTransformer3DModel", num_layers=1)
    with pytest.raises(ConfigError, match=r"declares no block-level layout for block 'blocks\.0'"):
        tomediff.apply_tome(wan, method="cache")


def test_block_attention_mask_is_refused_at_partial_steps() -> None:
    model = tiny_pixart()
    gen = torch.Generator().manual_seed(0)
    kwargs = {
        "encoder_hidden_states": torch.randn(1, TEXT, 24, generator=gen),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        "attention_mask": torch.ones(1, 16),  # a self-attention mask over the 4x4 image tokens
    }
    x = torch.randn(1, 4, 8, 8, generator=gen)
    with tomediff.apply_tome(model, method="cache", cache_interval=2, cache_ratio=0.5), torch.no_grad():
        model(x, timestep=torch.tensor([500]), **kwargs)  # a refresh computes every token
        with pytest.raises(MergeCallError, match="under the attention mask 'attention_mask'"):
            model(x, timestep=torch.tensor([400]), **kwargs)


def test_attention_caches_are_refused_on_token_cached_blocks_in_either_order() -> None:
    from diffusers import PyramidAttentionBroadcastConfig

    def broadcast() -> PyramidAttentionBroadcastConfig:
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 500
        )

    model = tiny_flux()
    model.enable_cache(broadcast())
    with pytest.raises(
        ConflictingPatchError, match="Pyramid Attention Broadcast skips or replays the computation"
    ):
        tomediff.apply_tome(model, method="cache")
    model.disable_cache()
    with tomediff.apply_tome(model, method="cache"):
        model.enable_cache(broadcast())
        with pytest.raises(MergeCallError, match="method='cache' runs that block on a different part"):
            trajectory(model, flux_case(), TIMESTEPS[:1])
        model.disable_cache()
        trajectory(model, flux_case(), TIMESTEPS[:2])  # without it, the patch runs again


def stack_cache(kind: str) -> Any:
    """A cache computing some steps in a row and skipping others: FirstBlockCache, or MagCache computing
    steps 0-3 (its retention), then every other step (ratios of 1 accumulate no error, so only
    max_skip_steps=1 makes it compute): 0, 1, 2, 3, 5."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig

    if kind == "first_block_cache":
        return FirstBlockCacheConfig(threshold=0.2)  # computes steps 0-3 and 6 here
    steps = len(TIMESTEPS)
    return MagCacheConfig(
        mag_ratios=[1.0] * steps, num_inference_steps=steps, retention_ratio=0.5, max_skip_steps=1
    )


def cached_trajectory(model: nn.Module) -> list[torch.Tensor]:
    """A generation as a pipeline runs it under a diffusers cache: in a cache context, from a reset."""
    model._reset_stateful_cache()
    with model.cache_context("cond"):
        return trajectory(model, flux_case())


@pytest.mark.parametrize("tome_first", [True, False])
@pytest.mark.parametrize("kind", ["first_block_cache", "mag_cache"])
def test_stack_caches_refuse_token_caching_in_their_head_and_tail(kind: str, tome_first: bool) -> None:
    model = tiny_flux(num_layers=2, num_single_layers=2)
    name = "FirstBlockCache" if kind == "first_block_cache" else "MagCache"
    for skip, role in (
        ((0, 1), "transformer_blocks.0' is its head"),
        ((1, 0), "single_transformer_blocks.1' is its tail"),
    ):
        message = f"{name} measures the residual .* '{re.escape(role)}.*skip_blocks=\\(1, 1\\)"
        if tome_first:
            handle = tomediff.apply_tome(model, method="cache", skip_blocks=skip)
            model.enable_cache(stack_cache(kind))
            with pytest.raises(MergeCallError, match=message):
                cached_trajectory(model)
            handle.remove()
        else:
            model.enable_cache(stack_cache(kind))
            with pytest.raises(ConflictingPatchError, match=message):
                tomediff.apply_tome(model, method="cache", skip_blocks=skip)
            assert not has_hooks(model)
        model.disable_cache()


def record_block_steps(model: nn.Module, attn: nn.Module) -> tuple[list[tuple[int, int]], Callable[[], None]]:
    """(step of the generation, tokens) of every call of ``attn``: a model pre-hook counts the steps."""
    step, seen = [-1], []

    def count_step(*_: Any) -> None:
        step[0] += 1

    def record(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append((step[0], int((args[0] if args else kwargs["hidden_states"]).shape[1])))

    handles = [
        model.register_forward_pre_hook(count_step),
        attn.register_forward_pre_hook(record, with_kwargs=True),
    ]
    return seen, lambda: [h.remove() for h in handles]


@pytest.mark.parametrize("removed_first", ["tome", "cache"])
@pytest.mark.parametrize("kind", ["first_block_cache", "mag_cache"])
def test_token_caching_runs_in_the_steps_a_stack_cache_computes(kind: str, removed_first: str) -> None:
    """Between the cache's head and tail, a block the cache passes through makes no plan; the steps it
    skips still count towards the refresh interval, so the block's first step after a gap refreshes."""
    model = tiny_flux(num_layers=2, num_single_layers=2)
    # (an inner block's attention, the text tokens its input holds besides the image's)
    inner = [(model.transformer_blocks[1].attn, 0), (model.single_transformer_blocks[0].attn, TEXT)]
    image, partial_image = HEIGHT * WIDTH, HEIGHT * WIDTH // 4

    def patch() -> tomediff.ToMeHandle:
        return tomediff.apply_tome(
            model, method="cache", cache_interval=2, cache_ratio=0.25, skip_blocks=(1, 1)
        )

    plain = trajectory(model, flux_case())
    model.enable_cache(stack_cache(kind))
    cached = cached_trajectory(model)
    model.disable_cache()
    with patch():
        token_cached = trajectory(model, flux_case())
    stacked = []
    for tome_first in (True, False):
        if tome_first:
            handle = patch()
            model.enable_cache(stack_cache(kind))
        else:
            model.enable_cache(stack_cache(kind))
            handle = patch()
        seen = [(record_block_steps(model, attn), text) for attn, text in inner]
        stacked.append(cached_trajectory(model))
        expected_partial = 0
        for (calls, remove), text in seen:
            remove()
            steps = [step for step, _ in calls]
            assert 2 <= len(steps) < len(TIMESTEPS)  # the cache skipped some steps
            expected, refreshed = [], None
            for step in steps:  # a refresh unless the last one was a step before (interval 2)
                partial = refreshed is not None and step - refreshed < 2
                refreshed = refreshed if partial else step
                expected.append(text + (partial_image if partial else image))
            assert [tokens for _, tokens in calls] == expected
            expected_partial = sum(n == text + partial_image for n in expected)
        assert expected_partial > 0
        refresh = len(seen[0][0][0]) - expected_partial
        assert f"refresh {refresh}, partial {expected_partial} per block" in str(handle.report())
        if removed_first == "tome":
            handle.remove()
            assert all(torch.equal(a, b) for a, b in zip(cached_trajectory(model), cached, strict=True))
            model.disable_cache()
        else:
            model.disable_cache()
            assert all(
                torch.equal(a, b) for a, b in zip(trajectory(model, flux_case()), token_cached, strict=True)
            )
            handle.remove()
        assert all(torch.equal(a, b) for a, b in zip(trajectory(model, flux_case()), plain, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(*stacked, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(stacked[0], cached, strict=True))


def test_token_caching_of_every_token_under_mag_cache_equals_mag_cache_alone() -> None:
    model = tiny_flux(num_layers=2, num_single_layers=2)
    model.enable_cache(stack_cache("mag_cache"))
    cached = cached_trajectory(model)
    with tomediff.apply_tome(model, method="cache", cache_ratio=1.0, skip_blocks=(1, 1)):
        stacked = cached_trajectory(model)
    assert all(torch.equal(a, b) for a, b in zip(stacked, cached, strict=True))


def test_bench_times_cache_over_a_trajectory() -> None:
    from tomediff.bench.runner import _trajectory_note
    from tomediff.bench.variants import MergeSettings

    settings = MergeSettings.of(tomediff.ToMeConfig(method="cache", cache_interval=3))
    assert settings.varies_over_steps
    assert settings.ideal(1) is None
    assert "every token computed in 2" in _trajectory_note(settings, 6)


def test_call_timing_benchmark_tells_partial_steps_from_full_ones() -> None:
    """benchmarks/token_cache_calls.py reads each call's kind from the patch's report: every 2nd call
    of a 6-step trajectory refreshing every 2nd step is partial."""
    import importlib.util
    from pathlib import Path

    from tomediff.eval import load_demo_dit

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "token_cache_calls.py"
    spec = importlib.util.spec_from_file_location("token_cache_calls", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pipe = load_demo_dit()
    with tomediff.apply_tome(pipe.transformer, method="cache", cache_interval=2, cache_ratio=0.25) as handle:
        seconds, kinds = module._timed_calls(pipe, handle, 2, 6)
    assert kinds == [False, True] * 3
    assert len(seconds) == 6 and all(s > 0 for s in seconds)
    assert module._timed_calls(pipe, None, 2, 2)[1] == [None, None]
