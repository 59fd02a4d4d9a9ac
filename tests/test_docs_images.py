"""docs/patterns.md shows a picture of every pattern, each drawn from a shipped spec by
docs/images/make.sh (`attncc analyze examples/specs/NAME --png docs/images/NAME.png`)."""

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, SPECS

DOC = REPO / "docs" / "patterns.md"
IMAGES = REPO / "docs" / "images"


def _sections() -> dict[str, str]:
    """Each ``## `name(...)``` section of the pattern reference, by the pattern's name."""
    parts = re.split(r"^## `(\w+)\(", DOC.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_every_pattern_has_a_picture_drawn_from_a_spec_it_names():
    sections = _sections()
    assert {"block_diagonal", "congruent", "dense", "neighborhood", "per_head"} <= set(sections)
    for name, text in sections.items():
        pictures = re.findall(
            r"!\[(\w+)\]\(images/(\w+)\.png\)\n\*`examples/specs/(\w+)\.(yaml|json)`\*", text
        )
        assert pictures, f"{name}: no picture"
        for alt, image, spec, suffix in pictures:
            assert alt == image == spec, (alt, image, spec)
            assert (IMAGES / f"{image}.png").is_file() and (SPECS / f"{spec}.{suffix}").is_file()


def test_every_image_is_shown():
    shown = set(re.findall(r"images/(\w+\.png)", DOC.read_text()))
    assert {p.name for p in IMAGES.glob("*.png")} == shown


def test_make_draws_a_picture(tmp_path):
    env = {
        **os.environ,
        "IMAGES": str(tmp_path),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    proc = subprocess.run(
        ["bash", str(IMAGES / "make.sh"), "congruent"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "congruent.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
