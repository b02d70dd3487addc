"""The package type-checks: it ships py.typed, so its annotations are part of its public API."""

from __future__ import annotations

from pathlib import Path

import mypy.api as mypy_api
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_reports_no_errors(pytestconfig: pytest.Config, tmp_path: Path) -> None:
    # The cache goes under .pytest_cache (git-ignored), so later runs are incremental; without the
    # cache plugin a temporary directory keeps the checkout clean.
    cache = getattr(pytestconfig, "cache", None)
    cache_dir = cache.mkdir("mypy") if cache is not None else tmp_path / "mypy_cache"
    stdout, stderr, status = mypy_api.run(
        [
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(cache_dir),
            str(ROOT / "src" / "tomediff"),
        ]
    )
    assert status == 0, f"mypy reports errors:\n{stdout}{stderr}"
