"""Device helpers of windowed inference: the cache of windows shared by neighbouring blocks and
the GPU turns of block threads."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from geoprn import inference
from geoprn.blocks import window_cache_bytes
from geoprn.errors import InputError
from geoprn.inference import WindowCache, device_turn, to_device
from geoprn.tiling import blend_weights


def window(value: float) -> torch.Tensor:
    return torch.full((512, 512), value)  # float32, 1 MiB


def test_an_entry_serves_its_uses_then_goes():
    cache = WindowCache()
    cache.keep("a", window(1), uses=2)
    cache.keep("b", window(2), uses=0)  # no other block needs it: not kept
    assert len(cache) == 1
    assert cache.take("a")[0, 0] == 1 and cache.take("a")[0, 0] == 1
    assert cache.take("a") is None and cache.take("b") is None and len(cache) == 0


def test_kept_values_are_a_copy_and_the_oldest_go_past_the_budget():
    cache = WindowCache(max_bytes=2 * window(0).nbytes)
    values = window(1)
    cache.keep("a", values, uses=1)
    values[:] = 9  # the caller reuses its buffer
    cache.keep("b", window(2), uses=1)
    cache.keep("c", window(3), uses=1)  # over budget: "a" goes
    assert len(cache) == 2 and cache.take("a") is None
    assert cache.take("b")[0, 0] == 2 and cache.take("c")[0, 0] == 3
    cache.keep("b", window(2), uses=1)
    cache.keep("b", window(5), uses=1)  # already kept: the first stays
    assert cache.take("b")[0, 0] == 2


def test_the_cache_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("GEOPRN_WINDOW_CACHE_MB", "64")
    assert window_cache_bytes() == 64 << 20
    monkeypatch.delenv("GEOPRN_WINDOW_CACHE_MB")
    assert window_cache_bytes() == 1024 << 20
    monkeypatch.setenv("GEOPRN_WINDOW_CACHE_MB", "lots")
    with pytest.raises(InputError, match="not a whole number of MiB"):
        window_cache_bytes()


def test_gpu_block_threads_take_turns_and_cpu_ones_do_not(monkeypatch):
    gpu0, gpu1 = torch.device("cuda", 0), torch.device("cuda", 1)
    turn = device_turn(gpu0)
    assert isinstance(turn, type(threading.Lock()))
    assert device_turn(gpu0) is turn and device_turn(gpu1) is not turn
    assert isinstance(device_turn(torch.device("cpu")), contextlib.nullcontext)
    monkeypatch.setattr(inference, "DEVICE_TURNS", False)
    assert isinstance(device_turn(gpu0), contextlib.nullcontext)


def test_uploads_of_read_only_arrays_are_copies():
    weights = blend_weights(512, 64)  # cached and shared: read-only
    uploaded = to_device(weights, torch.device("cpu"))
    uploaded += 1.0
    assert weights.max() == 1.0 and uploaded.max() == 2.0
