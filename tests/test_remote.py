"""Scenes read over the network: real COGs of ../shared/data served on 127.0.0.1 by an HTTP
server with byte ranges and by an S3-protocol server (moto), read by GDAL's virtual file
systems; outputs as a local run's, and a scene changed on the server is noticed."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from geoprn.cli.main import cli
from geoprn.errors import InputError, OutputError
from geoprn.pipeline import refine
from geoprn.remote import aws_endpoint_settings, read_settings, remote_version
from tests.conftest import SAMPLE_SCENE, imagery_pixels, write_raster
from tests.servers import http_server, put_objects, s3_server, to_cog


@pytest.fixture(scope="module")
def cogs(tmp_path_factory) -> dict[str, Path]:
    """Real scenes as COGs: the Paris sample (256 px tiles) and a Massachusetts crop (512)."""
    root = tmp_path_factory.mktemp("cogs")
    mass = write_raster(root / "mass.tif", imagery_pixels(700, 900))
    return {
        "paris": to_cog(SAMPLE_SCENE, root / "www" / "paris.tif", 256),
        "mass": to_cog(mass, root / "www" / "mass.tif", 512),
        "other": to_cog(
            write_raster(root / "src.tif", imagery_pixels(900, 900)[:, 200:, :].copy()),
            root / "other.tif",
            512,
        ),
    }


def _outputs(outdir: Path, stem: str) -> dict[str, np.ndarray]:
    import rasterio

    store = zarr.open_group(outdir / f"{stem}.zarr", mode="r")
    with rasterio.open(outdir / f"{stem}_mask.tif") as ds:
        return {"base": store["base"][:], "mask": ds.read(1), "crs": ds.crs, "at": ds.transform}


def _same(a: dict, b: dict) -> None:
    assert np.nanstd(a["base"]) > 1e-3  # a real image's map, not a blank one
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _signature(outdir: Path, stem: str) -> dict:
    return json.loads((outdir / f".{stem}.geoprn" / "signature.json").read_text())


def test_gdal_settings_for_remote_reads(monkeypatch):
    """Remote reads get GDAL's settings unless the user set them; AWS_ENDPOINT_URL becomes
    GDAL's own endpoint settings; a local file gets none (no side-car files hidden)."""
    monkeypatch.delenv("GDAL_HTTP_MAX_RETRY", raising=False)
    monkeypatch.setenv("GDAL_HTTP_TIMEOUT", "5")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000/")
    for key in ("AWS_S3_ENDPOINT", "AWS_HTTPS", "AWS_VIRTUAL_HOSTING", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    settings = read_settings("s3://bucket/scene.tif")
    assert settings["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR"
    assert settings["GDAL_HTTP_MAX_RETRY"] == "5" and "GDAL_HTTP_TIMEOUT" not in settings
    assert settings["AWS_S3_ENDPOINT"] == "127.0.0.1:9000"
    assert settings["AWS_HTTPS"] == "NO" and settings["AWS_VIRTUAL_HOSTING"] == "FALSE"
    assert read_settings("/data/scene.tif") == {}
    assert read_settings("/vsicurl/https://example.org/a.tif")["VSI_CACHE"] == "TRUE"
    assert aws_endpoint_settings({"AWS_ENDPOINT_URL": "https://minio.example:9443"}) == {
        "AWS_S3_ENDPOINT": "minio.example:9443", "AWS_HTTPS": "YES", "AWS_VIRTUAL_HOSTING": "FALSE",
    }  # fmt: skip
    kept = {"AWS_ENDPOINT_URL": "http://h:1", "AWS_VIRTUAL_HOSTING": "TRUE"}
    assert "AWS_VIRTUAL_HOSTING" not in aws_endpoint_settings(kept)


def test_a_scene_over_http_is_read_in_ranges_and_matches_a_local_run(cogs, models, tmp_path):
    """``refine https://...`` (and its ``/vsicurl/`` form) reads the COG in byte ranges and
    writes what a run on the local file writes; a change on the server is noticed."""
    served = tmp_path / "www"
    served.mkdir()
    scene = Path(shutil.copy(cogs["mass"], served / "mass.tif"))
    local = tmp_path / "local"
    refine(cogs["mass"], local, base=models["base"], use_prn=False, use_bpr=False)
    with http_server(served) as (url, requests):
        out = tmp_path / "http"
        record = refine(f"{url}/mass.tif", out, base=models["base"], use_prn=False, use_bpr=False)
        assert record.blocks["computed"] == 1
        _same(_outputs(out, "mass"), _outputs(local, "mass"))
        gets = [r for r in requests if r.startswith("GET")]
        assert gets and all("bytes=" in r for r in gets), requests  # never the whole file
        signature = _signature(out, "mass")
        assert signature["scene"] == f"{url}/mass.tif" and signature["scene_etag"]

        vsi = tmp_path / "vsi"
        refine(f"/vsicurl/{url}/mass.tif", vsi, base=models["base"], use_prn=False, use_bpr=False)
        _same(_outputs(vsi, "mass"), _outputs(local, "mass"))

        rerun = refine(f"{url}/mass.tif", out, base=models["base"], use_prn=False, use_bpr=False)
        assert rerun.blocks["resumed"] == 1 and rerun.blocks["computed"] == 0
        scene.unlink()
        scene.write_bytes(cogs["other"].read_bytes())  # another image under the same URL
        with pytest.raises(OutputError, match="differs in: .*scene_etag"):
            refine(f"{url}/mass.tif", out, base=models["base"], use_prn=False, use_bpr=False)

        with pytest.raises(InputError, match="not found: .*/missing.tif"):
            refine(f"{url}/missing.tif", out, base=models["base"])


def test_an_unreachable_server_is_one_line(models, tmp_path):
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    result = CliRunner().invoke(
        cli, ["refine", f"http://127.0.0.1:{port}/a.tif", "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "cannot reach http://127.0.0.1" in result.output


def test_scenes_on_an_s3_server(cogs, models, tmp_path):
    """Scenes on an S3-protocol server, found through AWS_ENDPOINT_URL and the AWS
    credentials of the environment alone: ``s3://`` and ``/vsis3/`` read as the local file;
    a batch mixing S3, HTTP and local scenes, with a missing object, fails only that one; an
    object replaced on the server is noticed."""
    local = tmp_path / "local"
    for name in ("paris", "mass"):
        refine(cogs[name], local, base=models["base"], use_prn=False, use_bpr=False)
    with s3_server(tmp_path) as endpoint, http_server(cogs["paris"].parent) as (url, _):
        put_objects(endpoint, "scenes", {"a/mass.tif": cogs["mass"], "b/paris.tif": cogs["paris"]})
        version = remote_version("s3://scenes/a/mass.tif")
        assert version["scene_bytes"] == cogs["mass"].stat().st_size and version["scene_etag"]

        out = tmp_path / "s3"
        refine("s3://scenes/a/mass.tif", out, base=models["base"], use_prn=False, use_bpr=False)
        _same(_outputs(out, "mass"), _outputs(local, "mass"))
        vsi = tmp_path / "vsis3"
        refine("/vsis3/scenes/a/mass.tif", vsi, base=models["base"], use_prn=False, use_bpr=False)
        _same(_outputs(vsi, "mass"), _outputs(local, "mass"))

        listing = tmp_path / "scenes.txt"
        listing.write_text(
            f"s3://scenes/b/paris.tif\ns3://scenes/a/gone.tif\n{url}/mass.tif\n{cogs['other']}\n"
        )
        batch = tmp_path / "batch"
        result = CliRunner().invoke(
            cli,
            ["refine", "--scenes", str(listing), "-o", str(batch), "--base", str(models["base"]),
             "--refiner", "none"],
        )  # fmt: skip
        assert result.exit_code == 1, result.output
        rows = json.loads((batch / "batch.json").read_text())["scenes"]
        assert [(r["scene"], r["status"]) for r in rows] == [
            ("paris", "done"), ("gone", "failed"), ("mass", "done"), ("other", "done"),
        ]  # fmt: skip
        assert "not found: s3://scenes/a/gone.tif" in rows[1]["reason"]
        for name in ("paris", "mass"):
            _same(_outputs(batch, name), _outputs(local, name))

        put_objects(endpoint, "scenes", {"a/mass.tif": cogs["other"]})
        with pytest.raises(OutputError, match="differs in: .*scene_etag"):
            refine("s3://scenes/a/mass.tif", out, base=models["base"], use_prn=False, use_bpr=False)
