"""No URL from the matrix reaches a file that goes into the image: an index or mirror URL can hold a token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.matrix import expand, load_matrix
from builder.render import render

from .conftest import SMALL

ROOT = Path(__file__).resolve().parents[2]
CANARY = "tok3n-canary-5ec7e7"


@pytest.mark.parametrize("where", ["index-path", "index-host", "mirror-path"])
def test_matrix_urls_stay_out_of_every_rendered_file(write_matrix, where):
    text = {
        "index-path": SMALL.replace("https://download.pytorch.org/whl/cpu", f"https://idx.example.com/{CANARY}/simple"),
        "index-host": SMALL.replace("https://download.pytorch.org/whl/cpu", f"https://{CANARY}.example.com/simple"),
        "mirror-path": SMALL.replace("http://deb.debian.org/debian", f"http://deb.example.com/{CANARY}/debian"),
    }[where]
    assert CANARY in text
    cells, _ = expand(load_matrix(write_matrix(text)))
    assert any(c.index for c in cells) and any(c.base.bootstrap for c in cells)
    for cell in cells:
        for rel, data in render(cell).files.items():
            assert CANARY.encode() not in data, (cell.tag, rel)
        assert CANARY not in json.dumps(cell.claims())


def test_claims_name_the_index_and_hold_no_url():
    cells, _ = expand(load_matrix(ROOT / "matrix.yaml"))
    by_index = {c.claims()["index"] for c in cells}
    assert {"default", "pytorch-cpu", "pytorch-cu118"} <= by_index
    for cell in cells:
        assert "://" not in json.dumps(cell.claims()), cell.tag
