"""The README's offline example runs exactly as written, and prints the report the README shows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def fenced_block_after(marker: str) -> str:
    """The fenced code block that follows the HTML comment ``<!-- marker: ... -->`` in the README."""
    text = README.read_text(encoding="utf-8")
    found = re.search(rf"<!-- {re.escape(marker)}:[^>]*-->\n```[a-z]*\n(.*?)\n```", text, re.DOTALL)
    assert found, f"README.md has no fenced block after the marker <!-- {marker}: ... -->"
    return found.group(1)


def test_offline_example_runs_as_written_and_prints_the_report_shown(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("safetensors")
    code = fenced_block_after("offline-example")
    # The example's own `assert` checks that removal restores the unmerged images bit for bit.
    exec(compile(code, f"{README} (offline example)", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out

    shown = fenced_block_after("offline-example-report").splitlines()
    assert shown[0].startswith("tomediff on UNet2DConditionModel") and "3 blocks patched" in shown[0]
    assert "3 blocks patched" in printed
    # The per-block rows and the effective ratio are what the README promises the user will see.
    for line in shown[1:]:
        assert line in printed.splitlines(), f"README shows {line!r}, the example printed:\n{printed}"
    assert re.search(r"mean \|merged - unmerged\| \(0-255\): \d", printed)
