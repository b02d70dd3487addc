"""The benchmark's models, measurements and outputs (tiny configs; no timing assertions)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tomediff
from tomediff.bench.measure import forward
from tomediff.bench.models import MODELS, build_model, get_model_spec, make_inputs, parameter_count
from tomediff.bench.report import CSV_FIELDS
from tomediff.bench.runner import (
    MIN_AVAILABLE_SAVING,
    BenchConfig,
    Record,
    _derive,
    at_timestep,
    run_benchmark,
)
from tomediff.bench.variants import MergeSettings, make_variant
from tomediff.cli import bench_cmd


def build_on_meta(name: str) -> torch.nn.Module:
    from tomediff.bench.models import _model_class

    spec = get_model_spec(name)
    with torch.device("meta"):
        return _model_class(spec.kind)(**dict(spec.config))


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_configs_match_the_published_parameter_counts(name: str) -> None:
    spec = MODELS[name]
    assert parameter_count(build_on_meta(name)) == spec.published_params


def test_pixart_config_is_pixart_alpha_xl2() -> None:
    model = build_on_meta("pixart")
    assert len(model.transformer_blocks) == 28
    assert model.inner_dim == 16 * 72 == 1152
    assert model.config.patch_size == 2 and model.config.caption_channels == 4096
    # ~0.6B parameters, as published for PixArt-α.
    assert 0.6e9 < parameter_count(model) < 0.62e9


@pytest.mark.parametrize("name", ["tiny-unet", "tiny-pixart", "sd15-block"])
def test_built_models_run_on_their_inputs(name: str) -> None:
    spec = get_model_spec(name)
    model = build_model(spec)
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in model.parameters())
    resolution = 64 if spec.kind == "unet" else 128
    out = forward(model, make_inputs(spec, 2, resolution))
    assert out.shape[0] == 2 and out.shape[-1] == resolution // 8
    assert torch.isfinite(out).all()


class OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def ops_of(variant_name: str) -> set[str]:
    spec = get_model_spec("tiny-unet")
    model = build_model(spec)
    inputs = make_inputs(spec, 2, 64)
    variant = make_variant(variant_name, MergeSettings(ratio=0.5, max_downsample=1))
    variant.apply(model)
    recorder = OpRecorder()
    with recorder:
        forward(model, inputs)
    variant.remove(model)
    return recorder.ops


def test_ideal_skips_matching() -> None:
    """ToMe's matching ranks src tokens by similarity (a sort); the ideal variant must not."""
    baseline, merged, ideal = ops_of("baseline"), ops_of("tomediff"), ops_of("ideal")
    ranking = {"sort", "argsort", "topk", "max"}
    assert merged & ranking, "tomediff's matching should rank tokens"
    assert not (ideal - baseline) & ranking, f"ideal ranks tokens: {(ideal - baseline) & ranking}"


def test_reuse_cfg_takes_the_benchmark_batch_as_a_guidance_pair() -> None:
    """The benchmark calls a bare model with batch 2 standing for [unconditional, conditional]: with
    reuse_cfg both halves get the plan matched on the second, where a bare patch would refuse to guess."""
    spec = get_model_spec("tiny-unet")
    model = build_model(spec)
    inputs = make_inputs(spec, 2, 64)
    variant = make_variant("tomediff", MergeSettings(ratio=0.5, max_downsample=1, reuse_cfg=True))
    variant.apply(model)
    plans: list[Any] = []
    variant._handle.watch(lambda event: plans.append(event.plan))
    try:
        forward(model, inputs)
    finally:
        variant.remove(model)
    assert plans and all(torch.equal(p.local_slot[0], p.local_slot[1]) for p in plans)
    with (
        pytest.raises(tomediff.MergeCallError, match="cfg_layout"),
        tomediff.tome(model, ratio=0.5, max_downsample=1, reuse_cfg=True),
    ):
        forward(model, inputs)


