"""Published architectures to benchmark, built with random weights.

The configs below are the architecture fields of the public ``config.json`` files of each model's
denoiser (UNet or transformer). Latency and memory depend only on the architecture and the input
shape, not on the weights, so a randomly initialised model costs exactly what the released one does
and nothing has to be downloaded.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "MODELS",
    "ModelInputs",
    "ModelSpec",
    "build_model",
    "get_model_spec",
    "make_inputs",
    "parameter_count",
]

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

# runwayml/stable-diffusion-v1-5, unet/config.json (859,520,964 parameters).
SD15_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": list(_SD_DOWN),
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": list(_SD_UP),
}

# stabilityai/stable-diffusion-2-1, unet/config.json (865,910,724 parameters).
SD21_UNET: dict[str, Any] = {
    **SD15_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2,567,463,684 parameters).
SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# PixArt-alpha/PixArt-XL-2-1024-MS, transformer/config.json.
PIXART_ALPHA_1024: dict[str, Any] = {
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 72,
    "attention_type": "default",
    "caption_channels": 4096,
    "cross_attention_dim": 1152,
    "dropout": 0.0,
    "in_channels": 4,
    "interpolation_scale": None,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "norm_type": "ada_norm_single",
    "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000,
    "num_layers": 28,
    "out_channels": 8,
    "patch_size": 2,
    "sample_size": 128,
    "upcast_attention": False,
    "use_additional_conditions": True,
}

# stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json (MMDiT, 24 joint blocks).
SD3_MEDIUM: dict[str, Any] = {
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "sample_size": 128,
}

# black-forest-labs/FLUX.1-dev, transformer/config.json (19 double-stream + 38 single-stream blocks).
FLUX_DEV: dict[str, Any] = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

# black-forest-labs/FLUX.2-dev, transformer/: the "flux2-dev" config of diffusers'
# scripts/convert_flux2_to_diffusers.py (8 double-stream + 48 single-stream blocks of width 48 x 128 =
# 6144, Mistral-3 text features 15360 wide). Published as "32B"; this config builds 32,223,281,152
# parameters (counted on the meta device).
FLUX2_DEV: dict[str, Any] = {
    "attention_head_dim": 128,
    "axes_dims_rope": [32, 32, 32, 32],
    "eps": 1e-6,
    "guidance_embeds": True,
    "in_channels": 128,
    "joint_attention_dim": 15360,
    "mlp_ratio": 3.0,
    "num_attention_heads": 48,
    "num_layers": 8,
    "num_single_layers": 48,
    "patch_size": 1,
    "rope_theta": 2000,
    "timestep_guidance_channels": 256,
}

# Wan 2.1 T2V 1.3B (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/): the "Wan-T2V-1.3B" config of
# diffusers' scripts/convert_wan_to_diffusers.py, which made that checkpoint (30 blocks of width
# 12 x 128 = 1536; Wan's own config: dim 1536, ffn_dim 8960, 12 heads, 30 layers). Published only as
# "1.3B" (no exact count); this config builds 1,418,996,800 parameters (counted on the meta device).
WAN_T2V_13B: dict[str, Any] = {
    "added_kv_proj_dim": None,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-6,
    "ffn_dim": 8960,
    "freq_dim": 256,
    "in_channels": 16,
    "num_attention_heads": 12,
    "num_layers": 30,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "text_dim": 4096,
}

# Wan 2.1 T2V 14B (Wan-AI/Wan2.1-T2V-14B-Diffusers, transformer/): the "Wan-T2V-14B" config of the same
# converter (40 blocks of width 40 x 128 = 5120, ffn 13824). Published as "14B"; this config builds
# 14,288,491,584 parameters (counted on the meta device).
WAN_T2V_14B: dict[str, Any] = {**WAN_T2V_13B, "ffn_dim": 13824, "num_attention_heads": 40, "num_layers": 40}

# HunyuanVideo (hunyuanvideo-community/HunyuanVideo, transformer/): diffusers'
# scripts/convert_hunyuan_video_to_diffusers.py builds it with the class defaults, which are these
# (20 double-stream + 40 single-stream blocks of width 24 x 128 = 3072, 2 token-refiner blocks, LLaVA
# text features 4096 wide). Published as "13B"; this config builds 12,821,012,544 parameters.
HUNYUAN_VIDEO: dict[str, Any] = {
    "attention_head_dim": 128,
    "guidance_embeds": True,
    "in_channels": 16,
    "mlp_ratio": 4.0,
    "num_attention_heads": 24,
    "num_layers": 20,
    "num_refiner_layers": 2,
    "num_single_layers": 40,
    "out_channels": 16,
    "patch_size": 2,
    "patch_size_t": 1,
    "pooled_projection_dim": 768,
    "qk_norm": "rms_norm",
    "rope_axes_dim": [16, 56, 56],
    "rope_theta": 256.0,
    "text_embed_dim": 4096,
}

# Qwen-Image (Qwen/Qwen-Image, transformer/config.json): 60 dual-stream blocks of width 24 x 128 = 3072,
# Qwen2.5-VL text features 3584 wide, 2x2-packed latent tokens. Published as "20B"; this config builds
# 20,430,401,088 parameters.
QWEN_IMAGE: dict[str, Any] = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 3584,
    "num_attention_heads": 24,
    "num_layers": 60,
    "out_channels": 16,
    "patch_size": 2,
}

# On a CPU the DiTs keep only a few of their (identical) blocks: a call at 1024² of all 24 SD3 blocks
# takes minutes there, and Flux's 12B weights do not fit in memory. Each block costs the same, so the
# per-call speed-up of a few blocks is that of the whole stack less the (small) embedding and output
# layers, which are not reduced.
SD3_CPU_BLOCKS: dict[str, Any] = {"num_layers": 2}
FLUX_CPU_BLOCKS: dict[str, Any] = {"num_layers": 1, "num_single_layers": 2}
WAN_CPU_BLOCKS: dict[str, Any] = {"num_layers": 1}
FLUX2_CPU_BLOCKS: dict[str, Any] = {"num_layers": 1, "num_single_layers": 1}
HUNYUAN_VIDEO_CPU_BLOCKS: dict[str, Any] = {"num_layers": 1, "num_single_layers": 1}
QWEN_IMAGE_CPU_BLOCKS: dict[str, Any] = {"num_layers": 1}

# SD 1.5's first transformer (down_blocks[0].attentions[0]): the full-resolution level where ToMe
# merges. Lets the 2048² case be measured on a CPU, where the whole UNet at 2048² takes minutes.
SD15_TOP_BLOCK: dict[str, Any] = {
    "num_attention_heads": 8,
    "attention_head_dim": 40,
    "in_channels": 320,
    "num_layers": 1,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "use_linear_projection": False,
}

# stabilityai/stable-diffusion-xl-base-1.0: its highest-resolution transformer (down_blocks[1].attentions[0],
# two BasicTransformerBlocks at width 640), the part of SDXL where merging happens.
SDXL_TOP_BLOCK: dict[str, Any] = {
    "num_attention_heads": 10,
    "attention_head_dim": 64,
    "in_channels": 640,
    "num_layers": 2,
    "cross_attention_dim": 2048,
    "norm_num_groups": 32,
    "use_linear_projection": True,
}

# Wan's text-to-video sizes (WanPipeline's 832x480 default; 1280x720 for 720p): --resolution is the
# height, the width is looked up here (other heights give square frames). 81 frames: the pipeline's
# default (5 s at 16 fps); the VAE keeps 1 + (81 - 1) / 4 = 21 latent frames.
WAN_WIDTHS: dict[int, int] = {480: 832, 720: 1280}
WAN_FRAMES = 81
WAN_VAE_TIME_STRIDE = 4  # HunyuanVideo's VAE too: 1 + (frames - 1) / 4 latent frames
# HunyuanVideoPipeline's defaults: 1280x720, 129 frames (33 latent frames); 960x544 its smaller size.
HUNYUAN_VIDEO_WIDTHS: dict[int, int] = {544: 960, 720: 1280}
HUNYUAN_VIDEO_FRAMES = 129

# Tiny stand-ins with the same structure, for tests and smoke runs (not real models).
TINY_UNET: dict[str, Any] = {
    **SD15_UNET,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 16,
}

TINY_PIXART: dict[str, Any] = {
    **PIXART_ALPHA_1024,
    "attention_head_dim": 8,
    "num_attention_heads": 6,  # width 48: PixArt's size conditioning splits it in three
    "cross_attention_dim": 48,  # PixArt projects captions to the transformer width
    "caption_channels": 16,
    "num_layers": 2,
    "sample_size": 16,
}


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarkable architecture.

    Attributes:
        name: the ``--model`` value.
        title: human-readable name for tables and plots.
        kind: ``"unet"``, ``"pixart"``, ``"transformer2d"``, ``"sd3"``, ``"flux"``, ``"flux2"``,
            ``"qwenimage"``, ``"wan"`` or ``"hunyuanvideo"``: picks the class and the inputs.
        config: constructor arguments of the diffusers class.
        text_tokens: length of the text-encoder sequence fed to cross-attention
            (77 CLIP tokens for SD, 120 T5 tokens for PixArt-α).
        max_downsample: the token-grid downsampling of the highest-resolution level that has
            transformer blocks. Merging is applied there for tomediff, tomesd and the ideal alike
            (tomesd's own default of 1 would leave SDXL untouched, since its 1x level has no
            transformers).
        resolution_multiple: image resolutions must be a multiple of this (latent /8, patches).
        published_params: parameter count of the released checkpoint, to check the config.
        cpu_overrides: config fields replaced when the model is built on the CPU (fewer blocks of a
            large transformer; see ``SD3_CPU_BLOCKS``).
        input_downsample: for a lone transformer (``"transformer2d"``) taken from inside a UNet, how
            much its input map is downsampled relative to the latent (SDXL's first transformer: 2).
        frames: video models: pixel frames of one clip (0: an image model).
        widths: video models: the frame width at a given ``--resolution`` (the height); heights not
            listed give square frames.
    """

    name: str
    title: str
    kind: str
    config: Mapping[str, Any]
    text_tokens: int = 77
    max_downsample: int = 1
    resolution_multiple: int = 8
    published_params: int | None = None
    tiny: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)
    cpu_overrides: Mapping[str, Any] = field(default_factory=dict)
    input_downsample: int = 1
    frames: int = 0
    widths: Mapping[int, int] = field(default_factory=dict)

    @property
    def text_dim(self) -> int:
        if self.kind == "pixart":
            return int(self.config["caption_channels"])
        if self.kind in ("sd3", "flux", "flux2", "qwenimage"):
            return int(self.config["joint_attention_dim"])
        if self.kind == "wan":
            return int(self.config["text_dim"])
        if self.kind == "hunyuanvideo":
            return int(self.config["text_embed_dim"])
        return int(self.config["cross_attention_dim"])

    def frame_size(self, resolution: int) -> tuple[int, int]:
        """(height, width) in pixels of an image or video frame at ``--resolution`` ``resolution``."""
        return resolution, int(self.widths.get(resolution, resolution))

    def latent_frames(self) -> int:
        """Frames of the video latent (Wan's and HunyuanVideo's VAEs: the first frame alone, then 4 per
        latent frame)."""
        return (self.frames - 1) // WAN_VAE_TIME_STRIDE + 1

    def config_for(self, device: str | torch.device) -> dict[str, Any]:
        """The constructor arguments on ``device`` (with :attr:`cpu_overrides` on the CPU)."""
        if torch.device(device).type == "cpu":
            return {**self.config, **self.cpu_overrides}
        return dict(self.config)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("sd15", "SD 1.5 UNet", "unet", SD15_UNET, published_params=859_520_964),
        ModelSpec("sd21", "SD 2.1 UNet", "unet", SD21_UNET, published_params=865_910_724),
        ModelSpec(
            "sdxl", "SDXL base UNet", "unet", SDXL_UNET, max_downsample=2, published_params=2_567_463_684
        ),
        ModelSpec(
            "pixart",
            "PixArt-α XL-2 1024",
            "pixart",
            PIXART_ALPHA_1024,
            text_tokens=120,
            resolution_multiple=16,
        ),
        ModelSpec(
            "sd3",
            "SD3-medium transformer",
            "sd3",
            SD3_MEDIUM,
            text_tokens=333,  # 77 CLIP + 256 T5 tokens, StableDiffusion3Pipeline's defaults
            resolution_multiple=16,
            cpu_overrides=SD3_CPU_BLOCKS,
        ),
        ModelSpec(
            "flux",
            "FLUX.1-dev transformer",
            "flux",
            FLUX_DEV,
            text_tokens=512,  # FluxPipeline's max_sequence_length for FLUX.1-dev
            resolution_multiple=16,
            cpu_overrides=FLUX_CPU_BLOCKS,
        ),
        ModelSpec(
            "flux2",
            "FLUX.2-dev transformer",
            "flux2",
            FLUX2_DEV,
            text_tokens=512,  # Flux2Pipeline's max_sequence_length
            resolution_multiple=16,
            cpu_overrides=FLUX2_CPU_BLOCKS,
        ),
        ModelSpec(
            "wan-1.3b",
            "Wan 2.1 T2V 1.3B transformer",
            "wan",
            WAN_T2V_13B,
            text_tokens=512,  # WanPipeline's max_sequence_length (UMT5 tokens)
            resolution_multiple=16,  # latent /8, then 2x2 patches
            cpu_overrides=WAN_CPU_BLOCKS,
            frames=WAN_FRAMES,
            widths=WAN_WIDTHS,
        ),
        ModelSpec(
            "wan-14b",
            "Wan 2.1 T2V 14B transformer",
            "wan",
            WAN_T2V_14B,
            text_tokens=512,
            resolution_multiple=16,
            cpu_overrides=WAN_CPU_BLOCKS,
            frames=WAN_FRAMES,
            widths=WAN_WIDTHS,
        ),
        ModelSpec(
            "hunyuanvideo",
            "HunyuanVideo transformer",
            "hunyuanvideo",
            HUNYUAN_VIDEO,
            text_tokens=256,  # HunyuanVideoPipeline's max_sequence_length (LLaVA tokens)
            resolution_multiple=16,  # latent /8, then 2x2 patches
            cpu_overrides=HUNYUAN_VIDEO_CPU_BLOCKS,
            frames=HUNYUAN_VIDEO_FRAMES,
            widths=HUNYUAN_VIDEO_WIDTHS,
        ),
        ModelSpec(
            "qwen-image",
            "Qwen-Image transformer",
            "qwenimage",
            QWEN_IMAGE,
            text_tokens=512,  # QwenImagePipeline's max_sequence_length
            resolution_multiple=16,  # latent /8, then 2x2-packed tokens
            cpu_overrides=QWEN_IMAGE_CPU_BLOCKS,
        ),
        ModelSpec("sd15-block", "SD 1.5 top transformer block", "transformer2d", SD15_TOP_BLOCK),
        ModelSpec(
            "sdxl-block",
            "SDXL top transformer (2 blocks)",
            "transformer2d",
            SDXL_TOP_BLOCK,
            resolution_multiple=16,
            input_downsample=2,
        ),
        ModelSpec("tiny-unet", "tiny UNet (tests)", "unet", TINY_UNET, text_tokens=8, tiny=True),
        ModelSpec(
            "tiny-pixart",
            "tiny PixArt (tests)",
            "pixart",
            TINY_PIXART,
            text_tokens=8,
            resolution_multiple=16,
            tiny=True,
        ),
    )
}


