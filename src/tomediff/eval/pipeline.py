"""Class-conditional sampling from the bundled Fashion-MNIST diffusion models: ``DemoPipeline`` (the
SD-style UNet) and ``DemoDiTPipeline`` (the Flux-style transformer). Both take the same call.

>>> import tomediff
>>> from tomediff.eval import load_demo_dit, load_demo_model
>>> pipe = load_demo_model()                                       # doctest: +SKIP
>>> images = pipe(class_ids=[0, 7], seeds=[1, 2])                  # doctest: +SKIP
>>> with tomediff.tome(pipe, ratio=0.5): merged = pipe([0, 7], [1, 2])   # doctest: +SKIP
>>> dit = load_demo_dit()                                          # doctest: +SKIP
>>> with tomediff.tome(dit, ratio=0.5): merged = dit([0, 7], [1, 2])     # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from tomediff.eval.data import CLASS_NAMES, to_uint8
from tomediff.eval.model import (
    IMAGE_SIZE,
    LATENT_CHANNELS,
    LATENT_SIZE,
    ClassPromptEncoder,
    build_demo_dit,
    build_demo_unet,
    build_flow_scheduler_config,
    build_scheduler_config,
    dit_position_ids,
    latents_to_images,
    latents_to_tokens,
    tokens_to_latents,
)

__all__ = [
    "ASSETS_DIR",
    "DIT_FILES",
    "DIT_HIRES_FILES",
    "HIRES_IMAGE_SIZE",
    "DemoDiTPipeline",
    "DemoPipeline",
    "dit_files",
    "initial_noise",
    "load_demo_dit",
    "load_demo_model",
]

_PipelineT = TypeVar("_PipelineT", bound="_ClassConditionalPipeline")

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
# The bundled DiT's files: transformer weights, prompt-encoder weights, configs.
DIT_FILES = ("demo_dit_transformer.safetensors", "demo_dit_text_encoder.safetensors", "demo_dit.json")
# The high-resolution DiT: the same architecture fine-tuned on 64×64 images (1,024 image tokens).
HIRES_IMAGE_SIZE = 64
DIT_HIRES_FILES = (
    "demo_dit_hires_transformer.safetensors",
    "demo_dit_hires_text_encoder.safetensors",
    "demo_dit_hires.json",
)


def dit_files(image_size: int) -> tuple[str, str, str]:
    """The bundled DiT files of the model trained at ``image_size`` (32 or :data:`HIRES_IMAGE_SIZE`)."""
    files = {IMAGE_SIZE: DIT_FILES, HIRES_IMAGE_SIZE: DIT_HIRES_FILES}
    if image_size not in files:
        raise ValueError(f"no bundled DiT at image_size={image_size}; use one of {sorted(files)}.")
    return files[image_size]


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One independent noise tensor per seed, stacked ``(len(seeds), *shape)``.

    Drawing per seed (not one batched draw) makes a sample depend only on its seed, never on which
    batch or process generated it — what paired metrics and sharded runs need.
    """
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def _to_images(latents: torch.Tensor) -> np.ndarray:
    """Latents ``(B, 4, 16, 16)`` (or larger, area-downsampled to 32×32 first) → uint8 images
    ``(B, 28, 28)`` (the padding cropped back off)."""
    return to_uint8(latents_to_images(latents.float())[:, :, 2:30, 2:30])


