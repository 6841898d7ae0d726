"""``geoprn evaluate``: block-by-block pixel metrics equal whole-scene ones and an independent
Boundary IoU (real Massachusetts masks, perturbed as predictions), nodata, inputs, outputs,
and the command end to end on the sample scene."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from scipy import ndimage
from skimage.morphology import disk

from geoprn import metrics
from geoprn.cli.main import cli
from geoprn.errors import InputError
from geoprn.evaluate import Settings, evaluate, format_table, results_table
from geoprn.evaluate_inputs import Grid, open_labels, open_prediction
from tests.conftest import SAMPLE_SCENE, SHARED_DATA, write_raster
from tests.test_cli import assert_one_line_error

MASK = SHARED_DATA / "massachusetts" / "test" / "masks" / "10078735_15.png"
OSM = SHARED_DATA / "spacenet" / "paris_img1447_osm_roads.geojson"


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict:
    """A 400 x 360 crop of a real label mask; a prediction made from it (dilated, shifted,
    a road erased), a nodata stripe in the labels; as GeoTIFFs on one UTM grid."""
    root = tmp_path_factory.mktemp("evaluate")
    with rasterio.open(MASK) as src:
        truth = src.read(1, window=((300, 700), (500, 860))) > 127
    pred = np.roll(ndimage.binary_dilation(truth, iterations=2), 3, axis=1)
    pred[:, 200:230] = False
    label = truth.astype(np.uint8)
    label[:40, :] = 9  # nodata
    probs = np.where(pred, 0.8, 0.1).astype(np.float32)
    probs[350:, :50] = np.nan
    return {
        "truth": truth & (label != 9),
        "pred": pred,
        "valid": (label != 9) & ~np.isnan(probs),
        "labels": write_raster(root / "labels.tif", label[None], nodata=9),
        "probs": write_raster(root / "probs.tif", probs[None], nodata=float("nan")),
        "mask": write_raster(
            root / "mask.tif",
            np.where(np.isnan(probs), 255, pred).astype(np.uint8)[None],
            nodata=255,
        ),
        "root": root,
    }


def _independent_mba(pred, truth, valid, d=15) -> float:
    """Boundary IoU by erosion with a disk (the border is not a contour), both classes."""

    def band(mask):
        return mask & ~ndimage.binary_erosion(mask, disk(d), border_value=1)

    scores = []
    for p, t in ((pred, truth), (~pred, ~truth)):
        bp, bt = band(p) & valid, band(t) & valid
        scores.append((bp & bt).sum() / (bp | bt).sum())
    return float(np.mean(scores))


@pytest.mark.parametrize("source", ["probs", "mask"])
def test_pixel_metrics_block_by_block_are_exact(real, source):
    prediction = open_prediction(real[source])
    labels = open_labels(real["labels"], prediction.grid)
    whole_c, whole_b = metrics.evaluate(real["pred"], real["truth"], real["valid"])
    for block in (64, 150, 512):
        row = evaluate(prediction, labels, Settings(block_size=block, chip_m=200)).rows[0]
        assert row.confusion == whole_c and row.boundary == whole_b
    assert row.metrics()["mba"] == pytest.approx(
        _independent_mba(real["pred"], real["truth"], real["valid"]), abs=1e-12
    )
    tp = (real["pred"] & real["truth"] & real["valid"]).sum()
    union = ((real["pred"] | real["truth"]) & real["valid"]).sum()
    assert row.metrics()["road_iou"] == pytest.approx(tp / union)
    assert prediction.variables == ["probability" if source == "probs" else "mask"]


def test_network_metrics_of_labels_against_themselves(real):
    prediction = open_prediction(real["labels"])  # the label raster as a 0/1 mask (9 nodata)
    labels = open_labels(real["labels"], prediction.grid)
    row = evaluate(prediction, labels, Settings(chip_m=200)).rows[0]
    scores = row.metrics()
    assert scores["road_iou"] == 1.0 and scores["mba"] == 1.0
    assert scores["completeness"] == scores["correctness"] == 1.0
    assert scores["apls"] == pytest.approx(1.0)
    assert row.lengths.reference > 500  # metres of real roads


def test_perturbed_prediction_scores_between(real):
    prediction = open_prediction(real["probs"])
    scored = evaluate(prediction, open_labels(real["labels"], prediction.grid))
    scores = scored.rows[0].metrics()
    assert 0.3 < scores["road_iou"] < 0.9
    assert 0.5 < scores["completeness"] < 1 and 0.5 < scores["correctness"] <= 1
    assert 0 < scores["apls"] < 1  # the erased road breaks routes
    table = format_table(results_table([scored]))
    assert f"{100 * scores['road_iou']:.2f}" in table and "APLS %" in table
    assert " 0.50 " in table  # a plain raster records no cut-off


def test_uint8_probabilities_are_scaled(real):
    path = write_raster(real["root"] / "p8.tif", (real["pred"] * 200).astype(np.uint8)[None])
    prediction = open_prediction(path)
    assert prediction.variables == ["probability"] and prediction.scale == 255.0
    assert np.nanmax(prediction.read("probability", (0, 50), (0, 50))) <= 1


def test_vector_labels_are_burnt_block_by_block():
    from geoprn.labels import rasterize_roads

    with rasterio.open(SAMPLE_SCENE) as ds:
        grid = Grid(ds.height, ds.width, ds.transform, ds.crs)
    labels = open_labels(OSM, grid, road_width=4)
    whole = rasterize_roads(OSM, grid.shape, grid.transform, grid.crs, 4).astype(bool)
    road, valid = labels.read((100, 300), (250, 650))
    assert valid.all() and np.array_equal(road, whole[100:300, 250:650])


def test_bad_inputs(real, tmp_path):
    with pytest.raises(InputError, match="file not found"):
        open_prediction(tmp_path / "missing")
    with pytest.raises(InputError, match="no .zarr store"):
        open_prediction(tmp_path)
    other = write_raster(tmp_path / "other.tif", np.zeros((1, 100, 100), np.uint8))
    prediction = open_prediction(real["probs"])
    with pytest.raises(InputError, match="not on the prediction's grid"):
        open_labels(other, prediction.grid)
    plain = write_raster(tmp_path / "plain.tif", np.zeros((1, 64, 64), np.float32), crs=None)
    with pytest.warns(UserWarning):
        no_crs = open_prediction(plain)
    with pytest.raises(InputError, match="georeferenced"):
        open_labels(OSM, no_crs.grid)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.slow
def test_evaluate_command_end_to_end(tmp_path):
    out = tmp_path / "out"
    assert run("refine", SAMPLE_SCENE, "-o", out, "--no-prn", "--device", "cpu").exit_code == 0
    files = [tmp_path / f"r.{ext}" for ext in ("csv", "json", "html")]
    args = ["evaluate", out, "--labels", OSM, "--csv", files[0], "--json", files[1]]
    result = run(*args, "--report", files[2])
    assert result.exit_code == 0, result.output
    document = json.loads(files[1].read_text())
    (record,) = document["results"]
    assert record["model"] == "base" and document["settings"]["buffer_m"] == 5.0
    assert f"{100 * record['road_iou']:.2f}" in result.stdout
    assert all(0 <= record[k] <= 1 for k in ("road_iou", "mba", "completeness", "apls"))
    with files[0].open() as f:
        (row,) = list(csv.DictReader(f))
    assert math.isclose(float(row["quality"]), record["quality"])
    assert "data:image/png;base64," in files[2].read_text()
    assert_one_line_error(run(*args), "exists; use --overwrite")
    assert run(*args, "--overwrite").exit_code == 0


@pytest.mark.slow
def test_a_refine_folder_is_scored_at_the_cut_off_its_mask_was_made_with(tmp_path):
    """`refine --threshold 0.3`, then `evaluate` of its folder: the row of the variable the
    mask came from is cut at 0.3 by default, so its pixel metrics are those of the mask
    GeoTIFF itself; `--threshold` overrides it; a run record whose cut-off is no number in
    [0, 1) is one line."""
    out = tmp_path / "out"
    made = run("refine", SAMPLE_SCENE, "-o", out, "--no-prn", "--device", "cpu",
               "--threshold", "0.3")  # fmt: skip
    assert made.exit_code == 0, made.output
    labels = open_labels(OSM, open_prediction(out).grid)
    folder = evaluate(open_prediction(out), labels).rows
    mask = evaluate(open_prediction(out / "paris_img1447_mask.tif"), labels).rows
    fixed = evaluate(open_prediction(out), labels, Settings(threshold=0.5)).rows
    assert [r.threshold for r in folder] == [0.3] and fixed[0].threshold == 0.5
    assert folder[0].confusion == mask[0].confusion and folder[0].boundary == mask[0].boundary
    assert fixed[0].confusion != folder[0].confusion
    printed = run("evaluate", out, "--labels", OSM)
    assert printed.exit_code == 0 and "cut-off" in printed.stdout and " 0.30 " in printed.stdout
    record = out / "paris_img1447_run.json"
    document = json.loads(record.read_text())
    document["inputs"]["threshold"] = "high"
    record.write_text(json.dumps(document))
    assert_one_line_error(run("evaluate", out, "--labels", OSM), "is no cut-off in [0, 1)")
    record.write_text("{not json")
    assert_one_line_error(run("evaluate", out, "--labels", OSM), "is not a run record")


def test_command_errors(real, tmp_path):
    assert_one_line_error(
        run("evaluate", tmp_path / "nope.tif", "--labels", real["labels"]), "file not found"
    )
    assert_one_line_error(
        run("evaluate", real["probs"], "--labels", real["labels"], "--buffer", "-3m"), "--buffer"
    )
    for threshold in ("1", "-0.2", "nan"):
        assert_one_line_error(
            run("evaluate", real["probs"], "--labels", real["labels"], "--threshold", threshold),
            "--threshold must lie in [0, 1)",
        )
    other = write_raster(tmp_path / "small.tif", np.zeros((1, 64, 64), np.uint8))
    assert_one_line_error(
        run("evaluate", real["probs"], "--labels", other), "not on the prediction's grid"
    )
