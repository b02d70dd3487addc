"""``tomediff eval`` on a bundled Fashion-MNIST model (the UNet, or the DiT with ``model="dit"``): the
quality protocol.

For each setting (unmerged, a ratio sweep, option variants, tomesd) the same seeds generate
``samples_per_class`` images per class; metrics (each with a bootstrap 95% CI):

* ``accuracy`` — share of images the bundled classifier assigns to the prompted class (prompt adherence,
  the stand-in for CLIP score);
* ``frechet`` — Fréchet distance between classifier features of the images and of the 10,000 real
  test images (the stand-in for FID);
* ``psnr`` / ``ssim`` — paired against the unmerged image of the same seed (fidelity); the
  "different seed" row shows what an unrelated image of the same class scores.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tomediff.errors import ConfigError
from tomediff.eval.metrics import frechet_with_ci, mean_with_ci, psnr, ssim
from tomediff.eval.report import markdown_table, plot_metrics, save_grid, write_csv, write_json
from tomediff.eval.settings import NamedSetting, Setting, build_settings
from tomediff.eval.sharding import DistContext, Samples, check_resume, generate_settings, plan_batches

if TYPE_CHECKING:
    from tomediff.eval.classifier import FashionClassifier
    from tomediff.eval.pipeline import DemoDiTPipeline, DemoPipeline

__all__ = ["BUNDLED_MODELS", "DIT_IMAGE_SIZES", "QualityOptions", "evaluate_samples", "run_quality_eval"]

# The bundled models ``QualityOptions.model`` names, each with its default sampler.
BUNDLED_MODELS: dict[str, str] = {"unet": "dpm", "dit": "euler", "dit-hires": "euler"}
# The bundled DiTs and the image size each was trained at (256 and 1,024 image tokens).
DIT_IMAGE_SIZES: dict[str, int] = {"dit": 32, "dit-hires": 64}

METRIC_COLUMNS = [
    ("accuracy", "class accuracy (%)", 1),
    ("frechet", "Fréchet distance", 2),
    ("psnr", "PSNR vs unmerged (dB)", 2),
    ("ssim", "SSIM vs unmerged", 3),
    ("seconds_per_step", "s / step", 4),
    ("speedup", "speedup", 2),
]


@dataclass
class QualityOptions:
    out_dir: Path = Path("out/eval")
    samples_per_class: int = 100
    batch_size: int = 50
    steps: int = 20
    guidance: float = 3.0
    # None: the model's own sampler (BUNDLED_MODELS), "dpm" for the UNet and "euler" for the DiT.
    scheduler: str | None = None
    # which bundled model: "unet" (SD-style), "dit" (Flux-style transformer) or "dit-hires" (the same
    # transformer at 64×64, 1,024 image tokens)
    model: str = "unet"
    base_seed: int = 0
    ratios: Sequence[float] = (0.0, 0.3, 0.5, 0.6, 0.7)
    variants: Sequence[str] = ("no_rand", "max_downsample_2", "all_sites")
    variant_ratio: float = 0.5
    compare: Sequence[str] = ()
    compare_ratios: Sequence[float] | None = None
    tome_options: Mapping[str, Any] = field(default_factory=dict)  # ToMeConfig fields of the tomediff rows
    named: Sequence[NamedSetting] = ()  # named settings instead of the sweep, variants and comparisons
    different_seed: bool = True
    assets_dir: Path | None = None
    cpu: bool = False
    progress: bool = True
    long_run_hint: str = ""  # said after the first batch when the rest will take long (see generate_settings)
    bootstrap: int = 1000
    command: str = field(default_factory=lambda: " ".join(sys.argv))


def evaluate_samples(
    settings: Sequence[Setting],
    samples: dict[str, Samples],
    classifier: FashionClassifier,
    ref_mu: np.ndarray,
    ref_sigma: np.ndarray,
    bootstrap: int = 1000,
) -> list[dict[str, Any]]:
    """One metrics row per setting; paired metrics use the first ``library == "none"`` setting."""
    from tomediff.eval.classifier import classify

    baseline = next(s for s in settings if s.library == "none" and not s.seed_offset)
    base = samples[baseline.slug]
    base_speed = float(np.median(base.seconds_per_step))
    rows = []
    for setting in settings:
        sample = samples[setting.slug]
        predicted, features = classify(classifier, sample.images)
        correct = (predicted == sample.class_ids).astype(np.float64) * 100
        row: dict[str, Any] = setting.as_dict()
        row["num_images"] = len(sample.images)
        row["accuracy"] = mean_with_ci(correct, resamples=bootstrap).as_dict()
        row["frechet"] = frechet_with_ci(
            features, ref_mu, ref_sigma, resamples=max(50, bootstrap // 5)
        ).as_dict()
        if setting == baseline:
            row["psnr"] = row["ssim"] = None
        else:
            row["psnr"] = mean_with_ci(psnr(sample.images, base.images), resamples=bootstrap).as_dict()
            row["ssim"] = mean_with_ci(ssim(sample.images, base.images), resamples=bootstrap).as_dict()
        speed = float(np.median(sample.seconds_per_step))
        row["seconds_per_step"] = speed
        row["speedup"] = base_speed / speed
        rows.append(row)
    return rows


def real_images_row(
    samples_per_class: int,
    classifier: FashionClassifier,
    ref_mu: np.ndarray,
    ref_sigma: np.ndarray,
    bootstrap: int = 1000,
    data_dir: str | None = None,
) -> dict[str, Any] | None:
    """Metrics of real training images, as many per class as each setting has: the floor a perfect
    generator would reach with this sample size (None when the data set is not installed)."""
    from tomediff.eval.classifier import classify
    from tomediff.eval.data import DatasetMissingError, load_fashion_mnist

    try:
        images, labels = load_fashion_mnist("train", data_dir)
    except DatasetMissingError:
        return None
    # The first samples_per_class images of each class, a fixed deterministic subset.
    index = np.concatenate([np.flatnonzero(labels == c)[:samples_per_class] for c in range(10)])
    predicted, features = classify(classifier, images[index])
    correct = (predicted == labels[index]).astype(np.float64) * 100
    return {
        "name": "real train images",
        "library": "real",
        "ratio": None,
        "variant": "reference",
        "seed_offset": 0,
        "num_images": len(index),
        "accuracy": mean_with_ci(correct, resamples=bootstrap).as_dict(),
        "frechet": frechet_with_ci(features, ref_mu, ref_sigma, resamples=max(50, bootstrap // 5)).as_dict(),
        "psnr": None,
        "ssim": None,
        "seconds_per_step": None,
        "speedup": None,
    }


def environment(dist: DistContext) -> dict[str, Any]:
    """The benchmark's machine and version record plus the process count of this run."""
    from tomediff.bench.runner import environment as machine_environment

    return {**machine_environment(dist.device), "processes": dist.world}