def test_saving_realised_formula() -> None:
    def rec(variant: str, ratio: float | None, seconds: float, peak: int, flops: int) -> Record:
        return Record(
            model="m",
            resolution=512,
            variant=variant,
            ratio=ratio,
            batch=2,
            device="cpu",
            dtype="fp32",
            tokens=4096,
            latency_median_s=seconds,
            peak_mem_bytes=peak,
            flops=flops,
        )

    records = [
        rec("baseline", None, 10.0, 100, 1000),
        rec("tomediff", 0.5, 8.5, 90, 800),
        rec("tomesd", 0.5, 9.0, 150, 800),
        rec("ideal", 0.5, 8.0, 80, 780),
    ]
    _derive(records)
    base, ours, theirs, ideal = records
    assert base.speedup == 1.0 and base.saving_realised is None
    assert ours.speedup == pytest.approx(10 / 8.5)
    assert ours.saving_realised == pytest.approx(0.75)  # saved 1.5 s of the possible 2 s
    assert theirs.saving_realised == pytest.approx(0.5)
    assert ideal.saving_realised == pytest.approx(1.0)
    assert theirs.mem_vs_baseline == pytest.approx(1.5)
    assert ours.flops_vs_baseline == pytest.approx(0.8)

    # An ideal within 2% of the baseline leaves nothing to realise: the ratio would be noise.
    flat = [
        rec("baseline", None, 10.0, 100, 1000),
        rec("tomediff", 0.5, 9.95, 90, 990),
        rec("ideal", 0.5, 9.9, 80, 980),
    ]
    _derive(flat)
    assert flat[1].speedup == pytest.approx(10 / 9.95) and flat[1].saving_realised is None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    """One end-to-end CLI run on the tiny UNet with every variant, memory and FLOPs."""
    from tomediff.cli.main import build_parser

    out = tmp_path_factory.mktemp("bench")
    argv = [
        "--model", "tiny-unet", "--resolution", "64", "--ratio", "0.5", "--device", "cpu",
        "--repeats", "2", "--warmup", "1", "--compare", "tomesd", "--out", str(out), "--threads", "1",
    ]  # fmt: skip
    parser = build_parser()
    if "bench" not in parser._subparsers._group_actions[0].choices:  # type: ignore[union-attr]
        # cli/main.py does not list the subcommand yet: run it through its own parser.
        import argparse

        parser = argparse.ArgumentParser(prog="tomediff")
        bench_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *argv])
    return args.func(args), out


def test_tiny_run_writes_every_variant(tiny_run: tuple[int, Path]) -> None:
    code, out = tiny_run
    assert code == 0
    data = json.loads((out / "bench.json").read_text())
    assert data["environment"]["torch"] == torch.__version__
    assert data["environment"]["tomediff"] == tomediff.__version__
    records = data["records"]
    assert sorted(r["variant"] for r in records) == ["baseline", "ideal", "tomediff", "tomesd"]
    for record in records:
        assert record["status"] == "ok", record["error"]
        assert record["model"] == "tiny-unet" and record["resolution"] == 64
        assert len(record["latencies_s"]) == 2
        assert record["latency_median_s"] > 0 and record["speedup"] > 0
        assert record["flops"] > 0
        assert record["peak_mem_bytes"] > 0 and record["model_mem_bytes"] > 0
        assert record["mem_vs_baseline"] > 0
    by_variant = {r["variant"]: r for r in records}
    assert by_variant["baseline"]["ratio"] is None and by_variant["tomediff"]["ratio"] == 0.5
    t_base, t_ideal = by_variant["baseline"]["latency_median_s"], by_variant["ideal"]["latency_median_s"]
    for name in ("tomediff", "tomesd", "ideal"):
        saving = by_variant[name]["saving_realised"]
        # Undefined (None) when noise makes the ideal (almost) no faster than the baseline on a model
        # this tiny.
        assert (saving is None) == (t_base - t_ideal <= MIN_AVAILABLE_SAVING * t_base)
        assert saving is None or math.isfinite(saving)
    # Same semantics as tomesd (deterministic partition): outputs agree to float rounding.
    assert by_variant["tomediff"]["max_rel_diff_vs_tomesd"] < 1e-4


def test_tiny_run_flops_show_the_matching_cost(tiny_run: tuple[int, Path]) -> None:
    """tomediff and the ideal do the same merged work; only tomediff pays the similarity matmul:
    B * Ns * Nd * C multiply-adds in each of the 3 level-1 blocks of the tiny UNet (8x8 latent:
    48 src, 16 dst tokens of 32 channels)."""
    _, out = tiny_run
    flops = {r["variant"]: r["flops"] for r in json.loads((out / "bench.json").read_text())["records"]}
    assert flops["ideal"] < flops["baseline"]
    assert flops["tomediff"] - flops["ideal"] == 3 * 2 * (2 * 48 * 16 * 32)
    assert flops["tomesd"] == flops["tomediff"]


