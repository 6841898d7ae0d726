"""geoprn: road segmentation of large GeoTIFF scenes with PatchRefineNet, scheduled by Dask."""

__version__ = "0.1.0"

from geoprn.models.checkpoint import load_model  # noqa: E402
from geoprn.pipeline import refine  # noqa: E402

__all__ = ["__version__", "load_model", "refine"]
