"""The exceptions geoprn raises; the CLI turns each into one line on stderr and a non-zero exit."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path


class GeoprnError(Exception):
    """Base of every error geoprn reports to the user."""


class InputError(GeoprnError):
    """A scene, raster or vector file is missing, unreadable or unsuitable."""


class CheckpointError(GeoprnError):
    """A checkpoint is missing, corrupt, of the wrong kind or not a geoprn checkpoint."""


class OutputError(GeoprnError):
    """An output folder cannot be written, or holds outputs the command must not overwrite."""


class WriteError(OutputError):
    """An output file could not be written: disk full, quota, read-only file system, I/O error."""


class CompileError(GeoprnError):
    """``torch.compile`` cannot compile a model here (no C++ compiler, no Triton...)."""


class SchedulerError(GeoprnError):
    """The Dask scheduler cannot be reached or a block task failed."""


class BatchError(GeoprnError):
    """A batch finished, but some of its scenes failed (each said why in the batch report)."""


class GeoprnWarning(UserWarning):
    """Something the user should know that does not stop the run (the CLI prints it once)."""


def run_script(main: Callable[[], None]) -> None:
    """Run a script's ``main`` as the CLI runs a command: a GeoprnError is one line on stderr
    and exit 1, Ctrl-C exit 130, never a traceback (the benchmark scripts' entry point)."""
    name = Path(sys.argv[0]).name
    try:
        main()
    except GeoprnError as exc:
        sys.exit(f"{name}: error: {exc}")
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)
