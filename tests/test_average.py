"""The moving average of the weights (``ema_decay``): its arithmetic, that training validates
and keeps it, and that a resumed run continues it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from geoprn.errors import CheckpointError, InputError
from geoprn.models.checkpoint import read_header
from geoprn.train import export_checkpoint, load_config, state_path, train_base
from geoprn.train.average import MovingAverage
from geoprn.train.state import load_state
from tests.conftest import MASS_TRAIN, NEEDS_TRAIN_DATA, SMALL_BASE_RECIPE, crop_tiles

SOURCES = {
    "19678630_15.png": (600, 500),
    "21328975_15.png": (500, 500),
    "25229185_15.png": (700, 700),
}


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def test_average_follows_the_decay_and_swaps_back():
    net = small_net()
    average = MovingAverage(net, 0.9)
    expected = {k: v.detach().clone().float() for k, v in net.state_dict().items()}
    for step in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(step + 1.0)
            net(torch.randn(2, 3, 8, 8))  # training mode: BatchNorm's running statistics move
        average.update(net)
        for k, v in net.state_dict().items():
            if v.is_floating_point():  # the first update copies, then 0.9 old + 0.1 new
                expected[k] = v.float().clone() if step == 0 else 0.9 * expected[k] + 0.1 * v
    own = {k: v.clone() for k, v in net.state_dict().items()}
    with average.swapped_into(net):
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                assert torch.allclose(v, expected[k], atol=1e-6), k
                assert not torch.equal(v, own[k]), k
    assert all(torch.equal(v, own[k]) for k, v in net.state_dict().items())


def test_average_restore_refuses_another_network(tmp_path):
    kept = MovingAverage(nn.Sequential(nn.Conv2d(3, 5, 3)), 0.9).state()
    with pytest.raises(CheckpointError, match="weight average does not fit"):
        MovingAverage(small_net(), 0.9).restore(kept, tmp_path / "x.state.safetensors")


def test_recipe_checks_the_decay(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**SMALL_BASE_RECIPE, "ema_decay": 1.0}))
    with pytest.raises(InputError, match="ema_decay"):
        load_config(path)


@NEEDS_TRAIN_DATA
def test_training_keeps_and_resumes_the_average(tmp_path):
    tiles = crop_tiles(MASS_TRAIN, SOURCES, tmp_path / "tiles")
    path = tmp_path / "ema.yaml"
    path.write_text(yaml.safe_dump({**SMALL_BASE_RECIPE, "ema_decay": 0.9}))
    config = load_config(path)

    def train(out: Path, **kw):
        return train_base([tiles], config, out, val_fraction=0.34, device="cpu", **kw)

    capped = tmp_path / "capped.safetensors"
    first = train(capped, max_minutes=0)
    assert first["epochs"] == 1 and first["best_epoch"] == 1
    state = load_state(state_path(capped))
    averaged, own = state["average"]["weights"], state["model"]
    assert state["average"]["updates"] == first["steps"]
    saved = load_file(str(capped))
    # the checkpoint holds the validated average, not the weights of the last step
    assert all(torch.equal(saved[k].float(), averaged[k].float()) for k in saved)
    assert any(not torch.equal(averaged[k].float(), own[k].float()) for k in saved)

    # the research script writes the state's average as a checkpoint with the run's header
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "research" / "export_average.py"
    exported = tmp_path / "average.safetensors"
    for _ in range(2):  # the second time it refuses to overwrite, in one line
        done = subprocess.run(
            [sys.executable, str(script), str(capped), str(exported)],
            capture_output=True,
            text=True,
        )
    assert done.returncode == 2 and done.stderr.strip().endswith("exists; choose another name")
    assert all(torch.equal(load_file(str(exported))[k], averaged[k].half()) for k in saved)
    assert read_header(exported)["trained_on"] == read_header(capped)["trained_on"]
    # export_checkpoint writes the weights it is given in place of the checkpoint's own
    mine = export_checkpoint(capped, tmp_path / "own.safetensors", half=False, weights=own)
    assert all(torch.equal(load_file(str(mine))[k], own[k]) for k in saved)

    resumed = train(capped, resume=True)
    straight = train(tmp_path / "straight.safetensors")
    assert resumed["epochs"] == straight["epochs"] == 2
    a = load_state(state_path(capped))["average"]
    b = load_state(Path(straight["state"]))["average"]
    assert a["updates"] == b["updates"] == straight["steps"]
    assert all(torch.allclose(a["weights"][k].float(), b["weights"][k].float(), atol=1e-5)
               for k in a["weights"])  # fmt: skip
