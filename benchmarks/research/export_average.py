"""Write the moving average of the weights that a training state holds (its last epoch's, the
one validated) as a checkpoint with the run's header, e.g. to score a piece whose best
checkpoint is still its ``--init`` on more than the loop's validation figure.

    python benchmarks/research/export_average.py RUN.safetensors OUT.safetensors
"""

from __future__ import annotations

import argparse

from geoprn.models.checkpoint import load_model, save_checkpoint
from geoprn.train import state_path
from geoprn.train.state import load_state

KEPT_BY_SAVE = ("format", "format_version", "geoprn_version", "created")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the run's checkpoint (-o of train); its state lies beside it")
    parser.add_argument("output")
    args = parser.parse_args()
    state = load_state(state_path(args.run))
    if not state.get("average"):
        parser.error("the run's state holds no moving average (trained without --ema-decay)")
    model = load_model(args.run)
    weights = state["average"]["weights"]
    model.net.load_state_dict({name: weights[name] for name in model.net.state_dict()})
    meta = {k: v for k, v in model.geoprn_meta.items() if k not in KEPT_BY_SAVE}
    save_checkpoint(model, meta, args.output, half=True)
    print(
        f"{args.output}: the average of epoch {state['epoch']} (val road IoU "
        f"{state['history'][-1]['val_road_iou']:.4f})"
    )


if __name__ == "__main__":
    main()