def files_digest(paths: Sequence[Path]) -> str:
    """SHA-256 over the contents of ``paths`` (the model's weights and config): identifies the model."""
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def _check_model(options: QualityOptions) -> None:
    if options.model not in BUNDLED_MODELS:
        raise ConfigError(
            f"model={options.model!r} is not a bundled model; use one of {sorted(BUNDLED_MODELS)}."
        )
    if options.model in DIT_IMAGE_SIZES and options.scheduler not in (None, "euler"):
        raise ConfigError(
            f"scheduler={options.scheduler!r} cannot sample the flow-matching DiT; use 'euler' (or None)."
        )
    uses_tomesd = bool(options.compare) or any(s.library == "tomesd" for s in options.named)
    if options.model in DIT_IMAGE_SIZES and uses_tomesd:
        raise ConfigError(
            "tomesd patches only UNets; drop the tomesd comparison (compare=(), no library=tomesd setting) "
            f"for model={options.model!r}."
        )


def _model_files(model: str) -> tuple[str, ...]:
    from tomediff.eval.pipeline import dit_files

    if model in DIT_IMAGE_SIZES:
        return dit_files(DIT_IMAGE_SIZES[model])
    return ("demo_unet.safetensors", "demo_text_encoder.safetensors", "demo_model.json")


def _scheduler(options: QualityOptions) -> str:
    return options.scheduler or BUNDLED_MODELS[options.model]