class _ClassConditionalPipeline:
    """What both demo pipelines share: device/dtype moves and the classifier-free-guidance sampling loop.

    A subclass says what differs: its ``denoiser``, its schedulers (``make_scheduler``), how a batch
    starts (``_start``: initial latents and the model call) and how its latents end (``_finish``).
    """

    default_scheduler: str

    def __init__(self, text_encoder: ClassPromptEncoder, scheduler_config: dict[str, Any]) -> None:
        self.text_encoder = text_encoder.eval()
        self.scheduler_config = dict(scheduler_config)
        self.class_names = text_encoder.class_names

    @property
    def denoiser(self) -> nn.Module:
        """The network token reduction patches."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def to(
        self: _PipelineT, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> _PipelineT:
        kwargs: dict[str, Any] = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        self.denoiser.to(**kwargs)
        self.text_encoder.to(**kwargs)
        return self

    def make_scheduler(self, name: str) -> Any:
        raise NotImplementedError

    def _start(
        self, class_ids: Sequence[int], seeds: Sequence[int], sched: Any, use_cfg: bool
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """The batch's initial latents, and the model call ``(model_in, t) -> prediction`` that sees
        both CFG halves (``[uncond, cond]``) stacked when ``use_cfg``."""
        raise NotImplementedError

    def _finish(self, latents: torch.Tensor) -> torch.Tensor:
        """The sampled latents as ``(B, 4, 16, 16)``."""
        return latents

    @torch.no_grad()
    def generate_latents(
        self,
        class_ids: Sequence[int],
        seeds: Sequence[int],
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        scheduler: str | None = None,
        step_callback: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Denoise one batch; returns latents ``(B, 4, 16, 16)``. ``scheduler`` defaults to the
        pipeline's ``default_scheduler``."""
        if len(class_ids) != len(seeds):
            raise ValueError(f"{len(class_ids)} class ids but {len(seeds)} seeds.")
        sched = self.make_scheduler(self.default_scheduler if scheduler is None else scheduler)
        sched.set_timesteps(num_inference_steps)
        use_cfg = guidance_scale != 1.0
        self.scheduler, self.do_classifier_free_guidance = sched, use_cfg
        latents, predict = self._start(class_ids, seeds, sched, use_cfg)
        for i, t in enumerate(sched.timesteps):
            # Unconditional and conditional halves go through the model as one batch, as in SD/Flux
            # pipelines, so token merging sees an even batch and shares one partition between them.
            out = predict(torch.cat([latents, latents]) if use_cfg else latents, t)
            if use_cfg:
                out_uncond, out_cond = out.chunk(2)
                out = out_uncond + guidance_scale * (out_cond - out_uncond)
            latents = sched.step(out, t, latents).prev_sample
            if step_callback is not None:
                step_callback(i)
        return self._finish(latents)

    def __call__(
        self,
        class_ids: Sequence[int],
        seeds: Sequence[int],
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        scheduler: str | None = None,
        step_callback: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Generate ``len(class_ids)`` images in one batch; returns uint8 ``(B, 28, 28)``."""
        latents = self.generate_latents(
            class_ids, seeds, num_inference_steps, guidance_scale, scheduler, step_callback
        )
        return _to_images(latents)


class DemoPipeline(_ClassConditionalPipeline):
    """Text(class-name)-to-image sampler with classifier-free guidance.

    Attributes:
        unet: the ``UNet2DConditionModel`` (what ``tomediff.apply_tome(pipe)`` patches).
        text_encoder: :class:`ClassPromptEncoder`.
        class_names: the prompts it knows, index = Fashion-MNIST label.
        scheduler: the latest call's sampling scheduler, and ``do_classifier_free_guidance`` whether
            that call guides: what a patch made with ``tomediff.apply_tome(pipe)`` reads to tell
            generations and guidance pairs apart (``reuse_steps``, ``reuse_cfg``), as in diffusers.
    """

    default_scheduler = "dpm"

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: ClassPromptEncoder,
        scheduler_config: dict[str, Any] | None = None,
    ) -> None:
        self.unet = unet.eval()
        super().__init__(text_encoder, scheduler_config or build_scheduler_config())

    @property
    def denoiser(self) -> nn.Module:
        """The network token reduction patches (here the UNet)."""
        return self.unet

    def make_scheduler(self, name: str = "dpm") -> Any:
        """A fresh sampling scheduler: ``"dpm"`` (DPM-Solver++ 2M), ``"ddim"`` or ``"pndm"``."""
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

        config = dict(self.scheduler_config)
        if name == "dpm":
            return DPMSolverMultistepScheduler(
                **{k: v for k, v in config.items() if k != "clip_sample"},
                algorithm_type="dpmsolver++",
                solver_order=2,
            )
        if name == "ddim":
            return DDIMScheduler(**config)
        if name == "pndm":
            return PNDMScheduler(
                **{k: v for k, v in config.items() if k != "clip_sample"}, skip_prk_steps=True
            )
        raise ValueError(f"unknown scheduler {name!r}; use 'dpm', 'ddim' or 'pndm'.")

    def _start(
        self, class_ids: Sequence[int], seeds: Sequence[int], sched: Any, use_cfg: bool
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        device, dtype = self.device, self.dtype
        latents = initial_noise(seeds, (LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)).to(device, dtype)
        latents = latents * sched.init_noise_sigma
        cond = self.text_encoder(self.text_encoder.tokenize_classes(class_ids).to(device))
        uncond = self.text_encoder(self.text_encoder.tokenize([""] * len(class_ids)).to(device))
        context = torch.cat([uncond, cond]) if use_cfg else cond

        def predict(model_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # Sample passed positionally: tomesd's patch hooks read it that way.
            return self.unet(sched.scale_model_input(model_in, t), t, encoder_hidden_states=context).sample

        return latents, predict


class DemoDiTPipeline(_ClassConditionalPipeline):
    """The DiT counterpart of :class:`DemoPipeline`, called the same way: flow-matching Euler sampling
    with classifier-free guidance.

    Attributes:
        transformer: the ``FluxTransformer2DModel`` (what ``tomediff.apply_tome(pipe)`` patches, through
            the Flux adapter).
        text_encoder: :class:`ClassPromptEncoder`; its hidden states are the joint-attention text tokens
            and their masked mean the pooled projection.
        class_names: the prompts it knows, index = Fashion-MNIST label.
        image_size: the side its images are generated at: 32 (16×16 = 256 image tokens) or 64 for the
            high-resolution DiT (1,024 tokens), whose images are area-downsampled to 32 at the end.
        scheduler, do_classifier_free_guidance: the latest call's, as for :class:`DemoPipeline`.
        current_timestep: the timestep of the model call running (or last run), which diffusers' Pyramid
            Attention Broadcast and FasterCache read through their ``current_timestep_callback``.
    """

    default_scheduler = "euler"

    def __init__(
        self,
        transformer: nn.Module,
        text_encoder: ClassPromptEncoder,
        scheduler_config: dict[str, Any] | None = None,
        image_size: int = IMAGE_SIZE,
    ) -> None:
        if image_size % 2 or image_size < IMAGE_SIZE:
            raise ValueError(f"image_size={image_size}: use an even size of at least {IMAGE_SIZE}.")
        self.transformer = transformer.eval()
        self.image_size = image_size
        self.current_timestep: torch.Tensor | None = None
        super().__init__(text_encoder, scheduler_config or build_flow_scheduler_config())

    @property
    def denoiser(self) -> nn.Module:
        """The network token reduction patches (here the transformer)."""
        return self.transformer

    def make_scheduler(self, name: str = "euler") -> Any:
        """A fresh sampling scheduler: ``"euler"`` (diffusers' ``FlowMatchEulerDiscreteScheduler``), the
        only one that follows the flow-matching trajectory this model was trained on."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if name != "euler":
            raise ValueError(
                f"unknown scheduler {name!r} for the demo DiT; use 'euler' (flow matching; 'dpm', 'ddim' "
                "and 'pndm' are the UNet's)."
            )
        return FlowMatchEulerDiscreteScheduler(**self.scheduler_config)

    def _start(
        self, class_ids: Sequence[int], seeds: Sequence[int], sched: Any, use_cfg: bool
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        device, dtype = self.device, self.dtype
        side = self.image_size // 2
        noise = initial_noise(seeds, (LATENT_CHANNELS, side, side))
        latents = latents_to_tokens(noise).to(device, dtype)  # flow matching starts at sigma = 1: pure noise
        cond_ids = self.text_encoder.tokenize_classes(class_ids).to(device)
        uncond_ids = self.text_encoder.tokenize([""] * len(class_ids)).to(device)
        token_ids = torch.cat([uncond_ids, cond_ids]) if use_cfg else cond_ids
        context = self.text_encoder(token_ids).to(dtype)
        pooled = self.text_encoder.pool(context, token_ids)
        img_ids, txt_ids = dit_position_ids(side, side, token_ids.shape[1])
        img_ids, txt_ids = img_ids.to(device, dtype), txt_ids.to(device, dtype)
        # diffusers' caches (transformer.enable_cache): each generation starts from an empty cache, and
        # each call says where the loop is, as diffusers' own pipelines do (SeaCache needs the step).
        cached = bool(getattr(self.transformer, "is_cache_enabled", False))
        cache_api: Any = self.transformer  # diffusers' CacheMixin methods, which nn.Module does not declare
        if cached:
            cache_api._reset_stateful_cache()
        steps = len(sched.timesteps)
        calls = iter(range(steps))

        def predict(model_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            timestep = (t / 1000).expand(model_in.shape[0]).to(device, dtype)  # Flux takes sigma
            self.current_timestep = t  # what diffusers' PAB/FasterCache callbacks read
            scope = (
                cache_api.cache_context(
                    "cond",
                    step_index=next(calls),
                    num_inference_steps=steps,
                    timestep=t,
                    sigma=float(t) / 1000,
                )
                if cached
                else contextlib.nullcontext()
            )
            with scope:
                return self.transformer(
                    model_in,
                    encoder_hidden_states=context,
                    pooled_projections=pooled,
                    timestep=timestep,
                    img_ids=img_ids,
                    txt_ids=txt_ids,
                ).sample

        return latents, predict

    def _finish(self, latents: torch.Tensor) -> torch.Tensor:
        return tokens_to_latents(latents, self.image_size // 2, self.image_size // 2)


def _resolve_assets_dir(assets_dir: str | Path | None) -> Path:
    return Path(assets_dir) if assets_dir is not None else ASSETS_DIR


def _model_config(config: dict[str, Any]) -> dict[str, Any]:
    """A model config read from JSON, its lists back to the tuples the builders take."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def _load_text_encoder(meta: dict[str, Any], weights: Path) -> ClassPromptEncoder:
    from safetensors.torch import load_file

    encoder_config = meta["text_encoder"]
    encoder = ClassPromptEncoder(
        encoder_config.get("class_names", CLASS_NAMES), encoder_config["dim"], encoder_config["length"]
    )
    encoder.load_state_dict(load_file(weights))
    return encoder


def _placed(pipe: _PipelineT, device: str | torch.device, dtype: torch.dtype) -> _PipelineT:
    pipe = pipe.to(device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def load_demo_model(
    assets_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DemoPipeline:
    """The bundled trained Fashion-MNIST model as a ready :class:`DemoPipeline` (offline, ~6 MB)."""
    from safetensors.torch import load_file

    directory = _resolve_assets_dir(assets_dir)
    meta_path = directory / "demo_model.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"demo model not found in {directory} (expected demo_model.json, demo_unet.safetensors, "
            "demo_text_encoder.safetensors); train it with `python -m tomediff.eval.train_demo --export DIR`."
        )
    meta = json.loads(meta_path.read_text())
    unet = build_demo_unet(**_model_config(meta["unet"]))
    unet.load_state_dict(load_file(directory / "demo_unet.safetensors"))
    encoder = _load_text_encoder(meta, directory / "demo_text_encoder.safetensors")
    return _placed(DemoPipeline(unet, encoder, meta.get("scheduler")), device, dtype)


def load_demo_dit(
    assets_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    image_size: int = IMAGE_SIZE,
) -> DemoDiTPipeline:
    """The bundled trained Fashion-MNIST DiT as a ready :class:`DemoDiTPipeline` (offline).

    ``image_size=64`` loads the high-resolution DiT instead (:data:`DIT_HIRES_FILES`: the same
    architecture fine-tuned on 64×64 images, 1,024 image tokens).
    """
    from safetensors.torch import load_file

    directory = _resolve_assets_dir(assets_dir)
    files = dit_files(image_size)
    transformer_file, encoder_file, meta_file = files
    missing = [name for name in files if not (directory / name).is_file()]
    if missing:
        size_flag = "" if image_size == IMAGE_SIZE else f" --image-size {image_size}"
        raise FileNotFoundError(
            f"demo DiT not found in {directory} (missing {', '.join(missing)}); train and export it with "
            f"`python -m tomediff.eval.train_dit --out runs/dit{size_flag} --export DIR`."
        )
    meta = json.loads((directory / meta_file).read_text())
    transformer = build_demo_dit(**_model_config(meta["transformer"]))
    transformer.load_state_dict(load_file(directory / transformer_file))
    encoder = _load_text_encoder(meta, directory / encoder_file)
    pipe = DemoDiTPipeline(transformer, encoder, meta.get("scheduler"), meta.get("image_size", IMAGE_SIZE))
    return _placed(pipe, device, dtype)
