"""One checkpoint format: round trip, fp16, and refusal of corrupt, wrong-kind or pickled files."""

import pickle

import pytest
import torch

from geoprn import load_model
from geoprn.errors import CheckpointError
from geoprn.models.checkpoint import read_header, save_checkpoint


def test_round_trip_gives_the_same_predictions(models, tmp_path):
    model = load_model(models["base"])
    assert not model.training
    assert model.geoprn_meta["kind"] == "base" and model.geoprn_meta["bands"] == [1, 2, 3]
    x = torch.rand(2, 3, 512, 512) * 255
    with torch.inference_mode():
        p = model(x)
    assert p.shape == (2, 1, 512, 512) and p.min() >= 0 and p.max() <= 1
    copy = save_checkpoint(model, model.geoprn_meta, tmp_path / "copy.safetensors")
    with torch.inference_mode():
        torch.testing.assert_close(load_model(copy)(x), p)


def test_half_precision_export_is_close_and_half_the_size(models, tmp_path):
    model = load_model(models["base"])
    half = save_checkpoint(model, model.geoprn_meta, tmp_path / "half.safetensors", half=True)
    assert half.stat().st_size < 0.6 * models["base"].stat().st_size
    x = torch.rand(1, 3, 512, 512) * 255
    with torch.inference_mode():
        assert (load_model(half)(x) - model(x)).abs().max() < 1e-2


def test_wrong_kind_is_refused(models):
    with pytest.raises(CheckpointError, match="is a prn checkpoint, a base one"):
        load_model(models["prn"], kind="base")


def test_corrupt_file_is_refused(models, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(models["base"].read_bytes()[:5000])
    with pytest.raises(CheckpointError):
        load_model(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a geoprn checkpoint"):
        read_header(junk)


class _Payload:
    """Unpickling this writes a file: proof that a pickle was executed."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_pickle_is_never_executed(tmp_path):
    target = tmp_path / "pwned"
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(pickle.dumps({"state_dict": _Payload(str(target))}))
    with pytest.raises(CheckpointError, match="not a geoprn checkpoint"):
        load_model(ckpt)
    assert not target.exists()
    pickle.loads(ckpt.read_bytes())  # the payload is live: unpickling does create the file
    assert target.exists()


def test_folding_batchnorm_keeps_the_shipped_models_outputs():
    import rasterio
    import torch
    from torch import nn

    from geoprn.models.checkpoint import DEFAULT_BASE, DEFAULT_PRN, load_model
    from geoprn.models.predictor import fold_batchnorm
    from tests.conftest import SAMPLE_SCENE

    with rasterio.open(SAMPLE_SCENE) as scene:
        image = torch.from_numpy(scene.read(window=((0, 512), (0, 512)))[None].astype("float32"))
    base = load_model(DEFAULT_BASE)
    with torch.inference_mode():
        before = base(image)
        norms = sum(isinstance(m, nn.BatchNorm2d) for m in base.modules())
        assert fold_batchnorm(base) == norms > 0
        assert not any(isinstance(m, nn.BatchNorm2d) for m in base.modules())
        after = base(image)
        torch.testing.assert_close(after, before, atol=1e-4, rtol=0)
        prn = load_model(DEFAULT_PRN)
        x = before[:, :, :256, :256]
        if prn.net.in_channels > 1:  # it reads the image beside the probabilities
            x = torch.cat([x, image[:, :, :256, :256]], 1)
        refined = prn(x.contiguous())
        norms = sum(isinstance(m, nn.BatchNorm2d) for m in prn.modules())
        assert fold_batchnorm(prn) == norms > 0
        torch.testing.assert_close(prn(x.contiguous()), refined, atol=1e-4, rtol=0)