def run_key(options: QualityOptions, device: torch.device) -> dict[str, Any]:
    """Everything besides the setting that changes a bundled-protocol image (see ``check_resume``)."""
    import diffusers

    import tomediff
    from tomediff.eval.pipeline import ASSETS_DIR

    assets = Path(options.assets_dir or ASSETS_DIR)
    files = [assets / name for name in _model_files(options.model)]
    return {
        "protocol": "bundled",
        "model": files_digest([f for f in files if f.is_file()]),
        "steps": options.steps,
        "guidance": options.guidance,
        "scheduler": _scheduler(options),
        "base_seed": options.base_seed,
        "batch_size": options.batch_size,
        "device": device.type,
        "tomediff": tomediff.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }


def run_quality_eval(options: QualityOptions) -> list[dict[str, Any]] | None:
    """Generate (resumably, sharded), then on the main process compute metrics and write
    ``results.json``, ``results.csv``, ``results.md``, ``grid.png`` and ``metrics_vs_ratio.png``."""
    from tomediff.eval.classifier import load_classifier, load_reference_stats
    from tomediff.eval.pipeline import ASSETS_DIR, load_demo_dit, load_demo_model

    _check_model(options)
    dist = DistContext(cpu=options.cpu)
    assets = options.assets_dir or ASSETS_DIR
    settings = build_settings(
        options.ratios,
        options.variants,
        options.variant_ratio,
        options.compare,
        options.different_seed,
        options.compare_ratios,
        options=options.tome_options,
        named=options.named,
    )
    key = run_key(options, dist.device)
    check_resume(options.out_dir, settings, key)  # before loading anything
    pipe: DemoPipeline | DemoDiTPipeline
    if options.model in DIT_IMAGE_SIZES:
        pipe = load_demo_dit(assets, device=dist.device, image_size=DIT_IMAGE_SIZES[options.model])
    else:
        pipe = load_demo_model(assets, device=dist.device)
    scheduler = _scheduler(options)
    batches = plan_batches(
        options.samples_per_class, len(pipe.class_names), options.batch_size, options.base_seed
    )

    def sample_fn(class_ids: Sequence[int], seeds: Sequence[int]) -> np.ndarray:
        return pipe(
            class_ids,
            seeds,
            num_inference_steps=options.steps,
            guidance_scale=options.guidance,
            scheduler=scheduler,
        )

    started = time.time()
    samples = generate_settings(
        settings,
        batches,
        pipe.denoiser,
        sample_fn,
        options.steps,
        options.out_dir,
        dist,
        progress=options.progress,
        run_key=key,
        long_run_hint=options.long_run_hint,
        pipeline=pipe,
    )
    if samples is None:  # not the main process
        return None
    classifier = load_classifier(assets)
    ref_mu, ref_sigma = load_reference_stats(assets)
    rows = evaluate_samples(settings, samples, classifier, ref_mu, ref_sigma, bootstrap=options.bootstrap)
    real = real_images_row(options.samples_per_class, classifier, ref_mu, ref_sigma, options.bootstrap)
    all_rows = rows if real is None else [*rows, real]
    out = options.out_dir
    meta = {
        "command": options.command,
        "protocol": "bundled",
        "model": options.model,
        "samples_per_class": options.samples_per_class,
        "steps": options.steps,
        "guidance": options.guidance,
        "scheduler": scheduler,
        "batch_size": options.batch_size,
        "wall_seconds_this_run": round(time.time() - started, 1),
        "environment": environment(dist),
    }
    write_json(out / "results.json", {"meta": meta, "rows": all_rows})
    write_csv(out / "results.csv", all_rows)
    table = markdown_table(all_rows, METRIC_COLUMNS)
    (out / "results.md").write_text(table + "\n")
    # Grid: one row per setting, the first sample of every class (same seeds in every row).
    num_classes = len(pipe.class_names)
    grid_rows = [(s.name, samples[s.slug].images[:num_classes]) for s in settings]
    save_grid(grid_rows, pipe.class_names, out / "grid.png")
    plot_metrics(all_rows, [(k, h) for k, h, _ in METRIC_COLUMNS[:4]], out / "metrics_vs_ratio.png")
    print(table)
    print(f"wrote {out}/results.json, results.csv, results.md, grid.png, metrics_vs_ratio.png")
    return rows