def get_model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"Unknown model {name!r}; choose from: {', '.join(MODELS)}.") from None


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every ``nn.Parameter`` on the meta device while a model is constructed.

    Default initialisation of a 2.6B-parameter UNet takes tens of seconds on a CPU and the values
    are irrelevant here; buffers (e.g. PixArt's sin-cos position table) are still computed for real
    because they are part of the model's behaviour.
    """
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _model_class(kind: str) -> type[nn.Module]:
    # Imported lazily: diffusers takes seconds to import and the CLI validates flags first.
    import diffusers

    classes = {
        "unet": diffusers.UNet2DConditionModel,
        "pixart": diffusers.PixArtTransformer2DModel,
        "transformer2d": diffusers.Transformer2DModel,
        "sd3": diffusers.SD3Transformer2DModel,
        "flux": diffusers.FluxTransformer2DModel,
        "flux2": diffusers.Flux2Transformer2DModel,
        "wan": diffusers.WanTransformer3DModel,
        "hunyuanvideo": diffusers.HunyuanVideoTransformer3DModel,
        "qwenimage": diffusers.QwenImageTransformer2DModel,
    }
    return classes[kind]


def build_model(
    spec: ModelSpec, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> nn.Module:
    """The architecture of ``spec`` with random weights, in eval mode, on ``device``/``dtype``.

    Weights are drawn uniformly in ±1/sqrt(fan_in) (PyTorch's default bound for linear and conv
    layers), norm scales are 1 and biases 0, so activations stay in a realistic range (no overflow
    to inf in fp16, no denormals slowing the CPU down).
    """
    cls = _model_class(spec.kind)
    with _parameters_on_meta():
        model = cls(**spec.config_for(device))
    # Drawn on the target device: initialising SDXL's 2.6B weights on a CPU first would dominate a
    # GPU run. (Values differ between devices for the same seed; cost does not.)
    init_device = torch.device(device)
    generator = torch.Generator(device=init_device).manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is None:
                    continue
                real = torch.empty(param.shape, dtype=torch.float32, device=init_device)
                if param.dim() > 1:
                    bound = 1.0 / math.sqrt(param[0].numel())
                    real.uniform_(-bound, bound, generator=generator)
                elif name.endswith("weight") or name.endswith("scale_shift_table"):
                    real.fill_(1.0)
                else:
                    real.zero_()
                module._parameters[name] = nn.Parameter(
                    real.to(device=device, dtype=dtype), requires_grad=False
                )
    # nn.Module.to, not diffusers' override, which warns about fp32-only modules; these random-weight
    # models have none that matter for cost.
    model = nn.Module.to(model, device=device, dtype=dtype)  # the buffers, which were built for real
    model.eval()
    return model


@dataclass
class ModelInputs:
    """Positional and keyword arguments of one denoising call.

    The latent is positional because tomesd reads the image size from the first positional
    argument of the model's forward.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def to_meta(self) -> ModelInputs:
        def move(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return torch.empty_like(value, device="meta")
            if isinstance(value, dict):
                return {k: move(v) for k, v in value.items()}
            return value

        return ModelInputs(tuple(move(a) for a in self.args), {k: move(v) for k, v in self.kwargs.items()})


def make_inputs(
    spec: ModelSpec,
    batch: int,
    resolution: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> ModelInputs:
    """Inputs of one denoising call at ``resolution``² pixels (latent = resolution / 8); for a video
    model, of one ``spec.frames``-frame clip of height ``resolution`` (see :meth:`ModelSpec.frame_size`).

    ``batch`` = 2 is one image with classifier-free guidance (conditional and unconditional halves).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    latent = resolution // 8
    text = randn(batch, spec.text_tokens, spec.text_dim)
    timestep = torch.full((batch,), 999, dtype=torch.long, device=device)
    if spec.kind == "unet":
        sample = randn(batch, int(spec.config["in_channels"]), latent, latent)
        kwargs: dict[str, Any] = {"return_dict": False}
        if spec.config.get("addition_embed_type") == "text_time":
            # SDXL: pooled text embedding + (original size, crop, target size) conditioning.
            pooled = int(spec.config["projection_class_embeddings_input_dim"]) - 6 * int(
                spec.config["addition_time_embed_dim"]
            )
            time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=dtype)
            kwargs["added_cond_kwargs"] = {
                "text_embeds": randn(batch, pooled),
                "time_ids": time_ids.repeat(batch, 1).to(device),
            }
        return ModelInputs((sample, timestep, text), kwargs)
    if spec.kind == "pixart":
        sample = randn(batch, int(spec.config["in_channels"]), latent, latent)
        added: dict[str, torch.Tensor | None] = {"resolution": None, "aspect_ratio": None}
        if spec.config.get("use_additional_conditions"):
            added = {
                "resolution": torch.tensor([[resolution, resolution]] * batch, dtype=dtype, device=device),
                "aspect_ratio": torch.ones(batch, 1, dtype=dtype, device=device),
            }
        kwargs = {
            "encoder_hidden_states": text,
            "timestep": timestep,
            "added_cond_kwargs": added,
            "return_dict": False,
        }
        return ModelInputs((sample,), kwargs)
    if spec.kind == "transformer2d":
        side = latent // spec.input_downsample
        sample = randn(batch, int(spec.config["in_channels"]), side, side)
        return ModelInputs((sample,), {"encoder_hidden_states": text, "return_dict": False})
    if spec.kind == "sd3":
        sample = randn(batch, int(spec.config["in_channels"]), latent, latent)
        kwargs = {
            "encoder_hidden_states": text,
            "pooled_projections": randn(batch, int(spec.config["pooled_projection_dim"])),
            "timestep": timestep.to(dtype),
            "return_dict": False,
        }
        return ModelInputs((sample,), kwargs)
    if spec.kind == "flux":
        # FluxPipeline packs 2x2 latent patches into tokens; img_ids hold each token's (0, row, column).
        side = latent // 2
        packed = randn(batch, side * side, int(spec.config["in_channels"]))
        img_ids = torch.zeros(side, side, 3)
        img_ids[..., 1] = torch.arange(side)[:, None]
        img_ids[..., 2] = torch.arange(side)[None, :]
        kwargs = {
            "encoder_hidden_states": text,
            "pooled_projections": randn(batch, int(spec.config["pooled_projection_dim"])),
            "timestep": torch.full((batch,), 0.999, dtype=dtype, device=device),  # the pipeline's t / 1000
            "img_ids": img_ids.reshape(-1, 3).to(device=device, dtype=dtype),
            "txt_ids": torch.zeros(spec.text_tokens, 3, dtype=dtype, device=device),
            "return_dict": False,
        }
        if spec.config.get("guidance_embeds"):
            kwargs["guidance"] = torch.full((batch,), 3.5, dtype=dtype, device=device)
        return ModelInputs((packed,), kwargs)
    if spec.kind == "flux2":
        # Flux2Pipeline packs 2x2 latent patches (32 channels each) into tokens; positions are
        # (time, row, column, layer) per token: (0, row, column, 0) for the image, (0, 0, 0, index) for text.
        side = latent // 2
        packed = randn(batch, side * side, int(spec.config["in_channels"]))
        rows, columns = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        img_ids = torch.zeros(side * side, 4)
        img_ids[:, 1], img_ids[:, 2] = rows.reshape(-1), columns.reshape(-1)
        txt_ids = torch.zeros(spec.text_tokens, 4)
        txt_ids[:, 3] = torch.arange(spec.text_tokens)
        kwargs = {
            "encoder_hidden_states": text,
            "timestep": torch.full((batch,), 0.999, dtype=dtype, device=device),  # the pipeline's t / 1000
            "img_ids": img_ids.expand(batch, -1, -1).to(device=device, dtype=dtype),
            "txt_ids": txt_ids.expand(batch, -1, -1).to(device=device, dtype=dtype),
            "return_dict": False,
        }
        if spec.config.get("guidance_embeds"):
            kwargs["guidance"] = torch.full((batch,), 4.0, dtype=dtype, device=device)  # pipeline default
        return ModelInputs((packed,), kwargs)
    if spec.kind == "wan":
        # (batch, channels, latent frames, height / 8, width / 8); WanPipeline passes the scheduler's
        # timestep (0-1000) as is.
        height, width = spec.frame_size(resolution)
        sample = randn(batch, int(spec.config["in_channels"]), spec.latent_frames(), height // 8, width // 8)
        kwargs = {"encoder_hidden_states": text, "timestep": timestep, "return_dict": False}
        return ModelInputs((sample,), kwargs)
    if spec.kind == "hunyuanvideo":
        # HunyuanVideoPipeline: the scheduler's timestep as is, guidance x 1000 (default scale 6), a text
        # mask, and CLIP's pooled prompt.
        height, width = spec.frame_size(resolution)
        sample = randn(batch, int(spec.config["in_channels"]), spec.latent_frames(), height // 8, width // 8)
        kwargs = {
            "timestep": timestep,
            "encoder_hidden_states": text,
            "encoder_attention_mask": torch.ones(batch, spec.text_tokens, dtype=torch.long, device=device),
            "pooled_projections": randn(batch, int(spec.config["pooled_projection_dim"])),
            "guidance": torch.full((batch,), 6000.0, dtype=dtype, device=device),
            "return_dict": False,
        }
        return ModelInputs((sample,), kwargs)
    if spec.kind == "qwenimage":
        # QwenImagePipeline packs 2x2 latent patches (16 channels each) into tokens and says their grid
        # in img_shapes; it passes t / 1000.
        side = latent // 2
        kwargs = {
            "encoder_hidden_states": text,
            "encoder_hidden_states_mask": torch.ones(
                batch, spec.text_tokens, dtype=torch.long, device=device
            ),
            "timestep": torch.full((batch,), 0.999, dtype=dtype, device=device),
            "img_shapes": [[(1, side, side)]] * batch,
            "return_dict": False,
        }
        return ModelInputs((randn(batch, side * side, int(spec.config["in_channels"])),), kwargs)
    raise ValueError(f"Unknown model kind {spec.kind!r}.")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
