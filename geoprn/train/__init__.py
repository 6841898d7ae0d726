"""Training, one module per concern: the recipes (:mod:`.recipes`), the fit loop all trainers
share (:mod:`.loop`, with :mod:`.memory` for the micro-batch and :mod:`.state` for resuming),
and one trainer per model kind: :func:`train_base` (:mod:`.base`), :func:`train_prn`
(:mod:`.prn`) and :func:`train_bpr` (:mod:`.bpr`). The names below are the public API."""

from geoprn.train.base import road_confusion, train_base
from geoprn.train.bpr import train_bpr
from geoprn.train.loop import (
    Progress,
    accumulate_gradients,
    as_pairs,
    check_init,
    curves_path,
    export_checkpoint,
    history_path,
    mixed_precision,
    split_tiles,
    state_path,
    write_history_csv,
)
from geoprn.train.memory import saved_bytes
from geoprn.train.prn import (
    base_probabilities,
    pooled_road_iou,
    prn_tile,
    refined_probabilities,
    train_prn,
)
from geoprn.train.recipes import DEFAULTS, config_path, load_config

__all__ = [
    "DEFAULTS",
    "Progress",
    "accumulate_gradients",
    "as_pairs",
    "base_probabilities",
    "check_init",
    "config_path",
    "curves_path",
    "export_checkpoint",
    "history_path",
    "load_config",
    "mixed_precision",
    "pooled_road_iou",
    "prn_tile",
    "refined_probabilities",
    "road_confusion",
    "saved_bytes",
    "split_tiles",
    "state_path",
    "train_base",
    "train_bpr",
    "train_prn",
    "write_history_csv",
]
