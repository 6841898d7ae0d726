"""The HTML report: self-contained, the metrics table's values, per-block IoU, and panels
that decode as PNGs of the blocks' size (a refine store with base and refined written by
geoprn.store from a real label mask, perturbed)."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import rasterio
from PIL import Image
from scipy import ndimage

from geoprn import store
from geoprn.evaluate import Settings, evaluate, results_table
from geoprn.evaluate_inputs import open_labels, open_prediction
from geoprn.raster import open_scene
from geoprn.report import PANEL_SIDE, pick_blocks, render
from geoprn.tiling import Block
from tests.conftest import SHARED_DATA, massachusetts_pixels, write_raster

MASK = SHARED_DATA / "massachusetts" / "test" / "masks" / "10078735_15.png"


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    """Base = the real mask eroded (roads too thin), refined = the mask shifted 2 px."""
    root = tmp_path_factory.mktemp("report")
    with rasterio.open(MASK) as src:
        truth = src.read(1, window=((0, 600), (0, 500))) > 127
    scene = open_scene(write_raster(root / "scene.tif", massachusetts_pixels(600, 500)))
    labels = write_raster(root / "labels.tif", truth.astype(np.uint8)[None])
    paths = store.OutputPaths(root / "out", "scene")
    paths.outdir.mkdir()
    store.create(paths, scene, ["base", "refined"], {})
    base = ndimage.binary_erosion(truth, iterations=2).astype(np.float32) * 0.9
    refined = np.roll(truth, 2, axis=0).astype(np.float32) * 0.9
    store.write_block(paths, Block(0, 0, (0, 600), (0, 500)), {"base": base, "refined": refined})
    prediction = open_prediction(paths.outdir)
    prediction.image = scene.path
    settings = Settings(block_size=200)
    ev = evaluate(prediction, open_labels(labels, prediction.grid), settings)
    return ev, render([ev], settings)


def _images(text: str) -> list[Image.Image]:
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    return [Image.open(io.BytesIO(base64.b64decode(u))) for u in uris]


def test_report_holds_the_metrics_table(evaluation):
    ev, text = evaluation
    assert "http" not in text.replace("http-equiv", "")  # nothing fetched from anywhere
    records = results_table([ev])
    assert [r["model"] for r in records] == ["base", "refined"]
    for record in records:
        for name in ("road_iou", "miou", "mba", "completeness", "correctness", "apls"):
            assert f">{100 * record[name]:.2f}</td>" in text
    assert "completeness" in text and "APLS" in text and "mBA" in text


def test_report_per_block_iou_and_panels(evaluation):
    ev, text = evaluation
    assert len(ev.blocks) == 9  # 600 x 500 in blocks of at most 200 px
    for i, block in enumerate(ev.blocks):
        assert f">{block.key}</td>" in text
        conf = ev.block_confusion["refined"][i]
        if conf.tp + conf.fn + conf.fp:
            assert f"<td>{100 * conf.road_iou:.2f}</td>" in text
    worst, best = pick_blocks(ev, 2)
    assert len(worst) == len(best) == 2 and not set(worst) & set(best)
    images = _images(text)
    assert all(image.format == "PNG" for image in images)
    # 2 block maps, then 4 blocks x 6 panels (image, 2 probabilities, lines, 2 error maps).
    assert len(images) == 2 + 4 * 6
    for k, index in enumerate(worst + best):
        block = ev.blocks[index]
        size = (block.cols[1] - block.cols[0], block.rows[1] - block.rows[0])
        assert max(size) <= PANEL_SIDE
        panels = images[2 + 6 * k : 8 + 6 * k]
        assert {p.size for p in panels} == {size}
        assert all(p.mode == "RGB" for p in panels)
    # An error map shows false positives in red and false negatives in blue.
    errors = np.asarray(images[2 + 4])
    assert ((errors == [255, 70, 40]).all(-1)).any() or ((errors == [40, 150, 255]).all(-1)).any()
