"""Validated gains: the bootstrap over places, the record in a checkpoint, `geoprn info`, and
the rule by which `refine` picks its default refiner."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from safetensors import safe_open

from geoprn.cli.main import cli
from geoprn.gain import ValidatedGain, bootstrap_gain, qualifies
from geoprn.models.checkpoint import file_sha256, read_header, record_gain

from .conftest import write_raster


def counts(rng, n: int, tp_shift: int = 0) -> np.ndarray:
    tp = rng.integers(500, 1000, n)
    return np.stack([tp + tp_shift, rng.integers(100, 400, n), rng.integers(100, 400, n)], 1)


def test_bootstrap_gain_is_paired_and_pooled():
    rng = np.random.default_rng(0)
    base = counts(rng, 40).astype(float)
    assert bootstrap_gain(base, base) == (0.0, 0.0, 0.0)
    better = base + [[50, -20, -20]]  # every place gains
    gain, lo, hi = bootstrap_gain(base, better)
    pooled = lambda c: c[:, 0].sum() / c.sum()  # noqa: E731
    assert gain == pytest.approx(100 * (pooled(better) - pooled(base)))
    assert 0 < lo < gain < hi
    # half the places gain, half lose as much: the interval holds zero
    mixed = base + np.where(np.arange(40)[:, None] % 2, [[60, 0, -60]], [[-60, 0, 60]])
    _, lo, hi = bootstrap_gain(base, mixed)
    assert lo < 0 < hi
    with pytest.raises(ValueError):
        bootstrap_gain(base, base[:3])


def gain(base_sha: str, interval=(0.4, 1.6), prn_sha=None) -> dict:
    return {
        "places": {"massachusetts test": 5, "massachusetts_crops test": 41},
        "base_sha256": base_sha,
        "prn_sha256": prn_sha,
        "base_road_iou": 60.0,
        "refined_road_iou": 61.0,
        "road_iou_gain": 1.0,
        "road_iou_interval": interval,
        "mba_gain": 0.5,
        "mba_interval": (-0.1, 1.2),
        "measured_by": "python benchmarks/prn_accuracy.py --record",
    }


def test_qualifies_only_a_positive_interval_for_the_same_base():
    sha = "a" * 64
    assert qualifies({}, sha) == (False, "no validated gain is recorded in it")
    assert qualifies({"validated_gain": gain(sha)}, sha)[0]
    assert not qualifies({"validated_gain": gain(sha)}, "b" * 64)[0]
    assert not qualifies({"validated_gain": gain(sha)}, None)[0]  # refining given probabilities
    ok, why = qualifies({"validated_gain": gain(sha, (-0.2, 1.6))}, sha)
    assert not ok and "not above zero" in why


def test_record_gain_keeps_the_weights_and_info_prints_it(models, tmp_path):
    prn = tmp_path / "prn.safetensors"
    prn.write_bytes(models["prn"].read_bytes())
    base_sha = file_sha256(models["base"])
    record_gain(prn, gain(base_sha))
    assert ValidatedGain.model_validate(read_header(prn)["validated_gain"]).positive
    with safe_open(str(models["prn"]), "pt") as a, safe_open(str(prn), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all((a.get_tensor(k) == b.get_tensor(k)).all() for k in a.keys())  # noqa: SIM118
    result = CliRunner().invoke(cli, ["info", str(prn)])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["validated_gain"]["road_iou_gain"] == 1.0  # stdout: JSON
    assert "validated gain: +1.00 road IoU (90 % interval +0.40 to +1.60)" in result.stderr
    assert "a default refiner" in result.stderr
    with pytest.raises(Exception, match="base model"):
        record_gain(models["base"], gain(base_sha))
    bad = {**gain(base_sha), "road_iou_interval": "wide"}
    with pytest.raises(ValueError):
        record_gain(prn, bad)


def test_a_malformed_record_is_one_line(models, tmp_path):
    from geoprn.models.checkpoint import read_header, rewrite_header

    prn = tmp_path / "prn.safetensors"
    header = read_header(models["prn"])
    header["validated_gain"] = {**gain("a" * 64), "road_iou_interval": "wide"}
    rewrite_header(models["prn"], header, prn)
    result = CliRunner().invoke(cli, ["info", str(prn)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "malformed validated_gain in the header: road_iou_interval" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture
def shipped(models, tmp_path, monkeypatch):
    """The test models put where refine looks for the shipped weights."""
    import geoprn.job as job

    paths = {}
    for kind in ("prn", "bpr"):
        paths[kind] = tmp_path / f"{kind}_default.safetensors"
        paths[kind].write_bytes(models[kind].read_bytes())
        monkeypatch.setattr(job, f"DEFAULT_{kind.upper()}", paths[kind])
    return paths


def test_default_refiner_rule(models, shipped, tmp_path):
    from geoprn.errors import GeoprnWarning
    from geoprn.job import ModelRef, default_refiners

    base = ModelRef.of(models["base"])
    with pytest.warns(GeoprnWarning, match="the mask comes from the base model"):
        assert default_refiners(None, None, base) == (False, False)
    assert default_refiners(models["prn"], None, base) == (True, False)  # asked for by path
    record_gain(shipped["prn"], gain(base.sha256, (-0.3, 0.9)))  # no gain: still off
    with pytest.warns(GeoprnWarning, match="not above zero"):
        assert default_refiners(None, None, base) == (False, False)
    record_gain(shipped["prn"], gain(base.sha256))
    assert default_refiners(None, None, base)[0]
    prn_sha = file_sha256(shipped["prn"])
    record_gain(shipped["bpr"], gain(base.sha256))  # measured right after the base, not PRN
    assert default_refiners(None, None, base) == (True, False)
    record_gain(shipped["bpr"], gain(base.sha256, prn_sha=prn_sha))
    assert default_refiners(None, None, base) == (True, True)
    other = ModelRef.of(models["base1"])
    with pytest.warns(GeoprnWarning, match="another base model"):
        assert default_refiners(None, None, other) == (False, False)


def test_refine_default_without_a_validated_refiner_writes_the_base_mask(models, shipped, tmp_path):
    from .conftest import massachusetts_pixels

    scene = write_raster(tmp_path / "scene.tif", massachusetts_pixels(300, 400))
    run = lambda *a: CliRunner().invoke(cli, [str(x) for x in a])  # noqa: E731
    common = ["--base", models["base"], "--device", "cpu", "--block-size", 512]
    auto = run("refine", scene, "-o", tmp_path / "auto", *common)
    assert auto.exit_code == 0, auto.output
    assert auto.output.count("the mask comes from the base model") == 1
    named = run("refine", scene, "-o", tmp_path / "prn", *common, "--refiner", "prn")
    assert named.exit_code == 0 and "the mask comes from" not in named.output
    plain = run("refine", scene, "-o", tmp_path / "none", *common, "--refiner", "none")
    masks = {}
    for name in ("auto", "prn", "none"):
        with rasterio.open(tmp_path / name / "scene_mask.tif") as src:
            masks[name] = src.read(1)
    assert plain.exit_code == 0
    assert (masks["auto"] == masks["none"]).all()
    assert (masks["prn"] != masks["none"]).any()  # the random PRN does change the mask


def test_the_recorded_cut_off_makes_the_mask(models, shipped, tmp_path):
    """A refiner's gain recorded at a tuned threshold records that threshold; `refine`
    binarises at it by default (``--threshold auto``), a number overrides it, `geoprn info`
    prints it, and a malformed one is refused in one line."""
    import zarr

    from .conftest import massachusetts_pixels

    base_sha = file_sha256(models["base"])
    record_gain(shipped["prn"], gain(base_sha), threshold=0.3)
    assert read_header(shipped["prn"])["threshold"] == 0.3
    scene = write_raster(tmp_path / "scene.tif", massachusetts_pixels(300, 400))
    run = lambda *a: CliRunner().invoke(cli, [str(x) for x in a])  # noqa: E731
    common = ["--base", models["base"], "--device", "cpu", "--block-size", 512]
    masks = {}
    for name, extra in (("auto", []), ("half", ["--threshold", 0.5])):
        result = run("refine", scene, "-o", tmp_path / name, *common, *extra)
        assert result.exit_code == 0, result.output
        with rasterio.open(tmp_path / name / "scene_mask.tif") as src:
            masks[name] = src.read(1)
        record = json.loads((tmp_path / name / "scene_run.json").read_text())
        assert record["inputs"]["threshold"] == (0.3 if name == "auto" else 0.5)
    refined = zarr.open_array(str(tmp_path / "auto" / "scene.zarr" / "refined"), mode="r")[:]
    assert (masks["auto"] == (refined > 0.3)).all() and (masks["half"] == (refined > 0.5)).all()
    assert (masks["auto"] != masks["half"]).any()
    info = run("info", shipped["prn"])
    assert "mask cut-off (refine --threshold auto): 0.3, tuned on held-out" in info.stderr
    record_gain(shipped["prn"], gain(base_sha))  # measured at 0.5: the cut-off goes
    assert "threshold" not in read_header(shipped["prn"])
    with pytest.raises(Exception, match="threshold"):
        record_gain(shipped["prn"], gain(base_sha), threshold=1.5)
    bad = run("refine", scene, "-o", tmp_path / "bad", *common, "--threshold", "high")
    assert bad.exit_code != 0 and "--threshold must be 'auto' or a number" in bad.output
    assert "Traceback" not in bad.output


def test_a_base_records_its_averaged_map_and_the_refiners_measured_after_it_follow(
    models, shipped, tmp_path
):
    """A base model's record: its symmetries and cut-off (refine's defaults), the checkpoints
    beside it that name its hash re-linked to its new one, and a PRN measured after its
    single pass no default refiner for its averaged map."""
    from geoprn.errors import GeoprnWarning
    from geoprn.job import ModelRef, default_refiners

    base = shipped["prn"].with_name("base.safetensors")
    base.write_bytes(models["base"].read_bytes())
    old = file_sha256(base)
    record_gain(shipped["prn"], gain(old))  # a PRN measured after the base's single pass
    record_gain(base, {**gain(old), "base_symmetries": 8}, 0.3, symmetries=8)
    new = file_sha256(base)
    header = read_header(base)
    assert new != old and header["symmetries"] == 8 and header["threshold"] == 0.3
    assert read_header(shipped["prn"])["validated_gain"]["base_sha256"] == new  # re-linked
    ref = ModelRef.of(base)
    assert default_refiners(None, None, ref, 1)[0]  # after the single pass: as measured
    with pytest.warns(GeoprnWarning, match="in one pass, not averaged over 8 window symmetries"):
        assert default_refiners(None, None, ref, 8) == (False, False)
    info = CliRunner().invoke(cli, ["info", str(base)])
    assert info.exit_code == 0, info.output
    assert "window symmetries averaged (refine --symmetries auto): 8" in info.stderr
    assert "mask cut-off (refine --threshold auto): 0.3" in info.stderr
    assert "measured: +1.00 road IoU" in info.stderr
    from geoprn.job import open_inputs

    scene = write_raster(tmp_path / "scene.tif", np.zeros((3, 64, 64), "uint8"))
    job = open_inputs(scene, tmp_path / "o", base, None, None, False, None, False, None,
                      "cpu", "fp32", 1, 512, 64, "off")  # fmt: skip
    assert (job.symmetries, job.threshold) == (8, 0.3)  # what the checkpoint records
