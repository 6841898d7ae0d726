"""``train --resume`` from a damaged or hostile state file: one line, nothing of it run or used.

The states are real: one written by a real (one-step) training run on Massachusetts tiles,
then altered the way a damaged copy or a hostile user would alter it."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from geoprn.cli.main import cli
from geoprn.train import state_path
from geoprn.train.state import STATE_KEY, load_state, write_state
from tests.conftest import SHARED_DATA, SMALL_BASE_RECIPE, crop_tiles

MASS = SHARED_DATA / "massachusetts" / "train"
CONFIG = {**SMALL_BASE_RECIPE, "crop": 64, "batch_size": 2, "epochs": 1, "steps_per_epoch": 1}

pytestmark = pytest.mark.skipif(not MASS.is_dir(), reason=f"real data not found at {MASS}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[list[str], Path]:
    """The train command's arguments (without --resume) and the state its one step left."""
    root = tmp_path_factory.mktemp("state")
    tiles = crop_tiles(MASS, {"19678630_15.png": (600, 500), "21328975_15.png": (500, 500)}, root)
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "name": "tiny", "kind": "base"}))
    out = root / "base.safetensors"
    args = ["train", "base", str(tiles), "-o", str(out), "--config", str(config)]
    args += ["--val-fraction", "0.5", "--device", "cpu"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return args, state_path(out)


def resume(args: list[str], state: Path, tmp_path: Path, *more: str):
    """``train --resume`` with ``state`` as the output's state file (a copy of the run's)."""
    out = tmp_path / "base.safetensors"
    state_path(out).write_bytes(state.read_bytes())
    i = args.index("-o")
    return CliRunner().invoke(cli, [*args[: i + 1], str(out), *args[i + 2 :], "--resume", *more])


def assert_one_line(result, *patterns: str) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("geoprn: error: cannot resume from"), lines
    for pattern in patterns:
        assert pattern in lines[0], lines


def test_a_state_train_wrote_resumes(trained, tmp_path):
    """The checks accept what training writes: one more epoch from a real state."""
    args, state = trained
    result = resume(args, state, tmp_path, "--epochs", "2")
    assert result.exit_code == 0, result.output
    after = load_state(state_path(tmp_path / "base.safetensors"))
    assert after["epoch"] == 2 and after["steps"] == 2


class _Runs:
    """A pickle that runs code when unpickled: it would create the file ``path``."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


def _write(tmp_path: Path, name: str, make) -> Path:
    path = tmp_path / name
    make(path)
    return path


@pytest.mark.parametrize(
    "kind, pattern",
    [
        ("garbage", "not a training state geoprn wrote (not safetensors"),
        ("empty", "not a training state geoprn wrote (not safetensors"),
        ("bare pickle running code", "not a training state geoprn wrote (not safetensors"),
        ("torch file running code", "not a training state geoprn wrote (not safetensors"),
        ("truncated", "not a training state geoprn wrote (not safetensors"),
        ("a checkpoint, not a state", "no state in its header"),
        ("a list", "holds a list, not a training state"),
        ("a skeleton of the wrong shape", "unexpected entry 'code'"),
        ("a tensor it does not hold", "not a training state geoprn wrote"),
    ],
)
def test_an_unreadable_or_hostile_state_is_one_line_and_runs_nothing(
    kind, pattern, trained, tmp_path
):
    args, state = trained
    ran = tmp_path / "the pickle ran"

    def header(skeleton) -> callable:
        tensors = {"t0": torch.zeros(2)}
        return lambda p: save_file(tensors, str(p), metadata={STATE_KEY: json.dumps(skeleton)})

    makers = {
        "garbage": lambda p: p.write_bytes(os.urandom(4096)),
        "empty": lambda p: p.write_bytes(b""),
        "bare pickle running code": lambda p: p.write_bytes(pickle.dumps(_Runs(ran))),
        "torch file running code": lambda p: torch.save({"model": _Runs(ran)}, p),
        "truncated": lambda p: p.write_bytes(state.read_bytes()[: state.stat().st_size // 2]),
        "a checkpoint, not a state": lambda p: save_file({"w": torch.zeros(1)}, str(p)),
        "a list": header({"list": [1, 2, 3]}),
        "a skeleton of the wrong shape": header({"dict": [["model", {"code": "os.system"}]]}),
        "a tensor it does not hold": header({"dict": [["model", {"tensor": "t9"}]]}),
    }
    hostile = _write(tmp_path, "hostile.pt", makers[kind])
    assert_one_line(resume(args, hostile, tmp_path), pattern)
    assert not ran.exists()


def test_a_state_of_an_earlier_version_is_not_read(trained, tmp_path):
    """A ``.state.pt`` (torch pickle) left by an earlier geoprn: one line, and the way on."""
    args, state = trained
    out = tmp_path / "base.safetensors"
    out.with_name(out.name + ".state.pt").write_bytes(b"old")
    i = args.index("-o")
    result = CliRunner().invoke(cli, [*args[: i + 1], str(out), *args[i + 2 :], "--resume"])
    assert result.exit_code == 1 and "is not read: continue with --init" in result.output


def _altered(state: Path, change) -> Path:
    content = load_state(state)
    change(content)
    path = state.with_name("altered.safetensors")
    write_state(path, content)
    return path


def _first_param_state(s: dict) -> dict:
    return s["optimizer"]["state"][0]


@pytest.mark.parametrize(
    "name, change, pattern",
    [
        ("epoch not a number", lambda s: s.update(epoch="9"), "epoch: input should be"),
        ("negative steps", lambda s: s.update(steps=-1), "steps: input should be greater"),
        ("no split", lambda s: s.pop("split"), "split: field required"),
        ("split of numbers", lambda s: s["split"].update(train=[1]), "split.train.0"),
        ("history row", lambda s: s["history"][0].update(extra=1), "history.0.extra"),
        ("model not tensors", lambda s: s.update(model={"a": 1}), "model.a"),
        ("no band statistics", lambda s: s.pop("mean"), "no band statistics"),
        ("infinite seconds", lambda s: s.update(seconds=float("inf")), "finite"),
        (
            "a tensor of another shape",
            lambda s: s["model"].update({next(iter(s["model"])): torch.zeros(3)}),
            "its model does not fit the config's network (1 tensor(s)",
        ),
        (
            "optimizer moments of another shape",
            lambda s: _first_param_state(s).update(exp_avg=torch.zeros(2, 2)),
            "optimizer.state[0].exp_avg does not have its parameter's shape",
        ),
        (
            "optimizer groups",
            lambda s: s["optimizer"]["param_groups"][0].update(lr="fast"),
            "optimizer[0].lr is a str, not a float",
        ),
        (
            "scheduler attribute",
            lambda s: s["scheduler"].update(optimizer=3),
            "scheduler has an entry 'optimizer'",
        ),
        ("scheduler mode", lambda s: s["scheduler"].update(mode="sideways"), "sideways"),
    ],
)
def test_a_state_with_wrong_content_is_one_line(name, change, pattern, trained, tmp_path):
    """A well-formed state whose fields have the wrong types, ranges or shapes is refused
    before the first step (a 3-4 line torch message, or a traceback later, before)."""
    args, state = trained
    assert_one_line(resume(args, _altered(state, change), tmp_path), pattern)
