"""The paper protocol end to end on a tiny random-weight Stable Diffusion pipeline built from configs.

Nothing is downloaded: the tokenizer uses a character vocabulary written here. Only the FID/CLIP metric
calls are replaced (their Inception/CLIP weights cannot be fetched offline); generation, merging,
paired metrics, outputs and the unavailable-metric messages are real.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch

from tomediff.cli.eval_cmd import add_arguments, run
from tomediff.eval import paper


def _tiny_sd_pipeline(directory: Path) -> Path:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits + ".,-'":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    (directory / "tok").mkdir(parents=True)
    (directory / "tok" / "vocab.json").write_text(json.dumps(vocab))
    (directory / "tok" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(directory / "tok" / "vocab.json"), str(directory / "tok" / "merges.txt"), model_max_length=16
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        sample_size=32,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(skip_prk_steps=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory / "sd")
    return directory / "sd"


def _args(model: Path, names: Path, out: Path, *extra: str) -> object:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(
        [
            "--model",
            str(model),
            "--class-names",
            str(names),
            "--out",
            str(out),
            "--resolution",
            "32",
            "--steps",
            "2",
            "--samples-per-class",
            "2",
            "--batch-size",
            "4",
            "--ratios",
            "0,0.5",
            "--threads",
            "1",
            "--no-progress",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def sd_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sd")
    names = root / "classes.txt"
    names.write_text("tench\ngoldfish\ngreat white shark\n")
    return _tiny_sd_pipeline(root), names


def test_paper_protocol_flow_with_metrics_unavailable(
    sd_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, names = sd_model
    assert run(_args(model, names, tmp_path / "out")) == 0
    printed = capsys.readouterr().out
    assert "FID skipped: pass --fid-ref" in printed
    assert "CLIP score unavailable" in printed
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"unmerged", "tomediff r=0.5"}
    assert rows["unmerged"]["num_images"] == 6 and rows["unmerged"]["fid"] is None
    merged = rows["tomediff r=0.5"]
    assert merged["psnr"]["value"] < 100  # merging changed the images
    assert 0 < merged["ssim"]["value"] <= 1
    pngs = sorted((tmp_path / "out" / "png" / "unmerged").glob("*.png"))
    assert len(pngs) == 6
    assert result["meta"]["steps"] == 2 and result["meta"]["classes"] == 3
    for name in ("results.csv", "results.md", "grid.png", "metrics_vs_ratio.png"):
        assert (tmp_path / "out" / name).is_file()


def test_paper_protocol_reports_fid_and_clip_from_the_metric_backends(
    sd_model: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, names = sd_model
    fid_dirs: list[Path] = []

    def fake_fid(gen_dir: Path, ref_dir: Path | None, device: torch.device) -> tuple[float, str]:
        fid_dirs.append(gen_dir)
        assert ref_dir == tmp_path / "ref"
        return 12.5 + len(fid_dirs), "mocked FID"

    def fake_clip(
        images: np.ndarray, prompts: list[str], model_name: str, device: torch.device
    ) -> tuple[float, str]:
        assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
        assert prompts[0] == "A high-quality photograph of a tench."
        return 30.0, "mocked CLIP"

    monkeypatch.setattr(paper, "_fid", fake_fid)
    monkeypatch.setattr(paper, "_clip_score", fake_clip)
    (tmp_path / "ref").mkdir()  # --fid-ref must exist: it is checked before any generation
    assert run(_args(model, names, tmp_path / "out", "--fid-ref", str(tmp_path / "ref"))) == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [r["fid"] for r in rows] == [13.5, 14.5]
    assert all(r["clip_score"] == 30.0 for r in rows)
    assert [len(list(d.glob("*.png"))) for d in fid_dirs] == [6, 6]


def test_missing_weights_give_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = tmp_path / "classes.txt"
    names.write_text("tench\n")
    assert run(_args(tmp_path / "no-such-model", names, tmp_path / "out")) == 1
    assert "Could not load Stable Diffusion weights" in capsys.readouterr().err
