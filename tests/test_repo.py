"""The repository itself: no half-resolved merge left in any tracked text file."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKERS = ("<" * 7 + " ", "=" * 7 + "\n", ">" * 7 + " ")


def _tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout")
    return [p for p in out.stdout.decode().split("\0") if p]


def test_no_merge_conflict_markers():
    # A conflict's three marker lines (7 '<' or '>' and a space, or 7 '=' alone) at the
    # start of a line, in any tracked file that reads as text.
    bad = []
    for rel in _tracked_files():
        path = os.path.join(ROOT, rel)
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
        except (UnicodeDecodeError, OSError):
            continue  # binary (plots) or gone
        bad += [f"{rel}:{i + 1}" for i, line in enumerate(lines) if line.startswith(MARKERS)]
    assert not bad, "merge conflict markers left in: " + ", ".join(bad)
