"""Write the moving average of the weights that a training state holds (its last epoch's, the
one validated) as a checkpoint with the run's header, e.g. to score a piece whose best
checkpoint is still its ``--init`` on more than the loop's validation figure.

    python benchmarks/research/export_average.py RUN.safetensors OUT.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

from geoprn.errors import GeoprnError
from geoprn.train import export_checkpoint, state_path
from geoprn.train.state import read_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the run's checkpoint (-o of train); its state lies beside it")
    parser.add_argument("output")
    args = parser.parse_args()
    if Path(args.output).exists():
        parser.error(f"{args.output} exists; choose another name")
    try:
        state = read_state(state_path(args.run))
        if not state.get("average"):
            raise GeoprnError("its state holds no moving average (trained without --ema-decay)")
        export_checkpoint(args.run, args.output, weights=state["average"]["weights"])
    except (GeoprnError, OSError) as exc:
        parser.error(f"{args.run}: {exc}")
    last = state["history"][-1]
    print(
        f"{args.output}: the average of epoch {last['epoch']} (val road IoU "
        f"{last['val_road_iou']:.4f})"
    )


if __name__ == "__main__":
    main()
