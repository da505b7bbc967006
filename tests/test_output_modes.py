"""Files esh writes take the user's umask (0644 under umask 022), never the 0600 of a
temporary file, and appear whole or not at all."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import esh

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_saliency_pngs_and_the_demo_take_the_umask(tmp_path, umask_022, monkeypatch):
    from esh.viz import saliency

    photo = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    model = esh.create_model("esh_vision_nano").eval()
    maps = saliency.alpha_maps(model, photo)
    out = saliency.render_saliency(maps["image"], maps, tmp_path / "heat.png")
    assert _mode(out) == 0o644
    monkeypatch.setattr(saliency, "demo_photos", lambda: {"noise": photo})
    (png,) = saliency.demo(tmp_path / "demo", "esh_vision_nano")
    assert _mode(png) == 0o644 and _mode(png.parent) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "heat.png"]


def test_alignment_heatmap_takes_the_umask(tmp_path, umask_022):
    from esh.align.layerwise import save_heatmap

    path = save_heatmap(np.random.default_rng(0).random((3, 4)), tmp_path / "align.png")
    assert _mode(path) == 0o644 and path.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["align.png"]


def test_benchmark_rows_are_appended_whole_with_the_umask(tmp_path, umask_022):
    from esh.bench.lm_quality import append_row

    out = tmp_path / "rows.jsonl"
    append_row(out, {"model": "a", "loss": 1.5})
    append_row(out, {"model": "b", "loss": torch.tensor(2.0).item()})
    assert out.read_text().splitlines() == ['{"model": "a", "loss": 1.5}', '{"model": "b", "loss": 2.0}']
    assert _mode(out) == 0o644 and [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]
