"""Outputs as GIS clients read them: GDAL's Zarr attributes (old drivers included), CF
coordinates, no made-up georeferencing, GeoPackage version, GeoJSON as RFC 7946."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import rioxarray  # noqa: F401
import shapely
import xarray as xr
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.warp import transform_geom

from geoprn import refine, store
from geoprn.raster import open_scene
from geoprn.vectorize import extract_roads, write_roads
from tests.conftest import SAMPLE_SCENE, massachusetts_pixels, write_raster
from tests.test_vectorize import real_mask

UTM = CRS.from_epsg(26919)


def zarr_attrs(store_path: Path, key: str) -> dict:
    """Attributes of one node as GDAL reads them by default: from consolidated metadata."""
    return json.loads((store_path / ".zmetadata").read_text())["metadata"][f"{key}/.zattrs"]


def gdal_view(
    store_path: Path, variable: str = "refined"
) -> tuple[CRS | None, tuple[float, ...], bool]:
    """(CRS, geotransform, whether GDAL found one) of a variable of the store in GDAL."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NotGeoreferencedWarning)
        with rasterio.open(f'ZARR:"{store_path}":/{variable}') as ds:
            crs, transform = ds.crs, tuple(ds.read_transform())
    missing = any(issubclass(w.category, NotGeoreferencedWarning) for w in caught)
    return crs, transform, not missing


@pytest.fixture(scope="module")
def utm_store(tmp_path_factory) -> Path:
    """The empty store ``refine`` creates for a real UTM scene."""
    root = tmp_path_factory.mktemp("utm")
    scene = write_raster(root / "mass.tif", massachusetts_pixels(300, 400))
    paths = store.OutputPaths(root / "out", "mass")
    paths.outdir.mkdir()
    store.create(paths, open_scene(scene), ["base", "refined"], {})
    return paths.zarr


def test_zarr_crs_is_also_in_the_attribute_older_gdal_reads(utm_store, tmp_path):
    crs_attr = zarr_attrs(utm_store, "refined")["_CRS"]
    assert CRS.from_wkt(crs_attr["wkt"]) == UTM
    assert CRS.from_user_input(json.dumps(crs_attr["projjson"])) == UTM
    assert crs_attr["url"] == "http://www.opengis.net/def/crs/EPSG/0/26919"
    # GDAL before 3.9 sees only _CRS: strip the CF grid mapping, GDAL still finds the CRS.
    stripped = shutil.copytree(utm_store, tmp_path / "stripped.zarr")
    metadata = json.loads((stripped / ".zmetadata").read_text())
    nodes = metadata["metadata"]
    refined = nodes["refined/.zattrs"]
    del refined["grid_mapping"], refined["coordinates"]
    del nodes["spatial_ref/.zattrs"], nodes["spatial_ref/.zarray"]
    (stripped / ".zmetadata").write_text(json.dumps(metadata))
    (stripped / "refined" / ".zattrs").write_text(json.dumps(refined))
    shutil.rmtree(stripped / "spatial_ref")
    crs, transform, found = gdal_view(stripped)
    assert crs == UTM and found and transform == (300_000.0, 1.0, 0.0, 4_700_000.0, 0.0, -1.0)


GDALINFO = shutil.which("gdalinfo")


