"""Image-quality tooling: the bundled Fashion-MNIST diffusion model, its classifier, metrics, ``eval``.

Heavy imports (diffusers, accelerate) happen inside functions, so importing this package is cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_classifier", "load_demo_dit", "load_demo_model"]


def load_demo_model(*args: Any, **kwargs: Any) -> Any:
    """The bundled trained model as a ready ``DemoPipeline``.

    See :func:`tomediff.eval.pipeline.load_demo_model`.
    """
    from tomediff.eval.pipeline import load_demo_model as _load

    return _load(*args, **kwargs)


def load_demo_dit(*args: Any, **kwargs: Any) -> Any:
    """The bundled trained DiT (a small ``FluxTransformer2DModel``) as a ready ``DemoDiTPipeline``.

    See :func:`tomediff.eval.pipeline.load_demo_dit`.
    """
    from tomediff.eval.pipeline import load_demo_dit as _load

    return _load(*args, **kwargs)


def load_classifier(*args: Any, **kwargs: Any) -> Any:
    """The bundled Fashion-MNIST classifier; see :func:`tomediff.eval.classifier.load_classifier`."""
    from tomediff.eval.classifier import load_classifier as _load

    return _load(*args, **kwargs)
