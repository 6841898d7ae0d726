"""Road centrelines: geometry on hand-made masks, block-size invariance on real road masks,
files GIS opens, and the ``vectorize`` / ``refine --vectors`` commands."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from click.testing import CliRunner
from rasterio.transform import from_origin
from skimage.draw import disk, line

from geoprn.cli.main import cli
from geoprn.errors import InputError, OutputError
from geoprn.vectorize import RoadNetwork, extract_roads, roads_from_array, write_roads
from tests.conftest import SAMPLE_SCENE, SHARED_DATA, write_raster

MASSACHUSETTS_MASKS = SHARED_DATA / "massachusetts" / "test" / "masks"


def road(shape: tuple[int, int], segments, width: int = 5) -> np.ndarray:
    """A mask of straight roads ``width`` px wide between (row, col) end points."""
    mask = np.zeros(shape, bool)
    for (r0, c0), (r1, c1) in segments:
        rr, cc = line(r0, c0, r1, c1)
        for r, c in zip(rr, cc, strict=True):
            mask[disk((r, c), width / 2, shape=shape)] = True
    return mask


def real_mask(name: str = "17278960_15.png") -> np.ndarray:
    with rasterio.open(MASSACHUSETTS_MASKS / name) as src:
        return src.read(1) > 127


def topology(network: RoadNetwork) -> Counter:
    """How many line ends meet at each end point: the degree histogram of the graph."""
    ends = Counter()
    for geom in network.lines:
        coords = np.asarray(geom.coords)
        for point in (coords[0], coords[-1]):
            ends[tuple(np.round(point, 3))] += 1
    return Counter(ends.values())


def test_a_straight_road_is_one_line_along_its_centre():
    mask = road((60, 300), [((30, 20), (30, 279))], width=7)
    network = roads_from_array(mask, min_length_m=0)
    assert len(network.lines) == 1
    coords = np.asarray(network.lines[0].coords)
    np.testing.assert_allclose(coords[:, 1], 30.5, atol=0.6)  # pixel centres: row 30 -> y 30.5
    assert network.length_m[0] == pytest.approx(259, abs=8)  # thinning shortens the ends a bit


def test_a_crossing_is_four_lines_meeting_at_one_junction():
    mask = road((201, 201), [((100, 10), (100, 190)), ((10, 100), (190, 100))])
    network = roads_from_array(mask, min_length_m=0)
    assert len(network.lines) == 4
    assert topology(network) == Counter({1: 4, 4: 1})
    junction = Counter(
        tuple(np.round(c, 3)) for g in network.lines for c in np.asarray(g.coords)[[0, -1]]
    ).most_common(1)[0][0]
    np.testing.assert_allclose(junction, (100.5, 100.5), atol=1.0)
    assert network.total_length_m == pytest.approx(4 * 90, rel=0.05)


def test_short_spurs_are_pruned_and_the_road_is_merged_through():
    mask = road((100, 300), [((50, 10), (50, 290)), ((50, 150), (40, 150))])
    assert len(roads_from_array(mask, min_length_m=0).lines) == 3
    pruned = roads_from_array(mask, min_length_m=12)
    assert len(pruned.lines) == 1 and pruned.total_length_m > 270


def test_small_holes_do_not_split_a_road_into_a_loop():
    mask = road((60, 300), [((30, 20), (30, 279))], width=11)
    mask[29:32, 100:103] = False
    network = roads_from_array(mask, min_length_m=0)
    assert len(network.lines) == 1
    assert network.lines[0].coords[0] != network.lines[0].coords[-1]


@pytest.mark.parametrize("block_size", [128, 200])
def test_a_ring_cut_by_blocks_is_one_closed_line(block_size):
    mask = np.zeros((300, 300), bool)
    mask[disk((150, 150), 100)] = True
    mask[disk((150, 150), 94)] = False
    whole = roads_from_array(mask)
    cut = roads_from_array(mask, block_size=block_size)
    assert len(whole.lines) == len(cut.lines) == 1 and cut.lines[0].is_ring
    assert cut.total_length_m == pytest.approx(whole.total_length_m, rel=1e-3)
    assert cut.total_length_m == pytest.approx(2 * np.pi * 97, rel=0.03)


@pytest.mark.parametrize("name", sorted(p.name for p in MASSACHUSETTS_MASKS.glob("*.png"))[:3])
def test_real_road_networks_do_not_depend_on_the_block_size(name):
    mask = real_mask(name)
    whole = roads_from_array(mask)
    assert whole.total_length_m > 1000  # a real network, not an empty one
    for block_size in (256, 700):
        cut = roads_from_array(mask, block_size=block_size)
        assert cut.total_length_m == pytest.approx(whole.total_length_m, rel=0.005)
        assert topology(cut) == topology(whole)
        assert len(cut.lines) == len(whole.lines)


def test_lines_follow_the_labelled_roads():
    """Independent check: every centreline lies on the road mask it came from, and the
    centrelines reach every part of the mask (within half a road width)."""
    from scipy import ndimage

    mask = real_mask()
    network = roads_from_array(mask, simplify_m=0.0, min_length_m=0.0)
    drawn = np.zeros_like(mask)
    for geom in network.lines:
        xy = np.asarray(geom.coords) - 0.5
        for (x0, y0), (x1, y1) in zip(xy[:-1], xy[1:], strict=True):
            rr, cc = line(round(y0), round(x0), round(y1), round(x1))
            drawn[rr, cc] = True
    assert mask[drawn].mean() > 0.99
    covered = ndimage.distance_transform_edt(~drawn) <= 6
    assert covered[mask].mean() > 0.97


def test_lengths_are_metres_in_a_geographic_crs():
    degrees = 1e-5  # about 1.1 m east-west at 0 deg latitude
    transform = from_origin(0.0, 0.001, degrees, degrees)
    mask = road((60, 400), [((30, 20), (30, 379))], width=7)
    network = roads_from_array(mask, transform, rasterio.crs.CRS.from_epsg(4326))
    expected = 359 * degrees * 111_320
    assert network.length_m[0] == pytest.approx(expected, rel=0.03)
    x, y = np.asarray(network.lines[0].coords).T
    assert (x > 0).all() and (x < 400 * degrees).all() and np.allclose(y, 0.001 - 30.5 * degrees)


def test_no_pixel_or_node_limits_on_long_scenes():
    """A road of 70,000 pixels across many blocks: one line, as long as the road."""
    mask = np.zeros((16, 70_000), bool)
    mask[6:11, :] = True
    network = roads_from_array(mask, block_size=8192)
    assert len(network.lines) == 1
    assert network.length_m[0] == pytest.approx(70_000, rel=1e-3)


@pytest.fixture
def mask_tif(tmp_path) -> Path:
    """A real road mask as a COG-like GeoTIFF (UTM grid, 255 = nodata in one corner)."""
    mask = real_mask().astype(np.uint8)
    mask[:100, :100] = 255
    return write_raster(tmp_path / "mask.tif", mask[None], nodata=255)


def test_extract_roads_from_a_file_matches_the_array(mask_tif):
    with rasterio.open(mask_tif) as ds:
        data, transform, crs = ds.read(1), ds.transform, ds.crs
    in_memory = roads_from_array((data == 1), transform, crs)
    from_file = extract_roads(mask_tif, block_size=512)
    assert from_file.road_id == in_memory.road_id
    assert from_file.total_length_m == pytest.approx(in_memory.total_length_m, rel=1e-9)
    assert np.isnan(from_file.mean_probability).all()  # a mask carries no probabilities


@pytest.mark.parametrize("suffix", [".gpkg", ".fgb"])  # GeoJSON: tests/test_gis_outputs.py
def test_roads_files_open_with_their_crs_and_attributes(mask_tif, tmp_path, suffix):
    network = extract_roads(mask_tif)
    path = write_roads(network, tmp_path / f"roads{suffix}")
    info = pyogrio.read_info(path)
    assert info["features"] == len(network.lines) > 10
    assert info["geometry_type"] == "LineString"
    assert rasterio.crs.CRS.from_user_input(info["crs"]) == rasterio.crs.CRS.from_epsg(26919)
    _, _, wkb, (ids, lengths, _) = pyogrio.raw.read(path)
    written = dict(zip(ids, zip(lengths, shapely.from_wkb(wkb), strict=True), strict=True))
    assert sorted(written) == network.road_id  # FlatGeobuf orders features by its index
    for road_id, length, geom in zip(network.road_id, network.length_m, network.lines, strict=True):
        assert written[road_id][0] == pytest.approx(length)
        assert written[road_id][1].equals_exact(geom, 1e-6)
    with pytest.raises(OutputError, match="exists"):
        write_roads(network, path)


def test_no_roads_writes_a_valid_empty_layer(tmp_path):
    empty = write_raster(tmp_path / "empty.tif", np.zeros((1, 64, 64), np.uint8))
    network = extract_roads(empty)
    path = write_roads(network, tmp_path / "none.gpkg")
    info = pyogrio.read_info(path)
    assert info["features"] == 0 and info["crs"] == "EPSG:26919"


def test_a_mask_without_crs_is_refused(tmp_path):
    plain = write_raster(tmp_path / "plain.tif", np.ones((1, 64, 64), np.uint8), crs=None)
    with pytest.raises(InputError, match="no CRS"):
        extract_roads(plain)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_vectorize_command_and_its_errors(mask_tif, tmp_path):
    out = tmp_path / "roads.gpkg"
    result = invoke("vectorize", mask_tif, "-o", out, "--simplify", "2m", "--min-length", "0")
    assert result.exit_code == 0, result.output
    assert "roads" in result.stdout and out.is_file()
    before = out.read_bytes()
    for args, message in [
        ((mask_tif, "-o", out), "exists; use --overwrite"),
        ((mask_tif, "-o", tmp_path / "roads.shp"), "write roads as"),
        ((tmp_path / "missing.tif", "-o", tmp_path / "x.gpkg"), "file not found"),
        ((mask_tif, "-o", tmp_path / "y.gpkg", "--simplify", "2ft"), "length in metres"),
        ((mask_tif, "-o", tmp_path / "z.gpkg", "--threshold", "1.5"), "must lie in [0, 1)"),
    ]:
        result = invoke("vectorize", *args)
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output and "geoprn: error:" in result.stderr
        assert message in result.stderr, result.stderr
    assert out.read_bytes() == before  # the refused run left the existing file alone


@pytest.mark.slow
def test_refine_writes_road_vectors_from_its_store(tmp_path):
    """`refine --vectors` at a cut-off of 0.3: lines of its mask, in the scene's CRS; and
    `vectorize` of its store finds the same lines by default (the recorded cut-off)."""
    outdir = tmp_path / "out"
    result = invoke("refine", SAMPLE_SCENE, "-o", outdir, "--no-prn", "--device", "cpu",
                    "--vectors", "--threshold", "0.3")  # fmt: skip
    assert result.exit_code == 0, result.output
    path = outdir / "paris_img1447_roads.gpkg"
    assert f"roads: {path}" in result.stdout
    info = pyogrio.read_info(path)
    with rasterio.open(SAMPLE_SCENE) as scene:
        assert rasterio.crs.CRS.from_user_input(info["crs"]) == scene.crs
        left, bottom, right, top = scene.bounds
    x0, y0, x1, y1 = info["total_bounds"]
    assert info["features"] > 0 and left <= x0 < x1 <= right and bottom <= y0 < y1 <= top
    _, _, _, (_, _, probability) = pyogrio.raw.read(path)
    assert (probability > 0.3).all() and (probability <= 1).all()
    same = extract_roads(outdir / "paris_img1447.zarr")  # its mask's variable: base here
    assert same.road_id == list(pyogrio.raw.read(path)[3][0])
    again = tmp_path / "again.gpkg"
    assert invoke("vectorize", outdir / "paris_img1447.zarr", "-o", again).exit_code == 0
    assert list(pyogrio.raw.read(again)[3][0]) == same.road_id
    asked = invoke("vectorize", outdir / "paris_img1447.zarr", "--variable", "refined",
                   "-o", tmp_path / "refined.gpkg")  # fmt: skip
    assert asked.exit_code == 1 and "has no variable 'refined' (it has base)" in asked.stderr
    at_half = extract_roads(outdir / "paris_img1447.zarr", variable="base", threshold=0.5)
    assert at_half.road_id != same.road_id
