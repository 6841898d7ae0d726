"""Road labels from centreline vectors, checked against SpaceNet's own rasterized mask."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from click.testing import CliRunner
from pyproj import Transformer

from geoprn.cli.main import cli
from geoprn.data import discover_pairs, load_tile
from geoprn.errors import InputError
from geoprn.labels import parse_metres, rasterize_roads
from tests.conftest import SHARED_DATA

SPACENET = SHARED_DATA / "spacenet"
VEGAS = SPACENET / "solaris_road_image.tif"
VEGAS_ROADS = SPACENET / "solaris_road_image_roads.geojson"
PARIS_ROADS = SPACENET / "paris_img1447_osm_roads.geojson"
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "paris_img1447.tif"

pytestmark = pytest.mark.skipif(not SPACENET.is_dir(), reason="real data not found")


def burn(vectors: Path, scene: Path, width: float) -> np.ndarray:
    with rasterio.open(scene) as ds:
        return rasterize_roads(vectors, ds.shape, ds.transform, ds.crs, width).astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize(("text", "metres"), [("4m", 4.0), ("2.5 m", 2.5), ("6", 6.0)])
def test_parse_metres(text, metres):
    assert parse_metres(text) == metres


@pytest.mark.parametrize("text", ["0m", "-3m", "4ft", "wide"])
def test_parse_metres_refuses(text):
    with pytest.raises(InputError, match="positive length in metres"):
        parse_metres(text)


def test_matches_spacenets_own_mask_at_its_width():
    """SpaceNet burnt these Las Vegas centrelines (EPSG:4326, 0.27 m pixels) into a mask;
    ours agrees with it at 4 m and gets worse at any other width."""
    with rasterio.open(SPACENET / "solaris_road_image_mask.tif") as ds:
        reference = ds.read(1) > 0
    scores = {w: iou(burn(VEGAS_ROADS, VEGAS, w), reference) for w in (2.0, 3.0, 4.0, 5.0, 8.0)}
    assert scores[4.0] > 0.93
    assert max(scores, key=scores.get) == 4.0


def test_reprojected_vectors_burn_the_same_roads(tmp_path):
    """The Paris centrelines in Web Mercator give the mask they give in CRS84."""
    meta, _, wkb, _ = pyogrio.raw.read(PARIS_ROADS)
    lines = shapely.force_2d(shapely.from_wkb(wkb))
    to_mercator = Transformer.from_crs(meta["crs"], "EPSG:3857", always_xy=True).transform
    mercator = shapely.transform(lines, lambda xy: np.column_stack(to_mercator(*xy.T)))
    moved = tmp_path / "roads_3857.gpkg"
    pyogrio.raw.write(
        moved, shapely.to_wkb(mercator), [], [], crs="EPSG:3857", geometry_type="LineString"
    )
    original, reprojected = burn(PARIS_ROADS, SAMPLE, 6.0), burn(moved, SAMPLE, 6.0)
    assert 0.02 < original.mean() < 0.5
    assert iou(original, reprojected) > 0.97


def test_bad_vectors(tmp_path):
    polygons = tmp_path / "blocks.geojson"
    square = shapely.box(2.2835, 48.9809, 2.2837, 48.9811)
    pyogrio.raw.write(
        polygons, shapely.to_wkb([square]), [], [], crs="EPSG:4326", geometry_type="Polygon"
    )
    with pytest.raises(InputError, match="Polygons, not road centrelines"):
        burn(polygons, SAMPLE, 4.0)
    broken = tmp_path / "broken.geojson"
    broken.write_text("{not json")
    with pytest.raises(InputError, match="cannot read road vectors"):
        burn(broken, SAMPLE, 4.0)


def test_vector_labels_in_training_tiles(tmp_path):
    shutil.copy(SAMPLE, tmp_path / "paris.tif")
    shutil.copy(PARIS_ROADS, tmp_path / "paris_osm_roads.geojson")
    (pair,) = discover_pairs([tmp_path / "paris.tif"])  # the sibling vectors are found
    assert pair.label.name == "paris_osm_roads.geojson"
    tile = load_tile(pair, [1, 2, 3], road_width=6.0)
    assert tile.label.shape == (650, 650) and tile.valid.all()
    np.testing.assert_array_equal(tile.label.astype(bool), burn(PARIS_ROADS, SAMPLE, 6.0))
    (explicit,) = discover_pairs([f"{SAMPLE},{PARIS_ROADS}"])
    assert load_tile(explicit, [1, 2, 3], road_width=6.0).label.sum() == tile.label.sum()


def test_cli_refuses_a_bad_width(tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "base",
            str(SAMPLE),
            "-o",
            str(tmp_path / "m.safetensors"),
            "--road-width",
            "wide",
        ],
    )
    assert result.exit_code == 1
    assert "a road width is a positive length in metres" in result.output
