"""The metric network: a small CNN trained on the Fashion-MNIST training split.

Its softmax gives the class accuracy of generated images (prompt adherence, the stand-in for CLIP
score) and its 128-d penultimate features feed the Fréchet distance (the stand-in for FID's
Inception features). Train and ship it with

    python -m tomediff.eval.classifier --out src/tomediff/eval/assets --epochs 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tomediff.eval.data import load_fashion_mnist

__all__ = [
    "FashionClassifier",
    "compute_reference_stats",
    "load_classifier",
    "preprocess",
    "train_classifier",
]

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
CLASSIFIER_FILE = "classifier.safetensors"
REFERENCE_STATS_FILE = "fashion_mnist_test_features.npz"
# Training-split statistics; fixed so the shipped classifier always sees the same normalisation.
_MEAN, _STD = 0.2860, 0.3530


class FashionClassifier(nn.Module):
    """``(B, 1, 28, 28)`` normalised images → logits ``(B, 10)``; :meth:`features` gives ``(B, 128)``."""

    feature_dim = 128

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14×14
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 7×7
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(64 * 7 * 7, self.feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.25), nn.Linear(self.feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def preprocess(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 28, 28)`` → normalised float ``(N, 1, 28, 28)``."""
    tensor = torch.from_numpy(np.array(images, dtype=np.float32, copy=True)) / 255.0
    return ((tensor - _MEAN) / _STD).unsqueeze(1)


@torch.no_grad()
def classify(
    model: FashionClassifier, images: np.ndarray, batch_size: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted labels ``(N,)`` and penultimate features ``(N, 128)`` of uint8 images ``(N, 28, 28)``."""
    model.eval()
    labels, feats = [], []
    for start in range(0, len(images), batch_size):
        x = preprocess(images[start : start + batch_size])
        f = model.features(x)
        labels.append(model.head(f).argmax(1))
        feats.append(f)
    if not labels:
        return np.zeros(0, dtype=np.int64), np.zeros((0, FashionClassifier.feature_dim), dtype=np.float64)
    return torch.cat(labels).numpy(), torch.cat(feats).double().numpy()


def train_classifier(
    epochs: int = 3, batch_size: int = 128, lr: float = 1e-3, seed: int = 0, data_dir: str | None = None
) -> tuple[FashionClassifier, float]:
    """Train on the training split; returns the model and its test accuracy."""
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    train_x, train_y = load_fashion_mnist("train", data_dir)
    test_x, test_y = load_fashion_mnist("test", data_dir)
    x_all, y_all = preprocess(train_x), torch.from_numpy(train_y)
    model = FashionClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    total = epochs * (len(y_all) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total)
    started, step = time.time(), 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y_all), generator=rng)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            x = x_all[idx]
            # A one-pixel random shift: generated garments are not always exactly centred.
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=rng))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x), y_all[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sched.step()
            step += 1
            if step % 100 == 0:
                print(
                    f"epoch {epoch} step {step}/{total} loss {loss.item():.4f} {time.time() - started:.0f}s",
                    flush=True,
                )
    predicted, _ = classify(model, test_x)
    accuracy = float((predicted == test_y).mean())
    return model, accuracy


def compute_reference_stats(model: FashionClassifier, data_dir: str | None = None) -> dict[str, np.ndarray]:
    """Mean ``(128,)`` and covariance ``(128, 128)`` of the classifier features of the test split."""
    test_x, _ = load_fashion_mnist("test", data_dir)
    _, feats = classify(model, test_x)
    return {"mu": feats.mean(0), "sigma": np.cov(feats, rowvar=False), "count": np.array(len(feats))}


def load_classifier(assets_dir: Path = ASSETS_DIR) -> FashionClassifier:
    """The shipped classifier (eval mode)."""
    from safetensors.torch import load_file

    path = Path(assets_dir) / CLASSIFIER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"classifier weights not found at {path}; train them with "
            "`python -m tomediff.eval.classifier --out DIR`."
        )
    model = FashionClassifier()
    model.load_state_dict(load_file(path))
    return model.eval()


def load_reference_stats(assets_dir: Path = ASSETS_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Shipped Fréchet reference statistics ``mu (128,)``, ``sigma (128, 128)`` of the test split."""
    with np.load(Path(assets_dir) / REFERENCE_STATS_FILE) as data:
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ASSETS_DIR)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from safetensors.torch import save_file

    started = time.time()
    model, accuracy = train_classifier(epochs=args.epochs, seed=args.seed, data_dir=args.data_dir)
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out / CLASSIFIER_FILE)
    stats = compute_reference_stats(model, args.data_dir)
    np.savez(
        args.out / REFERENCE_STATS_FILE,
        mu=stats["mu"].astype(np.float32),
        sigma=stats["sigma"].astype(np.float32),
        count=stats["count"],
    )
    info = {
        "test_accuracy": accuracy,
        "epochs": args.epochs,
        "seed": args.seed,
        "train_seconds": round(time.time() - started, 1),
        "threads": args.threads,
    }
    (args.out / "classifier.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"test accuracy {accuracy:.4f}; wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
