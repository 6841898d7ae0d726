"""One checkpoint format for every model: safetensors weights plus a JSON header.

The header sits in the safetensors metadata under the key ``geoprn``. Loading reads tensors
and JSON only, so a checkpoint can never run code (no pickle anywhere).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from geoprn.errors import CheckpointError
from geoprn.models.base import build_base
from geoprn.models.header import FORMAT, FORMAT_VERSION, header_problem
from geoprn.models.predictor import Predictor, fold_batchnorm

KINDS = ("base", "prn", "bpr")
REQUIRED = ("kind", "architecture", "arguments", "bands", "tile_size")
WEIGHTS_DIR = Path(__file__).parents[1] / "weights"
DEFAULT_BASE = WEIGHTS_DIR / "base_all_sets_512.safetensors"
DEFAULT_PRN = WEIGHTS_DIR / "prn_rgb_512.safetensors"
DEFAULT_BPR = WEIGHTS_DIR / "bpr_512.safetensors"
"""The shipped weights used when no checkpoint is given (geoprn/weights/README.md): the base
model trained on every labelled set, its weights a moving average, last trained on 512 px
crops (its checkpoint records that it runs averaged over 8 window symmetries, and its
cut-off), the PRN trained for its averaged map, and the BPR trained on boxes of that map
refined by that PRN. They replaced the Massachusetts-only ``base_default`` and
``prn_default`` on 2026-12-03 (``benchmarks/default_pair.py``). A refiner runs by default
only if its recorded gain qualifies for the base in use (:func:`geoprn.gain.qualifies`): the
PRN does, the BPR (a recorded loss) does not."""


def build_network(meta: dict[str, Any]) -> torch.nn.Module:
    """Build the untrained network a header describes."""
    if meta["architecture"] == "PatchRefineNet":  # the paper's refiner (geoprn.models.prn)
        from geoprn.models.prn import PatchRefineNet

        return PatchRefineNet(**meta["arguments"])
    return build_base(meta["architecture"], meta["arguments"])


def save_checkpoint(
    model: torch.nn.Module, meta: dict[str, Any], path: str | Path, half: bool = False
) -> Path:
    """Write ``model``'s weights and ``meta`` as a geoprn checkpoint.

    Args:
        model: a :class:`Predictor` or a bare network.
        meta: the header; must hold at least ``REQUIRED`` keys, each as
            :class:`~geoprn.models.header.CheckpointHeader` describes it.
        path: destination ``.safetensors`` file (written atomically).
        half: store floating-point weights as float16 (shipped weights).
    """
    from geoprn import __version__

    net = model.net if isinstance(model, Predictor) else model
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "geoprn_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **meta,
    }
    problem = header_problem(header)
    if problem is not None:
        raise CheckpointError(f"cannot save {path}: bad checkpoint header: {problem}")
    tensors = {}
    for name, tensor in net.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        tensors[name] = tensor.half() if half and tensor.is_floating_point() else tensor
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"geoprn": json.dumps(header)})
    tmp.replace(path)
    return path


def read_header(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Return a checkpoint's JSON header without loading its weights.

    Args:
        path: a geoprn ``.safetensors`` checkpoint.
        kind: if given, the kind the caller needs (``base``, ``prn`` or ``bpr``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a geoprn checkpoint (not a readable safetensors file: {exc})"
        ) from None
    try:
        header = json.loads(metadata["geoprn"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is a safetensors file without a geoprn header") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path} has a malformed geoprn header (not a {FORMAT} header)")
    problem = header_problem(header)
    if problem is not None:
        raise CheckpointError(f"{path} has a malformed geoprn header: {problem}")
    if kind is not None and header["kind"] != kind:
        raise CheckpointError(f"{path} is a {header['kind']} checkpoint, a {kind} one is needed")
    return header


def load_model(
    path: str | Path, kind: str | None = None, device: str | torch.device = "cpu"
) -> Predictor:
    """Load a checkpoint as an eval-mode module mapping inputs to probabilities.

    Args:
        path: a geoprn ``.safetensors`` checkpoint.
        kind: if given, the kind the caller needs (``base``, ``prn`` or ``bpr``).
        device: where to put the weights.

    Returns:
        A :class:`Predictor` with the header on ``.geoprn_meta``.
    """
    meta = read_header(path, kind)
    try:
        net = build_network(meta)
        with safe_open(str(path), framework="pt") as f:
            state = {name: f.get_tensor(name).float() for name in f.keys()}  # noqa: SIM118
        mismatch = state_mismatch(net.state_dict(), state)
        if mismatch is not None:
            raise CheckpointError(f"{path} does not match its own header: {mismatch}")
        net.load_state_dict(state)
    except (SafetensorError, RuntimeError, TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} does not match its own header: {exc}") from None
    return Predictor(net, meta).to(device).eval()


def state_mismatch(
    expected: dict[str, torch.Tensor], stored: dict[str, torch.Tensor]
) -> str | None:
    """How ``stored`` tensors differ from the ``expected`` ones of the network the header
    builds, in one line (the first tensor of each kind of difference and how many), or None."""
    missing = [name for name in expected if name not in stored]
    unexpected = [name for name in stored if name not in expected]
    shapes = [n for n in expected if n in stored and stored[n].shape != expected[n].shape]
    problems = []
    if shapes:
        first = shapes[0]
        problems.append(
            f"{len(shapes)} of {len(expected)} tensors have the wrong shape (first {first}: "
            f"{tuple(stored[first].shape)} stored, {tuple(expected[first].shape)} in the "
            "network the header describes)"
        )
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing (first {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) (first {unexpected[0]})")
    return "; ".join(problems) or None


@lru_cache(maxsize=8)
def load_cached(path: str, sha256: str, device: str, compiled: bool = False) -> Predictor:
    """Load a checkpoint once per process (a Dask worker keeps its models across tasks).

    ``sha256`` is part of the cache key so a file replaced on disk is loaded afresh. Batch
    norms are folded into their convolutions and the weights laid out channels-last, the
    layout convolutions run fastest in (``benchmarks/model_speed.py``). ``compiled``: wrapped
    in ``torch.compile`` for one input shape (callers keep their batches full); it compiles on
    its first call, once per process.
    """
    if compiled:  # the same weights, through the compiler
        return torch.compile(load_cached(path, sha256, device), dynamic=False)
    model = load_model(path, device=device)
    fold_batchnorm(model)
    return model.to(memory_format=torch.channels_last)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def rewrite_header(path: str | Path, header: dict[str, Any], out: str | Path | None = None) -> Path:
    """Write checkpoint ``path`` with a new header to ``out`` (default: in place, atomically);
    the weights are kept as stored, bit for bit."""
    out = Path(out or path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"geoprn": json.dumps(header)})
    tmp.replace(out)
    return out


def record_gain(
    path: str | Path,
    gain: dict[str, Any],
    threshold: float | None = None,
    symmetries: int | None = None,
) -> Path:
    """Store a refiner's validated gain (:class:`geoprn.gain.ValidatedGain`, as a dict) in
    its header as ``validated_gain``, and the mask cut-off it was measured at as
    ``threshold`` (None: 0.5, and any recorded cut-off is dropped). A base model records
    one only for its map averaged over ``symmetries`` window symmetries, which it records
    too (``refine --symmetries auto``). The checkpoints beside it that name its old hash
    follow it (:func:`relink`)."""
    from geoprn.gain import ValidatedGain

    header = read_header(path)
    if header["kind"] == "base" and symmetries is None:
        raise CheckpointError(
            f"{path} is a base model: it carries a gain only for its map averaged over "
            "window symmetries"
        )
    header["validated_gain"] = ValidatedGain.model_validate(gain).model_dump(mode="json")
    header.pop("threshold", None)
    if threshold is not None:
        header["threshold"] = float(threshold)
    if symmetries is not None:
        header["symmetries"] = symmetries
    problem = header_problem(header)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    old = file_sha256(path)
    rewrite_header(path, header)
    relink(Path(path), old, file_sha256(path))
    return Path(path)


def relink(source: Path, old: str, new: str) -> list[Path]:
    """Point the checkpoints beside ``source`` that name its old hash ``old`` (refiners
    trained or measured after it) at ``new``, its hash under a rewritten header: the same
    weights. Each file rewritten has a new hash in turn, which its own dependents follow
    (a file's own record keeps the hash it was measured as). Returns the files rewritten."""
    changed = []
    for other in sorted(source.parent.glob("*.safetensors")):
        if other.resolve() == source.resolve():
            continue
        try:
            text = json.dumps(read_header(other))
        except CheckpointError:  # not a geoprn checkpoint (a training state, say)
            continue
        if old in text:
            before = file_sha256(other)
            rewrite_header(other, json.loads(text.replace(old, new)))
            changed += [other, *relink(other, before, file_sha256(other))]
    return changed
