"""The paper's protocol on real Stable Diffusion weights (Bolya & Hoffman 2023, Sec. 4).

SD 1.5 at 512², prompt "A high-quality photograph of a {ImageNet class}." (2 images per class, 2000 in
all), 50 PNDM (PLMS) steps, guidance 7.5, fp16 on GPU. Metrics, each optional:

* FID (clean-fid, else torchmetrics) against a folder of real images (``--fid-ref``, e.g. ImageNet val);
* CLIP score (torchmetrics) with a CLIP model that must already be cached or local;
* paired PSNR/SSIM against the unmerged image of the same seed (always available).

Missing packages or weights give a clear message and an ``n/a`` cell, never a crash after hours of
generation.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tomediff.eval.metrics import mean_with_ci, psnr, ssim
from tomediff.eval.report import markdown_table, plot_metrics, save_grid, write_csv, write_json
from tomediff.eval.settings import NamedSetting, build_settings
from tomediff.eval.sharding import DistContext, Samples, generate_settings, plan_batches

__all__ = ["PROMPT_TEMPLATE", "PaperOptions", "imagenet_class_names", "run_paper_eval"]

PROMPT_TEMPLATE = "A high-quality photograph of a {}."
PAPER_COLUMNS = [
    ("fid", "FID", 2),
    ("clip_score", "CLIP score", 2),
    ("psnr", "PSNR vs unmerged (dB)", 2),
    ("ssim", "SSIM vs unmerged", 3),
    ("seconds_per_step", "s / step", 4),
    ("speedup", "speedup", 2),
]


@dataclass
class PaperOptions:
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    out_dir: Path = Path("out/eval-paper")
    images_per_class: int = 2
    num_classes: int | None = None  # None = all ImageNet classes
    class_names_file: Path | None = None
    resolution: int = 512
    steps: int = 50
    guidance: float = 7.5
    batch_size: int = 8
    base_seed: int = 0
    ratios: Sequence[float] = (0.0, 0.5)
    compare: Sequence[str] = ()
    tome_options: Mapping[str, Any] = field(default_factory=dict)  # ToMeConfig fields of the tomediff rows
    named: Sequence[NamedSetting] = ()  # named settings instead of the ratio rows
    fid_ref: Path | None = None
    clip_model: str = "openai/clip-vit-base-patch16"
    cpu: bool = False
    dtype: str | None = None  # default fp16 on GPU, fp32 on CPU
    progress: bool = True
    long_run_hint: str = ""  # said after the first batch when the rest will take long (see generate_settings)
    command: str = field(default_factory=lambda: " ".join(sys.argv))


def imagenet_class_names(path: Path | None = None) -> list[str]:
    """ImageNet-1k class names: from ``path`` (one per line) or torchvision's bundled list."""
    if path is not None:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
        if not names:
            raise ValueError(f"{path} holds no class names.")
        return names
    try:
        from torchvision.models import ResNet50_Weights
    except ImportError as error:
        raise RuntimeError(
            "The paper protocol prompts with ImageNet class names. Install torchvision (its bundled list is "
            "used, no download) or pass --class-names FILE with one name per line."
        ) from error
    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def _dtype_keyword(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``dtype=`` where diffusers takes it (it deprecates ``torch_dtype=``), else the older keyword."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def load_sd_pipeline(model: str, device: torch.device, dtype: torch.dtype) -> Any:
    """``StableDiffusionPipeline`` from a local folder or Hub id, with the paper's PNDM (PLMS) scheduler."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            model, **_dtype_keyword(dtype), safety_checker=None, requires_safety_checker=False
        )
    except (OSError, ValueError) as error:
        raise RuntimeError(
            f"Could not load Stable Diffusion weights from {model!r}: {error}\nPass --model with a local "
            "diffusers folder (e.g. a downloaded stable-diffusion-v1-5/stable-diffusion-v1-5) or a Hub id "
            "reachable from this machine."
        ) from error
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _fid(gen_dir: Path, ref_dir: Path | None, device: torch.device) -> tuple[float | None, str]:
    if ref_dir is None:
        return (
            None,
            "FID skipped: pass --fid-ref DIR with real reference images (the paper used ImageNet val).",
        )
    try:
        from cleanfid import fid

        return float(fid.compute_fid(str(gen_dir), str(ref_dir), device=device, num_workers=0)), "clean-fid"
    except ImportError:
        pass
    except Exception as error:  # clean-fid fetches Inception weights on first use; offline that fails
        return None, f"FID unavailable: clean-fid failed ({error}); its Inception weights must be cached."
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        return None, "FID unavailable: install the optional extra `pip install tomediff[eval]` (clean-fid)."
    try:
        metric = FrechetInceptionDistance(normalize=False).to(device)
        for folder, real in ((ref_dir, True), (gen_dir, False)):
            for batch in _png_batches(folder):
                metric.update(batch.to(device), real=real)
        return float(metric.compute()), "torchmetrics"
    except Exception as error:
        return None, f"FID unavailable: torchmetrics failed ({error}); its Inception weights must be cached."


def _png_batches(folder: Path, batch: int = 32) -> Any:
    from PIL import Image

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    for start in range(0, len(files), batch):
        arrays = [
            np.asarray(Image.open(f).convert("RGB").resize((299, 299))) for f in files[start : start + batch]
        ]
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _clip_score(
    images: np.ndarray, prompts: Sequence[str], model: str, device: torch.device
) -> tuple[float | None, str]:
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore
    except ImportError:
        return (
            None,
            "CLIP score unavailable: install torchmetrics and transformers (`pip install tomediff[eval]`).",
        )
    try:
        metric = CLIPScore(model_name_or_path=model).to(device)
        for start in range(0, len(images), 16):
            chunk = torch.from_numpy(images[start : start + 16]).permute(0, 3, 1, 2).to(device)
            metric.update(chunk, list(prompts[start : start + 16]))
        return float(metric.compute()), f"torchmetrics CLIPScore({model})"
    except Exception as error:
        return (
            None,
            f"CLIP score unavailable: could not run {model} ({error}); its weights must be cached/local.",
        )


def _write_pngs(samples: Samples, folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for image, seed in zip(samples.images, samples.seeds, strict=True):
        path = folder / f"{int(seed):08d}.png"
        if not path.exists():
            Image.fromarray(image).save(path)
    return folder


def run_paper_eval(options: PaperOptions, pipe: Any = None) -> list[dict[str, Any]] | None:
    """Generate the paper's images for each setting (sharded, resumable) and score them.

    ``pipe`` may be given directly (tests); otherwise it is loaded from ``options.model``.
    """
    dist = DistContext(cpu=options.cpu)
    if options.dtype is not None:
        dtype = getattr(torch, options.dtype)
    else:
        dtype = torch.float16 if dist.device.type == "cuda" else torch.float32
    if pipe is None:
        pipe = load_sd_pipeline(options.model, dist.device, dtype)
    names = imagenet_class_names(options.class_names_file)
    if options.num_classes is not None:
        names = names[: options.num_classes]
    prompts = [PROMPT_TEMPLATE.format(name) for name in names]
    settings = build_settings(
        options.ratios,
        variants=(),
        compare=options.compare,
        different_seed=False,
        options=options.tome_options,
        named=options.named,
    )
    batches = plan_batches(options.images_per_class, len(names), options.batch_size, options.base_seed)

    def sample_fn(class_ids: Sequence[int], seeds: Sequence[int]) -> np.ndarray:
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        result = pipe(
            [prompts[c] for c in class_ids],
            height=options.resolution,
            width=options.resolution,
            num_inference_steps=options.steps,
            guidance_scale=options.guidance,
            generator=generators,
            output_type="np",
        )
        return (np.clip(result.images, 0, 1) * 255).round().astype(np.uint8)

    import hashlib

    import diffusers

    import tomediff

    key = {
        "protocol": "paper",
        "model": options.model,
        "scheduler": type(pipe.scheduler).__name__,
        "resolution": options.resolution,
        "steps": options.steps,
        "guidance": options.guidance,
        "prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16],
        "base_seed": options.base_seed,
        "batch_size": options.batch_size,
        "dtype": str(dtype),
        "device": dist.device.type,
        "tomediff": tomediff.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }
    samples = generate_settings(
        settings,
        batches,
        pipe.unet,
        sample_fn,
        options.steps,
        options.out_dir,
        dist,
        progress=options.progress,
        run_key=key,
        long_run_hint=options.long_run_hint,
        pipeline=pipe,
    )
    if samples is None:
        return None
    base = samples[settings[0].slug]
    base_speed = float(np.median(base.seconds_per_step))
    rows, notes = [], set()
    for setting in settings:
        sample = samples[setting.slug]
        row: dict[str, Any] = setting.as_dict()
        row["num_images"] = len(sample.images)
        gen_dir = _write_pngs(sample, options.out_dir / "png" / setting.slug)
        fid_value, note = _fid(gen_dir, options.fid_ref, dist.device)
        notes.add(note)
        row["fid"] = fid_value
        clip_value, note = _clip_score(
            sample.images, [prompts[c] for c in sample.class_ids], options.clip_model, dist.device
        )
        notes.add(note)
        row["clip_score"] = clip_value
        if setting == settings[0]:
            row["psnr"] = row["ssim"] = None
        else:
            # (N, H, W, 3) → (N, 3, H, W): the metrics take channels first.
            merged_chw, base_chw = sample.images.transpose(0, 3, 1, 2), base.images.transpose(0, 3, 1, 2)
            row["psnr"] = mean_with_ci(psnr(merged_chw, base_chw)).as_dict()
            row["ssim"] = mean_with_ci(ssim(merged_chw, base_chw)).as_dict()
        row["seconds_per_step"] = float(np.median(sample.seconds_per_step))
        row["speedup"] = base_speed / row["seconds_per_step"]
        rows.append(row)
    out = options.out_dir
    meta = {
        "command": options.command,
        "protocol": "paper",
        "model": options.model,
        "resolution": options.resolution,
        "steps": options.steps,
        "guidance": options.guidance,
        "images_per_class": options.images_per_class,
        "classes": len(names),
        "dtype": str(dtype),
        "device": str(dist.device),
        "processes": dist.world,
        "notes": sorted(notes),
    }
    write_json(out / "results.json", {"meta": meta, "rows": rows})
    write_csv(out / "results.csv", rows)
    table = markdown_table(rows, PAPER_COLUMNS)
    (out / "results.md").write_text(table + "\n")
    columns = min(8, len(base.images))
    save_grid(
        [(s.name, samples[s.slug].images[:columns]) for s in settings],
        [n[:12] for n in (names[c] for c in base.class_ids[:columns])],
        out / "grid.png",
        scale=1,
    )
    plot_metrics(rows, [(k, h) for k, h, _ in PAPER_COLUMNS[2:4]], out / "metrics_vs_ratio.png")
    print(table)
    for note in sorted(notes):
        print(note)
    return rows
