"""geoprn: road segmentation of large GeoTIFF scenes with PatchRefineNet, scheduled by Dask.

The public API is imported lazily, so ``import geoprn.train`` does not pull in Dask or Zarr.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_model": "geoprn.models.checkpoint",
    "refine": "geoprn.pipeline",
    "patch_optimal_labels": "geoprn.pseudo_labels",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'geoprn' has no attribute {name!r}")
