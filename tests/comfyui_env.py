"""Real ComfyUI for the node pack's tests and benchmark: the vendored release extracted to a folder,
imported CPU-only, with tiny random-weight models built through its own model classes."""

from __future__ import annotations

import asyncio
import importlib.machinery
import os
import sys
import tarfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = "comfyui-0.3.64-a125cd8.tar.gz"  # ComfyUI 0.3.64 minus its API nodes and tests
PACK = REPO / "integrations" / "comfyui"
CPU = torch.device("cpu")


def vendor_archive() -> Path | None:
    """The ComfyUI archive: $COMFYUI_ARCHIVE, else ``shared/vendor/`` beside the checkout (or above it)."""
    override = os.environ.get("COMFYUI_ARCHIVE")
    if override:
        return Path(override)
    for parent in REPO.parents:
        candidate = parent / "shared" / "vendor" / ARCHIVE
        if candidate.is_file():
            return candidate
    return None


def _stub_torchvision() -> list[str]:
    """ComfyUI imports torchvision at module level (Cosmos, Cascade) but these tests never use it;
    the registry's torchvision wheels do not load with this project's CPU torch. Returns the names added."""
    if "torchvision" in sys.modules:
        return []
    root = types.ModuleType("torchvision")
    root.__path__ = []
    # A spec without a loader: importlib.util.find_spec works on it, nothing can be loaded from it.
    root.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    names = ["torchvision"]
    for sub in ("transforms", "models"):
        module = types.ModuleType(f"torchvision.{sub}")
        setattr(root, sub, module)
        sys.modules[module.__name__] = module
        names.append(module.__name__)
    sys.modules["torchvision"] = root
    return names


@dataclass
class Comfy:
    """Handles on the imported ComfyUI."""

    root: Path
    nodes: Any
    model_patcher: Any
    patcher_extension: Any
    supported_models: Any
    execution: Any
    pack: Any
    tome_patch_model: Any  # ComfyUI's own TomePatchModel node class
    added_modules: list[str]

    def load(self, module_path: Path, parent: str = "custom_nodes") -> bool:
        return asyncio.run(self.nodes.load_custom_node(str(module_path), module_parent=parent))