def test_tiny_run_csv_and_plot(tiny_run: tuple[int, Path]) -> None:
    _, out = tiny_run
    with (out / "bench.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == CSV_FIELDS
    assert [r["variant"] for r in rows] == ["baseline", "tomediff", "tomesd", "ideal"]
    for row in rows:
        assert float(row["latency_median_s"]) > 0
        assert int(row["peak_mem_bytes"]) > 0 and int(row["flops"]) > 0
        assert len(row["latencies_s"].split(";")) == 2
    png = (out / "speedup.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_failing_variant_is_recorded_and_the_rest_still_run() -> None:
    # tomesd 0.1.3 predates PixArt's block (no norm3): its failure must not stop the other variants.
    config = BenchConfig(
        models=["tiny-pixart"],
        resolutions=[128],
        repeats=1,
        variants=["baseline", "tomediff", "tomesd", "ideal"],
        memory=False,
    )
    records = {r.variant: r for r in run_benchmark(config).records}
    assert records["tomesd"].status == "error" and records["tomesd"].error
    for name in ("baseline", "tomediff", "ideal"):
        assert records[name].status == "ok" and records[name].latency_median_s is not None
        assert records[name].flops and records[name].peak_mem_bytes is None


def test_table_shows_results_and_errors() -> None:
    from rich.console import Console

    from tomediff.bench.report import build_table
    from tomediff.bench.runner import BenchResult

    def rec(variant: str, ratio: float | None, **fields: Any) -> Record:
        return Record("sd15", 512, variant, ratio, 2, "cpu", "fp32", 4096, **fields)

    records = [
        rec("baseline", None, latency_median_s=2.0, latency_min_s=1.9, speedup=1.0, flops=3 * 10**9),
        rec("tomediff", 0.5, latency_median_s=1.5, latency_min_s=1.4, speedup=4 / 3, saving_realised=0.9),
        rec("tomesd", 0.5, status="error", error="AttributeError: no norm3"),
    ]
    env = {"device": "cpu", "torch_threads": 1, "torch": "t", "diffusers": "d", "tomesd": "0.1.3", "cpu": "c"}
    console = Console(width=200, record=True)
    console.print(build_table(BenchResult(BenchConfig(), env, records)))
    text = console.export_text()
    assert "1.33x" in text and "90%" in text and "3.0" in text
    assert "AttributeError: no norm3" in text


def test_trajectory_timesteps_split_the_denoising_evenly() -> None:
    from tomediff.bench.runner import trajectory_timesteps

    assert trajectory_timesteps(2) == [750, 250]
    assert trajectory_timesteps(6) == [917, 750, 583, 417, 250, 83]


def test_named_settings_run_with_their_ideals() -> None:
    """A downsample and a reuse setting give rows; the reuse and schedule settings are timed over a
    trajectory against the ideal of their selection; downsampling has no ideal."""
    from tomediff.eval.settings import parse_setting

    named = [parse_setting(t) for t in ("downsample", "merge+reuse", "merge", "merge+schedule")]
    config = BenchConfig(
        models=["tiny-unet"], resolutions=[64], repeats=1, memory=False, named=named, trajectory=2
    )
    records = {r.key: r for r in run_benchmark(config).records}
    assert list(records) == [
        "baseline",
        "tomediff:downsample",
        "tomediff:merge+reuse",
        "ideal:merge+reuse",
        "tomediff:merge",
        "tomediff:merge+schedule",
        "ideal:merge+schedule",
    ]
    assert all(r.status == "ok" and r.latency_median_s for r in records.values())
    assert config.total_steps() == 2 * (1 + 1 + 2 + 1 + 1 + 2 + 2)  # calls x (warm-up + timed)
    down = records["tomediff:downsample"]
    assert down.reference is None and down.saving_realised is None and "no ideal" in (down.note or "")
    assert down.ratio is None and down.flops < records["baseline"].flops
    reuse = records["tomediff:merge+reuse"]
    assert reuse.calls_per_sample == 2 and "matched in 1" in (reuse.note or "")
    assert reuse.reference == records["tomediff:merge"].reference == "ideal:merge+reuse"
    assert records["ideal:merge+reuse"].calls_per_sample == 1  # no reuse to time in the ideal
    assert records["tomediff:merge+schedule"].reference == "ideal:merge+schedule"
    assert "reduced in 1" in (records["ideal:merge+schedule"].note or "")
    # The schedule is off in one of the two calls: half the ideal's FLOPs saving per call.
    base, ideal = records["baseline"].flops, records["ideal:merge+reuse"].flops
    assert records["ideal:merge+schedule"].flops == pytest.approx((base + ideal) / 2, rel=0.01)


def test_token_count_and_trajectory_timesteps_follow_each_family() -> None:
    from tomediff.bench.models import MODELS, make_inputs
    from tomediff.bench.runner import _tokens, at_timestep

    # 1024² = 128² latent: SD 1.5's top level sees it whole; SDXL (and its lone first transformer) its
    # level 2; the DiTs 2x2 patches
    expected = {"sd15": 16384, "sdxl": 4096, "sdxl-block": 4096, "pixart": 4096, "sd3": 4096, "flux": 4096}
    assert {name: _tokens(MODELS[name], 1024) for name in expected} == expected
    flux = at_timestep(MODELS["flux"], make_inputs(MODELS["flux"], 1, 256), 250)
    assert float(flux.kwargs["timestep"][0]) == 0.25  # FluxPipeline's t / 1000
    assert make_inputs(MODELS["sdxl-block"], 1, 1024).args[0].shape == (1, 640, 64, 64)
    unet = at_timestep(MODELS["sd15"], make_inputs(MODELS["sd15"], 1, 256), 250)
    assert int(unet.args[1][0]) == 250


def test_wan_config_is_wan21_t2v_13b() -> None:
    model = build_on_meta("wan-1.3b")
    assert type(model).__name__ == "WanTransformer3DModel"
    assert len(model.blocks) == 30
    assert model.blocks[0].attn1.to_q.in_features == 12 * 128 == 1536
    assert model.blocks[0].ffn.net[0].proj.out_features == 8960
    # Published only as "1.3B"; the count this config builds (the converter's config for that checkpoint).
    assert parameter_count(model) == 1_418_996_800


def test_wan_inputs_are_81_frames_at_480p_and_720p() -> None:
    from tomediff.bench.runner import _tokens

    wan = MODELS["wan-1.3b"]
    # 480p = 832x480, 81 frames: latent 21 x 60 x 104, (1, 2, 2) patches -> 21 x 30 x 52 tokens.
    assert make_inputs(wan, 1, 480, device="meta").args[0].shape == (1, 16, 21, 60, 104)
    assert _tokens(wan, 480) == 32_760
    assert _tokens(wan, 720) == 21 * 45 * 80 == 75_600  # 1280x720
    assert make_inputs(wan, 1, 64, device="meta").args[0].shape == (1, 16, 21, 8, 8)  # other sizes: square
    assert wan.config_for("cpu")["num_layers"] == 1 and wan.config_for("cuda")["num_layers"] == 30
    assert make_inputs(wan, 1, 64).kwargs["encoder_hidden_states"].shape == (1, 512, 4096)


def test_flux2_config_is_flux2_dev() -> None:
    model = build_on_meta("flux2")
    assert type(model).__name__ == "Flux2Transformer2DModel"
    assert len(model.transformer_blocks) == 8 and len(model.single_transformer_blocks) == 48
    assert model.inner_dim == 48 * 128 == 6144
    assert model.context_embedder.in_features == 15360
    # Published as "32B"; the count this config builds.
    assert parameter_count(model) == 32_223_281_152


def test_flux2_inputs_run_with_every_kind_of_setting() -> None:
    """A narrow Flux.2 (the published class, 2 heads) on the bench's inputs: merging, downsampling and
    kv_ratio each change the output, and removing them restores it bit for bit."""
    import dataclasses

    from tomediff.bench.runner import _tokens

    published = MODELS["flux2"]
    assert _tokens(published, 1024) == 64 * 64 and _tokens(published, 2048) == 128 * 128
    narrow = {"num_attention_heads": 2, "joint_attention_dim": 32, "num_layers": 1, "num_single_layers": 1}
    spec = dataclasses.replace(published, config={**published.config, **narrow}, text_tokens=8)
    model = build_model(spec)
    inputs = make_inputs(spec, 2, 256)
    assert inputs.args[0].shape == (2, 16 * 16, 128) and inputs.kwargs["img_ids"].shape == (2, 256, 4)
    base = forward(model, inputs)
    assert base.shape == (2, 256, 128) and torch.isfinite(base).all()
    for options in ({"ratio": 0.5}, {"method": "downsample"}, {"ratio": 0.0, "kv_ratio": 0.75}):
        variant = make_variant("tomediff", MergeSettings(**options, use_rand=False))
        variant.apply(model)
        out = forward(model, inputs)
        variant.remove(model)
        assert torch.isfinite(out).all() and not torch.equal(out, base), options
    assert torch.equal(forward(model, inputs), base)


def test_wan14b_hunyuanvideo_and_qwen_image_configs_are_the_published_ones() -> None:
    wan = build_on_meta("wan-14b")
    assert len(wan.blocks) == 40 and wan.blocks[0].attn1.to_q.in_features == 40 * 128 == 5120
    assert wan.blocks[0].ffn.net[0].proj.out_features == 13824
    hunyuan = build_on_meta("hunyuanvideo")
    assert type(hunyuan).__name__ == "HunyuanVideoTransformer3DModel"
    assert len(hunyuan.transformer_blocks) == 20 and len(hunyuan.single_transformer_blocks) == 40
    assert hunyuan.transformer_blocks[0].attn.to_q.in_features == 24 * 128 == 3072
    qwen = build_on_meta("qwen-image")
    assert type(qwen).__name__ == "QwenImageTransformer2DModel"
    assert len(qwen.transformer_blocks) == 60 and qwen.txt_in.in_features == 3584
    # Published as "14B", "13B" and "20B"; the counts these configs build.
    counts = [parameter_count(model) for model in (wan, hunyuan, qwen)]
    assert counts == [14_288_491_584, 12_821_012_544, 20_430_401_088]


def test_token_counts_of_the_new_video_and_image_entries() -> None:
    from tomediff.bench.runner import _tokens

    assert _tokens(MODELS["wan-14b"], 480) == 32_760 and _tokens(MODELS["wan-14b"], 720) == 75_600
    # 1280x720, 129 frames: latent 33 x 90 x 160, 2x2 patches -> 33 x 45 x 80 tokens.
    hunyuan = MODELS["hunyuanvideo"]
    assert _tokens(hunyuan, 720) == 33 * 45 * 80 == 118_800
    assert make_inputs(hunyuan, 1, 720, device="meta").args[0].shape == (1, 16, 33, 90, 160)
    assert _tokens(MODELS["qwen-image"], 1328) == 83 * 83 == 6889
    for name in ("wan-14b", "hunyuanvideo", "qwen-image"):
        spec = MODELS[name]
        assert spec.config_for("cpu")["num_layers"] == 1 < spec.config_for("cuda")["num_layers"]


@pytest.mark.parametrize(
    ("name", "narrow"),
    [
        (
            "hunyuanvideo",
            {
                "num_attention_heads": 2,
                "attention_head_dim": 16,
                "text_embed_dim": 32,
                "pooled_projection_dim": 16,
                "num_layers": 1,
                "num_single_layers": 1,
                "num_refiner_layers": 1,
                "rope_axes_dim": [4, 6, 6],
            },
        ),
        ("qwen-image", {"num_attention_heads": 2, "joint_attention_dim": 32, "num_layers": 1}),
    ],
)
def test_new_entries_run_with_every_kind_of_setting(name: str, narrow: dict[str, Any]) -> None:
    """A narrow model of the published class on the bench's inputs: merging, downsampling and kv_ratio
    each change the output, and removing them restores it bit for bit."""
    import dataclasses

    published = MODELS[name]
    frames = {"frames": 5} if published.frames else {}  # 2 latent frames
    spec = dataclasses.replace(published, config={**published.config, **narrow}, text_tokens=8, **frames)
    model = build_model(spec)
    inputs = at_timestep(spec, make_inputs(spec, 2, 128), 500)
    base = forward(model, inputs)
    assert torch.isfinite(base).all()
    for options in ({"ratio": 0.5}, {"method": "downsample"}, {"ratio": 0.0, "kv_ratio": 0.75}):
        variant = make_variant("tomediff", MergeSettings(**options, use_rand=False))
        variant.apply(model)
        out = forward(model, inputs)
        variant.remove(model)
        assert torch.isfinite(out).all() and not torch.equal(out, base), options
    assert torch.equal(forward(model, inputs), base)
