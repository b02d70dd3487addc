"""``DemoPipeline``: class-conditional sampling from the bundled Fashion-MNIST diffusion model.

>>> import tomediff
>>> from tomediff.eval import load_demo_model
>>> pipe = load_demo_model()                                       # doctest: +SKIP
>>> images = pipe(class_ids=[0, 7], seeds=[1, 2])                  # doctest: +SKIP
>>> with tomediff.tome(pipe, ratio=0.5): merged = pipe([0, 7], [1, 2])   # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tomediff.eval.data import CLASS_NAMES, to_uint8
from tomediff.eval.model import (
    LATENT_CHANNELS,
    LATENT_SIZE,
    ClassPromptEncoder,
    build_demo_unet,
    build_scheduler_config,
    latents_to_images,
)

__all__ = ["ASSETS_DIR", "DemoPipeline", "initial_noise", "load_demo_model"]

ASSETS_DIR = Path(__file__).resolve().parent / "assets"


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One independent noise tensor per seed, stacked ``(len(seeds), *shape)``.

    Drawing per seed (not one batched draw) makes a sample depend only on its seed, never on which
    batch or process generated it — what paired metrics and sharded runs need.
    """
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


class DemoPipeline:
    """Text(class-name)-to-image sampler with classifier-free guidance.

    Attributes:
        unet: the ``UNet2DConditionModel`` (what ``tomediff.apply_tome(pipe)`` patches).
        text_encoder: :class:`ClassPromptEncoder`.
        class_names: the prompts it knows, index = Fashion-MNIST label.
        scheduler: the latest call's sampling scheduler, and ``do_classifier_free_guidance`` whether
            that call guides: what a patch made with ``tomediff.apply_tome(pipe)`` reads to tell
            generations and guidance pairs apart (``reuse_steps``, ``reuse_cfg``), as in diffusers.
    """

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: ClassPromptEncoder,
        scheduler_config: dict[str, Any] | None = None,
    ) -> None:
        self.unet = unet.eval()
        self.text_encoder = text_encoder.eval()
        self.scheduler_config = dict(scheduler_config or build_scheduler_config())
        self.class_names = text_encoder.class_names

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> DemoPipeline:
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        self.unet.to(**kwargs)
        self.text_encoder.to(**kwargs)
        return self

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

    @torch.no_grad()
    def generate_latents(
        self,
        class_ids: Sequence[int],
        seeds: Sequence[int],
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        scheduler: str = "dpm",
        step_callback: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Denoise one batch; returns latents ``(B, 4, 16, 16)``."""
        if len(class_ids) != len(seeds):
            raise ValueError(f"{len(class_ids)} class ids but {len(seeds)} seeds.")
        sched = self.make_scheduler(scheduler)
        sched.set_timesteps(num_inference_steps)
        use_cfg = guidance_scale != 1.0
        self.scheduler, self.do_classifier_free_guidance = sched, use_cfg
        device, dtype = self.device, self.dtype
        latents = initial_noise(seeds, (LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)).to(device, dtype)
        latents = latents * sched.init_noise_sigma
        cond = self.text_encoder(self.text_encoder.tokenize_classes(class_ids).to(device))
        uncond = self.text_encoder(self.text_encoder.tokenize([""] * len(class_ids)).to(device))
        # Unconditional and conditional halves go through the UNet as one batch, as in SD pipelines,
        # so token merging sees an even batch and shares one partition between the halves.
        context = torch.cat([uncond, cond]) if use_cfg else cond
        for i, t in enumerate(sched.timesteps):
            model_in = torch.cat([latents, latents]) if use_cfg else latents
            model_in = sched.scale_model_input(model_in, t)
            # Sample passed positionally: tomesd's patch hooks read it that way.
            out = self.unet(model_in, t, encoder_hidden_states=context).sample
            if use_cfg:
                out_uncond, out_cond = out.chunk(2)
                out = out_uncond + guidance_scale * (out_cond - out_uncond)
            latents = sched.step(out, t, latents).prev_sample
            if step_callback is not None:
                step_callback(i)
        return latents

    def __call__(
        self,
        class_ids: Sequence[int],
        seeds: Sequence[int],
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        scheduler: str = "dpm",
        step_callback: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Generate ``len(class_ids)`` images in one batch; returns uint8 ``(B, 28, 28)``."""
        latents = self.generate_latents(
            class_ids, seeds, num_inference_steps, guidance_scale, scheduler, step_callback
        )
        images = latents_to_images(latents.float())[:, :, 2:30, 2:30]  # crop the padding back to 28×28
        return to_uint8(images)


def load_demo_model(
    assets_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DemoPipeline:
    """The bundled trained Fashion-MNIST model as a ready :class:`DemoPipeline` (offline, ~6 MB)."""
    from safetensors.torch import load_file

    directory = Path(assets_dir) if assets_dir is not None else ASSETS_DIR
    meta_path = directory / "demo_model.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"demo model not found in {directory} (expected demo_model.json, demo_unet.safetensors, "
            "demo_text_encoder.safetensors); train it with `python -m tomediff.eval.train_demo --export DIR`."
        )
    meta = json.loads(meta_path.read_text())
    unet_config = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["unet"].items()}
    unet = build_demo_unet(**unet_config)
    unet.load_state_dict(load_file(directory / "demo_unet.safetensors"))
    encoder_config = meta["text_encoder"]
    encoder = ClassPromptEncoder(
        encoder_config.get("class_names", CLASS_NAMES), encoder_config["dim"], encoder_config["length"]
    )
    encoder.load_state_dict(load_file(directory / "demo_text_encoder.safetensors"))
    pipe = DemoPipeline(unet, encoder, meta.get("scheduler")).to(device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