def start_comfy(folder: Path) -> Comfy:
    """Extract ComfyUI into ``folder``, import it CPU-only and load the pack with its custom-node loader."""
    archive_path = vendor_archive()
    if archive_path is None:
        raise FileNotFoundError(
            f"{ARCHIVE} not found in shared/vendor/ beside the checkout; set COMFYUI_ARCHIVE"
        )
    with tarfile.open(archive_path) as archive:
        archive.extractall(folder, filter="data")
    root = folder / "comfyui"
    before = set(sys.modules)
    stubs = _stub_torchvision()
    sys.path.insert(0, str(root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    import comfy.model_management
    import comfy.model_patcher
    import comfy.patcher_extension
    import comfy.supported_models
    import execution
    import nodes

    env = Comfy(
        root=root,
        nodes=nodes,
        model_patcher=comfy.model_patcher,
        patcher_extension=comfy.patcher_extension,
        supported_models=comfy.supported_models,
        execution=execution,
        pack=None,
        tome_patch_model=None,
        added_modules=[],
    )
    assert env.load(PACK), "ComfyUI could not load the tomediff pack (see the log above)"
    assert env.load(root / "comfy_extras" / "nodes_tomesd.py", parent="comfy_extras")
    env.pack = sys.modules[str(PACK).replace(".", "_x_")]
    env.tome_patch_model = nodes.NODE_CLASS_MAPPINGS["TomePatchModel"]
    env.added_modules = sorted(set(sys.modules) - before)
    _drop_stubs(stubs)
    return env


def _drop_stubs(names: list[str]) -> None:
    """Forget the torchvision stand-in once ComfyUI is imported, and what transformers concluded from
    it (its availability checks are cached), so later code sees the real environment."""
    for name in names:
        sys.modules.pop(name, None)
    import_utils = sys.modules.get("transformers.utils.import_utils")
    for name in dir(import_utils) if import_utils is not None else ():
        check = getattr(import_utils, name)
        if name.startswith("is_torchvision") and hasattr(check, "cache_clear"):
            check.cache_clear()


def stop_comfy(env: Comfy) -> None:
    """Forget ComfyUI's modules (top-level names like ``nodes`` and ``utils``), the pack's, and ComfyUI's
    path entry; the libraries ComfyUI imported (transformers, ...) stay loaded as they are."""
    root = str(env.root)
    owned = [
        name for name in env.added_modules if _origin(sys.modules.get(name)).startswith((root, str(PACK)))
    ]
    for name in owned:
        sys.modules.pop(name, None)
    if root in sys.path:
        sys.path.remove(root)


def _origin(module: Any) -> str:
    """Where ``module`` was loaded from (its file, or a namespace package's first folder)."""
    origin = getattr(module, "__file__", None)
    if origin is None:
        origin = next(iter(getattr(module, "__path__", None) or ()), "")
    return str(origin)


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """ComfyUI builds layers without initialising them (weights come from checkpoints): seeded random
    weights, scaled by fan-in so activations stay O(1); norms start as identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.numel() == 0:
                continue
            if parameter.dim() >= 2:
                fan_in = parameter[0].numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)
            elif name.endswith("bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
            else:
                parameter.fill_(1.0)
        for name, buffer in model.named_buffers():
            # The diffusion model's buffers come from checkpoints too (SD3's pos_embed is torch.empty:
            # uninitialised memory, sometimes NaN); model_sampling's are computed and stay.
            if name.startswith("diffusion_model.") and buffer.is_floating_point():
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.02)


def sd15_unet_config(
    channels: int = 32, heads: int = 2, context: int = 16, levels: int = 2
) -> dict[str, Any]:
    """SD 1.x layout (transformer blocks from the full-resolution level on), ``levels`` levels."""
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": channels,
        "num_res_blocks": [1] * levels,
        "channel_mult": [1, 2, 4, 4][:levels],
        "transformer_depth": [1] * levels,  # one entry per input res block
        "transformer_depth_middle": 1,
        "transformer_depth_output": [1] * (2 * levels),  # one per output res block
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        "use_linear_in_transformer": False,
        "context_dim": context,
        "num_heads": heads,
        "num_head_channels": -1,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }


SDXL_POOLED = 16  # the pooled text embedding of the tiny SDXL; ComfyUI adds 6 * 256 size embeddings


def sdxl_unet_config(channels: int = 32, context: int = 16) -> dict[str, Any]:
    """SDXL layout: no transformer block at the full-resolution level, blocks from level 2 on."""
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": channels,
        "num_res_blocks": [1, 1, 1],
        "channel_mult": [1, 2, 2],
        "transformer_depth": [0, 1, 1],
        "transformer_depth_middle": 1,
        "transformer_depth_output": [0, 0, 1, 1, 1, 1],
        "use_spatial_transformer": True,
        "legacy": False,
        "num_classes": "sequential",
        "adm_in_channels": SDXL_POOLED + 6 * 256,
        "use_linear_in_transformer": True,
        "context_dim": context,
        "num_head_channels": 16,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }


def build_model(env: Comfy, family: str, unet_config: dict[str, Any], seed: int = 0) -> Any:
    """A ``ModelPatcher`` around ComfyUI's model class for ``family`` (a ``comfy.supported_models``
    class name), float32 on the CPU, seeded random weights."""
    model_config = getattr(env.supported_models, family)(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "", device=CPU)
    init_weights(model, seed)
    return env.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


def conditioning(dim: int, tokens: int, seed: int, **extra: torch.Tensor) -> list[list[Any]]:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, dim, generator=generator), dict(extra)]]


def ksample(
    env: Comfy,
    model: Any,
    positive: list[list[Any]],
    negative: list[list[Any]],
    latent: torch.Tensor,
    steps: int = 1,
    cfg: float = 5.0,
    seed: int = 0,
) -> torch.Tensor:
    """One run of ComfyUI's KSampler node (euler, normal schedule)."""
    (out,) = env.nodes.KSampler().sample(
        model, seed, steps, cfg, "euler", "normal", positive, negative, {"samples": latent}, denoise=1.0
    )
    return out["samples"]


def sd15_full_unet_config() -> dict[str, Any]:
    """The published SD 1.5 UNet layout (what ComfyUI detects from a v1-5 checkpoint), for the benchmark."""
    return {
        **sd15_unet_config(channels=320, heads=8, context=768, levels=4),
        "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    }


def flux_unet_config() -> dict[str, Any]:
    """Flux.1 layout at toy width: one double-stream and one single-stream block, no guidance input."""
    return {
        "image_model": "flux",
        "in_channels": 16,
        "out_channels": 16,
        "vec_in_dim": 8,
        "context_in_dim": 16,
        "hidden_size": 32,
        "mlp_ratio": 2.0,
        "num_heads": 2,
        "depth": 1,
        "depth_single_blocks": 1,
        "axes_dim": [4, 6, 6],
        "theta": 10000,
        "patch_size": 2,
        "qkv_bias": True,
        "guidance_embed": False,
    }


def sd3_unet_config() -> dict[str, Any]:
    """SD3 (MMDiT) layout at toy width: ComfyUI makes the width 64 per block and one head per block."""
    return {
        "in_channels": 16,
        "out_channels": 16,
        "patch_size": 2,
        "depth": 2,
        "adm_in_channels": 8,
        "context_embedder_config": {
            "target": "torch.nn.Linear",
            "params": {"in_features": 16, "out_features": 128},
        },
        "pos_embed_max_size": 16,
        "num_patches": 256,
        "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": [],
    }


def wan_unet_config() -> dict[str, Any]:
    """Wan 2.1 text-to-video layout at toy width, one block."""
    return {
        "image_model": "wan2.1",
        "model_type": "t2v",
        "patch_size": (1, 2, 2),
        "in_dim": 16,
        "dim": 32,
        "ffn_dim": 64,
        "freq_dim": 16,
        "text_dim": 16,
        "out_dim": 16,
        "num_heads": 2,
        "num_layers": 1,
    }


def qwen_image_unet_config() -> dict[str, Any]:
    """Qwen-Image (and -Edit: the same model, given reference latents) at toy width, one block."""
    return {
        "image_model": "qwen_image",
        "patch_size": 2,
        "in_channels": 64,
        "out_channels": 16,
        "num_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 16,
        "axes_dims_rope": (4, 6, 6),
    }
