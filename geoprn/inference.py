"""Windowed model inference over arrays: grid windows, batched forward passes, blending.

The same code serves ``refine`` (a block plus its halo, read from the scene) and training
(whole labelled tiles held in memory), so a tile's base probabilities are the ones ``refine``
would compute for it.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np
import torch

from geoprn.errors import CompileError, InputError
from geoprn.raster import mirrored
from geoprn.tiling import (
    Block,
    Range,
    blend_weights,
    cover,
    stage_regions,
    touching,
    weight_sums,
    window_origins,
    window_uses,
)


def resolve_device(device: str) -> torch.device:
    """``auto`` picks the first CUDA GPU when there is one, else the CPU.

    Raises:
        InputError: not a device torch knows, one geoprn does not run on (``mps``, ``meta``...)
            or a GPU this machine does not have.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"unknown device '{device}' (use auto, cpu or cuda[:N])") from None
    if resolved.type not in ("cpu", "cuda"):
        raise InputError(
            f"geoprn runs on the CPU or a CUDA GPU, not on '{device}' (use auto, cpu or cuda[:N])"
        )
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{device}' asked for, but this machine has no CUDA GPU")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise InputError(
            f"device '{device}' asked for, but this machine has {torch.cuda.device_count()} "
            "CUDA GPU(s), numbered from 0"
        )
    return resolved


