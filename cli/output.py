"""What the commands print, and how loud: ``geoprn -q`` (errors only), the default, ``-v``.

Everything goes through here so the three levels hold for every command: messages go
through :func:`say`, progress bars are :func:`progress_bar`, and warnings and log lines are
written above a running bar (``tqdm.write``), never into it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click
from tqdm import tqdm


def quiet() -> bool:
    """Whether the command line asked for ``-q``."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.find_root().params.get("quiet"))


def say(message: str) -> None:
    """Print a line of a command's summary on stdout, unless ``-q``."""
    if not quiet():
        click.echo(message)


def note(message: str) -> None:
    """Print a line on stderr above any progress bar (warnings, log lines)."""
    tqdm.write(message, file=sys.stderr)


def progress_bar(**options: Any) -> tqdm:
    """A tqdm bar on stderr: shown on a terminal, never with ``-q``."""
    return tqdm(disable=True if quiet() else None, dynamic_ncols=True, **options)


class _Lines(logging.Handler):
    """Log records as lines above any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            note(self.format(record))
        except Exception:  # a closed stream at exit: nothing to tell
            self.handleError(record)


class _Ours(logging.Filter):
    """geoprn's records at ``level`` and above; other libraries' (GDAL through rasterio,
    distributed, PyTorch...) only at ``others`` and above."""

    def __init__(self, level: int, others: int):
        super().__init__()
        self.level, self.others = level, others

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == "geoprn" or record.name.startswith("geoprn.")
        return record.levelno >= (self.level if ours else self.others)


def configure_logging(verbose: bool, quiet_run: bool) -> None:
    """Route every log record through one handler that writes above any progress bar:
    geoprn's at WARNING (INFO with ``-v``, ERROR with ``-q``), other libraries' (GDAL through
    rasterio, distributed...) only with ``-v``, at WARNING; so no library line appears at the
    default level."""
    level = logging.ERROR if quiet_run else logging.INFO if verbose else logging.WARNING
    others = logging.WARNING if verbose else logging.CRITICAL + 1
    handler = _Lines()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s" if verbose else "%(message)s"))
    handler.addFilter(_Ours(level, others))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Lines)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(min(level, others))
    logging.getLogger("geoprn").setLevel(level)
    own = logging.getLogger("distributed")  # its own stderr handler, set up on import
    for old in [h for h in own.handlers if type(h) is logging.StreamHandler]:
        own.removeHandler(old)
    own.propagate = True
    own.setLevel(logging.WARNING if verbose else logging.CRITICAL)  # the filter decides