@pytest.mark.skipif(GDALINFO is None, reason="no gdalinfo (Debian: apt-get install gdal-bin)")
def test_system_gdal_sees_the_zarr_crs(utm_store):
    """Whatever GDAL the system has (Debian 12's is 3.6, which reads only ``_CRS``)."""
    out = subprocess.run(
        [GDALINFO, "-json", f'ZARR:"{utm_store}":/refined'], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert CRS.from_wkt(info["coordinateSystem"]["wkt"]) == UTM
    assert info["geoTransform"] == [300_000.0, 1.0, 0.0, 4_700_000.0, 0.0, -1.0]


def test_zarr_coordinates_carry_cf_attributes(utm_store, tmp_path):
    for axis in ("x", "y"):
        attrs = zarr_attrs(utm_store, axis)
        assert attrs["units"] == "metre" and attrs["axis"] == axis.upper()
        assert attrs["standard_name"] == f"projection_{axis}_coordinate"
    paths = store.OutputPaths(tmp_path, "paris")  # a geographic scene: EPSG:4326
    store.create(paths, open_scene(SAMPLE_SCENE), ["refined"], {})
    x, y = zarr_attrs(paths.zarr, "x"), zarr_attrs(paths.zarr, "y")
    assert (x["standard_name"], x["units"], x["axis"]) == ("longitude", "degrees_east", "X")
    assert (y["standard_name"], y["units"], y["axis"]) == ("latitude", "degrees_north", "Y")
    ds = xr.open_zarr(paths.zarr, decode_coords="all")
    with rasterio.open(SAMPLE_SCENE) as scene:
        assert ds.rio.crs == scene.crs and ds.rio.transform().almost_equals(scene.transform)


def test_scene_without_georeferencing_gets_none_made_up(tmp_path, models):
    scene = tmp_path / "plain.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=400, height=300, count=3,
                       dtype="uint8") as dst:  # fmt: skip
        dst.write(massachusetts_pixels(300, 400))
    with pytest.warns(UserWarning, match="no CRS"):
        refine(scene, tmp_path / "out", base=models["base"], use_prn=False, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NotGeoreferencedWarning)
        with rasterio.open(tmp_path / "out" / "plain_mask.tif") as mask:
            assert mask.crs is None and mask.shape == (300, 400)
            assert mask.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            mask.read_transform()
    assert any("no geotransform" in str(w.message) for w in caught)  # GDAL found none
    zarr_path = tmp_path / "out" / "plain.zarr"
    assert not any((zarr_path / name).exists() for name in ("x", "y", "spatial_ref"))
    assert "grid_mapping" not in zarr_attrs(zarr_path, "base")
    crs, _, found = gdal_view(zarr_path, "base")
    assert crs is None and not found
    ds = xr.open_zarr(zarr_path, decode_coords="all")
    assert ds.rio.crs is None and ds["base"].shape == (300, 400)


@pytest.fixture(scope="module")
def roads_mask(tmp_path_factory) -> Path:
    """A real road mask (0/1) on a UTM grid."""
    root = tmp_path_factory.mktemp("roads")
    return write_raster(root / "mask.tif", real_mask().astype(np.uint8)[None])


def test_geopackage_is_version_1_3(roads_mask, tmp_path):
    path = write_roads(extract_roads(roads_mask), tmp_path / "roads.gpkg")
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == 0x47504B47  # "GPKG"
        assert db.execute("PRAGMA user_version").fetchone()[0] == 10300
    assert pyogrio.read_info(path)["crs"] == "EPSG:26919"
    newer = write_roads(extract_roads(roads_mask), tmp_path / "v14.gpkg", gpkg_version="1.4")
    with sqlite3.connect(newer) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 10400


def test_geojson_is_rfc7946_and_types_every_field(roads_mask, tmp_path):
    network = extract_roads(roads_mask)
    path = write_roads(network, tmp_path / "roads.geojson")
    doc = json.loads(path.read_text())
    assert "crs" not in doc  # RFC 7946: WGS 84 longitude/latitude, no crs member
    info = pyogrio.read_info(path)
    assert CRS.from_user_input(info["crs"]) == CRS.from_epsg(4326)
    assert list(info["fields"]) == ["road_id", "length_m"]  # no all-empty (String) field
    assert info["features"] == len(network.lines) > 10
    by_id = {f["properties"]["road_id"]: f for f in doc["features"]}
    for road_id, line in zip(network.road_id, network.lines, strict=True):
        expected = shapely.geometry.shape(transform_geom(UTM, "EPSG:4326", line))
        written = shapely.geometry.shape(by_id[road_id]["geometry"])
        assert written.equals_exact(expected, 1e-6)
        assert -72 < written.coords[0][0] < -70 and 42 < written.coords[0][1] < 43
    # Probabilities: the field is there, typed Real.
    probs = write_raster(tmp_path / "probs.tif", (real_mask() * 0.9).astype(np.float32)[None])
    with_probs = write_roads(extract_roads(probs), tmp_path / "probs.geojson")
    info = pyogrio.read_info(with_probs)
    assert dict(zip(info["fields"], info["dtypes"], strict=True))["mean_probability"] == "float64"
    # Asked to, GeoJSON keeps the scene's CRS; other formats always do.
    kept = write_roads(network, tmp_path / "utm.geojson", rfc7946=False)
    assert CRS.from_user_input(pyogrio.read_info(kept)["crs"]) == UTM
