"""The resumable training state (``<out>.state.safetensors``, written by ``train`` after each
epoch), and reading it back checked before any of it is used, so that a damaged or hostile
file is one line.

The state is a safetensors file, as the checkpoints are: its tensors (model, optimizer
moments) by name, and everything else (epochs, history, split, the optimizer's and the
scheduler's settings) as JSON in its header, each tensor referred to by name. Nothing geoprn
reads is a pickle. What it holds is then checked field by field (:class:`TrainingState`), and
the optimizer, scheduler and scaler states against fresh ones of the run (:func:`restore`),
before the first training step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pydantic
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from geoprn.errors import CheckpointError
from geoprn.files import replacing

STATE_KEY = "geoprn_training_state"
"""The safetensors header entry that holds the state's JSON skeleton."""


def _pack(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON, its tensors moved to ``tensors`` (``{"tensor": name}`` in their
    place); dicts keep their key types (``{"dict": [[key, value], ...]}``, optimizer states
    are keyed by ints), lists and tuples are ``{"list": [...]}`` / ``{"tuple": [...]}``."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) for k in value):
            raise TypeError("state keys must be strings or integers")
        return {"dict": [[k, _pack(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return {kind: [_pack(v, tensors) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a training state cannot hold a {type(value).__name__}")


def _unpack(node: Any, tensors: Any) -> Any:
    """The inverse of :func:`_pack`.

    Raises:
        ValueError: a node is not one :func:`_pack` writes.
    """
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if not (isinstance(node, dict) and len(node) == 1):
        raise ValueError(f"unexpected {type(node).__name__} in the state")
    ((kind, inner),) = node.items()
    if kind == "tensor" and isinstance(inner, str):
        return tensors.get_tensor(inner)
    if kind == "dict" and isinstance(inner, list):
        if not all(
            isinstance(i, list) and len(i) == 2 and isinstance(i[0], (str, int)) for i in inner
        ):
            raise ValueError("a mapping of the state is malformed")
        return {k: _unpack(v, tensors) for k, v in inner}
    if kind in ("list", "tuple") and isinstance(inner, list):
        items = [_unpack(v, tensors) for v in inner]
        return items if kind == "list" else tuple(items)
    raise ValueError(f"unexpected entry {kind!r} in the state")


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Write a training state, whole or not at all (:func:`geoprn.files.replacing`)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_pack(state, tensors))
    with replacing(path, ".tmp") as tmp:
        save_file(tensors, str(tmp), metadata={STATE_KEY: skeleton})


def load_state(path: Path) -> Any:
    """What a state file holds, unchecked (see :func:`read_state`).

    Raises:
        ValueError: it is not a state file geoprn wrote, or is damaged.
    """
    try:
        with safe_open(str(path), framework="pt") as tensors:
            skeleton = (tensors.metadata() or {}).get(STATE_KEY)
            if skeleton is None:
                raise ValueError("not a training state geoprn wrote (no state in its header)")
            return _unpack(json.loads(skeleton), tensors)
    except (SafetensorError, OSError, json.JSONDecodeError, RecursionError) as exc:
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise ValueError(f"not a training state geoprn wrote (not safetensors: {reason})") from None
    except KeyError as exc:
        raise ValueError(f"damaged: it refers to a tensor {exc} it does not hold") from None


class _Split(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True)

    train: list[str]
    val: list[str]


class _Epoch(pydantic.BaseModel):
    """One record of the history (a row of ``<out>.log.csv``)."""

    model_config = pydantic.ConfigDict(strict=True, extra="forbid")

    epoch: int
    steps: int
    train_loss: float
    val_road_iou: float
    lr: float
    minutes: float


class TrainingState(pydantic.BaseModel):
    """The fields a training state must hold, with their types; others (a kind's own) pass."""

    model_config = pydantic.ConfigDict(strict=True, extra="allow", arbitrary_types_allowed=True)

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    epoch: int = pydantic.Field(ge=0)
    steps: int = pydantic.Field(ge=0)
    best_iou: float
    best_epoch: int = pydantic.Field(ge=0)
    bad_epochs: int = pydantic.Field(ge=0)
    history: list[_Epoch]
    split: _Split
    config: dict[str, Any]
    seconds: float = pydantic.Field(ge=0)
    mean: list[float] | None = None
    std: list[float] | None = None


def _problem(exc: pydantic.ValidationError) -> str:
    """The first field pydantic found wrong, as ``field: reason``, and how many more."""
    errors = exc.errors()
    where = ".".join(str(part) for part in errors[0]["loc"]) or "the file"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {errors[0]['msg'].lower()}{more}"


def read_state(path: Path, statistics: bool = False) -> dict[str, Any]:
    """The training state in ``path``, checked (:class:`TrainingState`); ``statistics``: it
    must also hold the band statistics (``mean``, ``std``) the model normalises with.

    Raises:
        CheckpointError: the file is not a state ``train`` wrote, or is damaged, in one line.
    """
    head = f"cannot resume from {path}"
    try:
        state = load_state(path)
    except ValueError as exc:
        raise CheckpointError(f"{head}: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{head}: it holds a {type(state).__name__}, not a training state")
    try:
        checked = TrainingState.model_validate(state)
    except pydantic.ValidationError as exc:
        raise CheckpointError(f"{head}: {_problem(exc)}") from None
    if statistics and (checked.mean is None or checked.std is None):
        raise CheckpointError(f"{head}: it records no band statistics (mean, std)")
    if not all(map(math.isfinite, [checked.best_iou, checked.seconds])):
        raise CheckpointError(f"{head}: best_iou and seconds must be finite numbers")
    return state


def _same_layout(recorded: Any, fresh: Any, where: str) -> str | None:
    """Where ``recorded`` (a state dict from the file) departs from ``fresh`` (the run's own):
    an entry the run's has not (an entry missing is an older torch's, which loading fills
    in), another type, a tensor of another shape; None when it matches."""
    if isinstance(fresh, dict):
        if not isinstance(recorded, dict):
            return f"{where} is not a mapping"
        unknown = [key for key in recorded if key not in fresh]
        if unknown:
            return f"{where} has an entry {unknown[0]!r} this run's has not"
        for key in fresh.keys() & recorded.keys():
            problem = _same_layout(recorded[key], fresh[key], f"{where}.{key}")
            if problem:
                return problem
        return None
    if isinstance(fresh, (list, tuple)):
        if not isinstance(recorded, (list, tuple)) or len(recorded) != len(fresh):
            return f"{where} has another length than this run's"
        for i, (a, b) in enumerate(zip(recorded, fresh, strict=True)):
            problem = _same_layout(a, b, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(fresh, torch.Tensor):
        if not isinstance(recorded, torch.Tensor) or recorded.shape != fresh.shape:
            return f"{where} is not a tensor of shape {tuple(fresh.shape)}"
        return None
    numbers = (int, float)
    if fresh is None or recorded is None:  # (e.g. Adam's foreach: None or a bool)
        return None
    if isinstance(fresh, bool) or isinstance(recorded, bool):
        ok = isinstance(fresh, bool) and isinstance(recorded, bool)
    elif isinstance(fresh, numbers):
        ok = isinstance(recorded, numbers)
    else:
        ok = type(recorded) is type(fresh)
    return None if ok else f"{where} is a {type(recorded).__name__}, not a {type(fresh).__name__}"


def _optimizer_layout(optimizer: torch.optim.Optimizer, recorded: dict[str, Any]) -> str | None:
    """Where an optimizer state from the file cannot be this optimizer's: its parameter
    groups as this run's, and each parameter's state tensors of the parameter's shape."""
    fresh = optimizer.state_dict()
    if not isinstance(recorded, dict) or set(recorded) != set(fresh):
        return f"optimizer does not hold exactly {' and '.join(sorted(fresh))}"
    problem = _same_layout(recorded["param_groups"], fresh["param_groups"], "optimizer")
    if problem:
        return problem
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not isinstance(recorded["state"], dict):
        return "optimizer.state is not a mapping"
    for index, values in recorded["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(params):
            return f"optimizer.state has an entry for parameter {index!r}, which there is not"
        if not isinstance(values, dict):
            return f"optimizer.state[{index}] is not a mapping"
        for name, value in values.items():
            shaped = isinstance(value, torch.Tensor) and value.dim() > 0
            if shaped and value.shape != params[index].shape:
                return f"optimizer.state[{index}].{name} does not have its parameter's shape"
    return None


def restore(
    path: Path,
    state: dict[str, Any],
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any | None,
) -> None:
    """Load a state read by :func:`read_state` into the run's network, optimizer, learning
    rate scheduler and gradient scaler, after checking each against the run's own.

    Raises:
        CheckpointError: a part of the state does not fit this run, in one line.
    """
    head = f"cannot resume from {path}"
    fresh = net.state_dict()
    wrong = [
        k for k in fresh if k not in state["model"] or state["model"][k].shape != fresh[k].shape
    ]
    extra = [k for k in state["model"] if k not in fresh]
    if wrong or extra:
        first = (wrong or extra)[0]
        raise CheckpointError(
            f"{head}: its model does not fit the config's network ({len(wrong) + len(extra)} "
            f"tensor(s) missing, extra or of another shape, first {first})"
        )
    problem = _optimizer_layout(optimizer, state["optimizer"])
    problem = problem or _same_layout(state["scheduler"], scheduler.state_dict(), "scheduler")
    if scaler is not None and state["scaler"]:
        problem = problem or _same_layout(state["scaler"], scaler.state_dict(), "scaler")
    if problem:
        raise CheckpointError(f"{head}: {problem}")
    try:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # what the checks missed
        text = str(exc).strip()
        raise CheckpointError(f"{head}: {text.splitlines()[0] if text else exc!r}") from None