PRECISIONS = ("auto", "fp32", "bf16")
"""``refine``'s ``--precision`` choices (see :func:`autocast_dtype`)."""


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware: a CUDA GPU that supports it, or a CPU
    with AVX512-BF16 or AMX (where oneDNN runs bf16 convolutions natively)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return any(
        getattr(cpu, probe, lambda: False)()
        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype the models run in, None for fp32.

    ``auto`` is bf16 where the device computes it natively (2.8x PRN's fp32 speed on an H100
    with channels-last tensors, 2.2x on 2 AVX512-BF16 CPU cores, ``benchmarks/model_speed.py``)
    and fp32 elsewhere, where emulated bf16 would be slower.
    """
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision '{precision}' (use {', '.join(PRECISIONS)})")
    if precision == "bf16" or (precision == "auto" and native_bf16(device)):
        return torch.bfloat16
    return None


def fast_math(device: torch.device, precision: str = "auto"):
    """The autocast context of :func:`autocast_dtype` (a no-op for fp32)."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


GPU_BATCH = 32
"""Windows per forward pass on a GPU: base + PRN run 160 tiles/s at 32 on an H100 and 165 at
128 (``benchmarks/RESULTS.md``), so larger batches only take memory."""
GPU_BYTES_PER_WINDOW = 0.2 * 2**30
"""GPU memory per window of a batch, base + PRN in bf16 (5.7 GiB at 32 on an H100)."""


@functools.lru_cache(maxsize=8)
def auto_batch_size(device: torch.device, blocks_in_flight: int = 3) -> int:
    """``--batch-size auto``: 1 on a CPU, where a window runs fastest alone (base + PRN 1.66 s a
    window at batch 1, 1.95 s at 8 on 2 cores, ``benchmarks/model_speed.py``); on a GPU
    :data:`GPU_BATCH`, or fewer if half its free memory cannot hold that many windows for
    each of the ``blocks_in_flight`` (see :func:`geoprn.blocks.blocks_in_flight`). Decided
    once per process, device and number of blocks."""
    if device.type != "cuda":
        return 1
    free = torch.cuda.mem_get_info(device)[0]
    fitting = int(free * 0.5 // (blocks_in_flight * GPU_BYTES_PER_WINDOW))
    return max(1, min(GPU_BATCH, fitting))


_warmed: set[tuple] = set()
_warming = threading.Lock()


def warm_up(
    model: torch.nn.Module, shape: tuple[int, ...], device: torch.device, precision: str
) -> None:
    """Run a compiled ``model`` once on zeros of ``shape``, as :func:`predict_region` feeds it
    (channels-last, inference mode, ``precision``), one thread at a time.

    ``torch.compile`` traces the model on its first call, and tracing while another thread
    runs torch code can deadlock; so each block's thread calls this before any other torch
    work, the first one compiles, and the others wait for it.
    """
    key = (id(model), shape, str(device), precision)
    with _warming:
        if key in _warmed:
            return
        try:  # an inference tensor, as predict_region's: the compiled code's guards check
            with torch.inference_mode(), fast_math(device, precision):
                x = torch.zeros(shape, device=device)
                model(x.contiguous(memory_format=torch.channels_last))
        except Exception as exc:  # the compiler's own failures, whatever their type
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CompileError(f"--compile failed: {reason}; run without --compile") from None
        _warmed.add(key)


DEVICE_TURNS = True
"""Whether a GPU's block threads take turns on it (see :func:`device_turn`); ``benchmarks/
stages.py --turns both`` runs with and without to compare."""
_turns: dict[int, threading.Lock] = {}
_turns_guard = threading.Lock()


def device_turn(device: torch.device) -> contextlib.AbstractContextManager:
    """Hold ``device`` for one block's model work: a lock per GPU, a no-op on the CPU.

    A process's block threads queue their work on one CUDA stream, which runs it in order; and
    each thread ends its block by waiting for that stream, so for everything queued before its
    copy back, the other threads' work included. Threads that queue at once thus finish at
    once, and then all read and write while the GPU idles. Taking turns keeps the stream's
    order (so the GPU does the same work) but lets one block's work finish first, so its
    thread writes and reads the next block while the others' work runs.
    """
    if device.type != "cuda" or not DEVICE_TURNS:
        return contextlib.nullcontext()
    index = torch.cuda.current_device() if device.index is None else device.index
    with _turns_guard:
        return _turns.setdefault(index, threading.Lock())


class WindowCache:
    """Window outputs that several blocks run (their halos overlap), kept for the blocks still
    to come so each is computed once.

    Thread-safe. An entry goes after its last use; when more than ``max_bytes`` would be held
    (blocks spread over processes, or run out of order), the oldest go first and a later block
    recomputes them, to the same values.
    """

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, list] = OrderedDict()  # key -> [values, uses left]
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, key: Hashable) -> torch.Tensor | None:
        """The values kept under ``key`` (one use of them), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            entry[1] -= 1
            if entry[1] == 0:
                del self._entries[key]
                self._bytes -= entry[0].nbytes
            return entry[0]

    def keep(self, key: Hashable, values: torch.Tensor, uses: int) -> None:
        """Keep a copy of ``values`` (on their device) for ``uses`` more uses."""
        with self._lock:
            if uses < 1 or key in self._entries or values.nbytes > self.max_bytes:
                return
            self._entries[key] = [values.clone(), uses]
            self._bytes += values.nbytes
            while self._bytes > self.max_bytes:
                old, _ = self._entries.popitem(last=False)[1]
                self._bytes -= old.nbytes

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class SharedWindows:
    """The windows of one stage of one job that other blocks run too.

    ``uses`` is :func:`geoprn.tiling.window_uses` along (rows, columns): window (y, x) is run
    by ``uses[0][y] * uses[1][x]`` blocks, whose origins are the keys.
    """

    cache: WindowCache
    stage: Hashable
    uses: tuple[dict[int, int], dict[int, int]]

    @classmethod
    def chain(
        cls,
        cache: WindowCache,
        key: Hashable,
        origins: tuple[np.ndarray, np.ndarray],
        spans: tuple[list[Range], list[Range]],
        tile: int,
        stages: int,
    ) -> list[SharedWindows]:
        """One per stage of a chain of ``stages`` models run by blocks whose row and column
        ranges are ``spans``; ``key`` tells this chain's windows from any other's."""
        uses = [
            [
                dict(zip(o.tolist(), u.tolist(), strict=True))
                for u in window_uses(o, s, tile, stages)
            ]
            for o, s in zip(origins, spans, strict=True)
        ]
        return [cls(cache, (key, k), (uses[0][k], uses[1][k])) for k in range(stages)]

    def take(self, y: int, x: int) -> torch.Tensor | None:
        return self.cache.take((self.stage, y, x))

    def keep(self, y: int, x: int, values: torch.Tensor) -> None:
        self.cache.keep((self.stage, y, x), values, self.uses[0][y] * self.uses[1][x] - 1)


def windows_run(
    origins: tuple[np.ndarray, np.ndarray],
    blocks: list[Block],
    tile: int,
    stages: int,
    cache_bytes: int = 0,
) -> list[int]:
    """How many windows ``blocks`` run in each stage, one after another in the order given in
    one process whose :class:`WindowCache` holds ``cache_bytes`` (0: every block runs its whole
    halo). Counted, no model is run: a window is kept as 4 bytes, the budget scaled to match.
    """
    spans = (sorted({b.rows for b in blocks}), sorted({b.cols for b in blocks}))
    marker = torch.zeros(1)
    cache = WindowCache(cache_bytes // (4 * tile * tile) * marker.nbytes)
    shared = SharedWindows.chain(cache, "count", origins, spans, tile, stages)
    run = [0] * stages
    for block in blocks:
        regions = stage_regions(origins, block.rows, block.cols, tile, stages)[1:]
        for k, (stage, (rows, cols)) in enumerate(zip(shared, regions, strict=True)):
            for y in touching(origins[0], rows, tile).tolist():
                for x in touching(origins[1], cols, tile).tolist():
                    if stage.take(y, x) is None:
                        run[k] += 1
                        stage.keep(y, x, marker)
    return run


def predict_region(
    model: torch.nn.Module,
    source: torch.Tensor,
    source_region: tuple[Range, Range],
    out_region: tuple[Range, Range],
    origins: tuple[np.ndarray, np.ndarray],
    tile: int,
    overlap: int,
    batch_size: int,
    precision: str = "auto",
    valid: np.ndarray | None = None,
    shared: SharedWindows | None = None,
    full_batches: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, int]:
    """Run ``model`` on every grid window touching ``out_region`` and blend them, on the device
    ``source`` lies on: the result stays there, ready for the next stage.

    A window holding no valid pixel is skipped: it would only add to pixels that are nodata,
    so the valid pixels' values are those of the full blend, bit for bit. With ``shared``,
    windows another block has run are taken from its cache and those others will run are
    kept there; windows are blended in grid order either way, so the sum is the same, bit for
    bit.

    Args:
        model: maps (N, C, tile, tile) float32 to (N, 1, tile, tile) probabilities.
        source: (C, H, W) input covering ``source_region`` (which covers every window used),
            any real dtype, on the model's device.
        source_region, out_region: (rows, cols) ranges in scene coordinates.
        origins: the scene-wide window grid (row origins, column origins).
        precision: see :func:`autocast_dtype`.
        valid: (H, W) bool over ``source_region`` on the host, False at nodata; None: all valid.
        shared: the cache of windows shared with other blocks; None: run every window.
        full_batches: pad every batch to ``batch_size`` windows (with zeros, dropped after):
            a compiled model then sees one input shape and compiles once.
        on_batch: called with the number of windows of each forward pass once it has run
            (a progress bar's ticks).

    Returns:
        The blended (H_out, W_out) float32 probabilities on the device (meaningless where no
        window ran: mask nodata afterwards) and the number of windows run.
    """
    device = source.device
    (sy0, _), (sx0, _) = source_region
    (oy0, oy1), (ox0, ox1) = out_region
    rows, cols = (touching(o, span, tile) for o, span in zip(origins, out_region, strict=True))
    weights = to_device(blend_weights(tile, overlap), device)
    total = torch.zeros((oy1 - oy0, ox1 - ox0), dtype=torch.float32, device=device)
    queue: list[tuple[int, int, torch.Tensor | None]] = []  # in grid order; None: to be run
    run = 0

    def window(array, y: int, x: int):
        return array[..., y - sy0 : y - sy0 + tile, x - sx0 : x - sx0 + tile]

    def flush() -> None:
        """Run the queued windows that need it in one batch, then blend the queue in order."""
        batch = [(y, x) for y, x, prob in queue if prob is None]
        if batch:
            with torch.inference_mode(), fast_math(device, precision):
                x = torch.stack([window(source, y, x) for y, x in batch]).float()
                if full_batches and len(batch) < batch_size:
                    x = torch.cat([x, x.new_zeros((batch_size - len(batch), *x.shape[1:]))])
                probs = model(x.contiguous(memory_format=torch.channels_last))[: len(batch)]
            computed = iter(probs[:, 0].float())
            if on_batch is not None:
                on_batch(len(batch))
        for y, x, prob in queue:
            if prob is None:
                prob = next(computed)
                if shared is not None:
                    shared.keep(y, x, prob)
            ya, yb, xa, xb = max(y, oy0), min(y + tile, oy1), max(x, ox0), min(x + tile, ox1)
            inside = np.s_[ya - y : yb - y, xa - x : xb - x]
            total[ya - oy0 : yb - oy0, xa - ox0 : xb - ox0] += prob[inside] * weights[inside]
        queue.clear()

    for y, x in ((int(y), int(x)) for y in rows for x in cols):
        if valid is not None and not window(valid, y, x).any():
            continue
        prob = shared.take(y, x) if shared is not None else None
        queue.append((y, x, prob))
        if prob is None:
            run += 1
            if run % batch_size == 0:  # a full batch to run since the last flush
                flush()
    flush()
    row_sums, col_sums = (
        to_device(weight_sums(o, span, tile, overlap), device)
        for o, span in ((rows, out_region[0]), (cols, out_region[1]))
    )
    total /= row_sums[:, None]
    total /= col_sums[None, :]
    return total, run


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``: through pinned memory without blocking the host on a GPU
    (a copy from ordinary memory waits until the GPU has done all the work queued before it);
    integer types torch does not compute in (uint16, uint32) become float32 first."""
    if array.dtype not in (np.uint8, np.int16, np.int32, np.float32, np.float64, np.bool_):
        array = array.astype(np.float32)
    elif not array.flags.writeable:  # torch does not hold read-only memory (cached weights)
        array = array.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def predict_array(
    model: torch.nn.Module,
    image: np.ndarray,
    tile: int = 512,
    overlap: int = 64,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """Blended ``model`` probabilities over a whole (C, H, W) array, reflect-padded at its edges.

    The result is what ``refine`` gives for a scene holding exactly this array, bit for bit
    at the batch size it ran (fp32 convolutions of different batch sizes can differ in the
    last bit, as on CPUs without AVX512-BF16; ``refine`` runs 1 on a CPU). With ``valid``
    ((H, W) bool, False at nodata), windows without a valid pixel are skipped as ``refine``
    skips them: the valid pixels' values do not change.
    """
    h, w = image.shape[-2:]
    origins = (window_origins(h, tile, overlap), window_origins(w, tile, overlap))
    rows, cols = cover(origins[0], (0, h), tile), cover(origins[1], (0, w), tile)
    source = mirrored(lambda win: image[(..., *win.toslices())], rows, cols, h, w)
    padded_valid = None
    if valid is not None:
        padded_valid = mirrored(lambda win: valid[win.toslices()], rows, cols, h, w)
    probs, _ = predict_region(
        model,
        to_device(source, torch.device(device)),
        (rows, cols),
        ((0, h), (0, w)),
        origins,
        tile,
        overlap,
        batch_size,
        precision,
        padded_valid,
    )
    return probs.cpu().numpy()
