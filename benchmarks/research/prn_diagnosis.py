"""What PRN's loss rewards, on a labelled split: the loss of candidate outputs, and how many
pixels each changes from the base model at 0.5.

For each tile (base probabilities and PRN outputs computed and cached as
``prn_accuracy.py`` does), PRN's branch loss ``0.7 (focal + boundary)(pseudo-labels) +
0.3 BCE(ground truth)`` and its terms are taken of:

- the base probabilities themselves (a PRN that learned the identity);
- the base model at 0.5, and the pseudo-labels, each as 0.05 / 0.95 probabilities (the
  target PRN is trained towards; its road IoU is the patch-optimal oracle's);
- the PRN's own output (the mean of its branches).

Printed per candidate: the loss terms (means over tiles), road IoU at 0.5 pooled over the
split, and the share of valid pixels whose class at 0.5 differs from the base model's. On
the split PRN trained on (``val`` for the shipped one) this tells whether it fitted its
pseudo-labels at all.

    python benchmarks/research/prn_diagnosis.py                     # shipped base + PRN, val split
    python benchmarks/research/prn_diagnosis.py --split test --prn P.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from prn_accuracy import (  # noqa: E402
    add_probability_options,
    cache_path,
    labelled_probabilities,
    oracle,
    scores,
)

from geoprn.errors import run_script  # noqa: E402
from geoprn.inference import resolve_device  # noqa: E402
from geoprn.losses import masked_bce, masked_boundary, masked_focal  # noqa: E402
from geoprn.models.checkpoint import DEFAULT_PRN, read_header  # noqa: E402
from geoprn.train import refined_probabilities  # noqa: E402


def hardened(mask: np.ndarray) -> np.ndarray:
    """A binary map as 0.05 / 0.95 probabilities."""
    return np.where(mask, 0.95, 0.05).astype(np.float32)


def loss_terms(probs: np.ndarray, pseudo: np.ndarray, truth: np.ndarray, valid: np.ndarray):
    """Focal, boundary (both against the pseudo-labels), BCE against the truth, branch loss."""
    as_map = [torch.from_numpy(np.asarray(a, np.float32))[None, None] for a in (probs, pseudo)]
    logits = torch.logit(as_map[0], eps=1e-4)
    truth_map, valid_map = (
        torch.from_numpy(a.astype(np.float32))[None, None] for a in (truth, valid)
    )
    focal = masked_focal(logits, as_map[1], valid_map).item()
    boundary = masked_boundary(logits, as_map[1], valid_map).item()
    bce = masked_bce(logits, truth_map, valid_map).item()
    return focal, boundary, bce, 0.7 * (focal + boundary) + 0.3 * bce


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probability_options(parser, "val")
    parser.add_argument("--prn", default=str(DEFAULT_PRN))
    args = parser.parse_args()
    device = args.device = resolve_device(args.device)
    patch = int(read_header(args.prn, "prn")["patch_size"])
    tiles, probs = labelled_probabilities(args, [args.split])
    names = [t.name for t in tiles]
    refined = refined_probabilities(
        probs, names, cache_path(args), args.prn, args.batch_size, device, args.precision
    )
    pseudo_labels = [oracle(p, t, patch) for p, t in zip(probs, tiles, strict=True)]
    candidates: dict[str, list[np.ndarray]] = {
        "base probabilities (identity)": probs,
        "base @ 0.5, as 0.05 / 0.95": [hardened(p > 0.5) for p in probs],
        f"pseudo-labels (P = {patch}), as 0.05 / 0.95": list(map(hardened, pseudo_labels)),
        f"PRN {Path(args.prn).name}": refined,
    }
    valid_pixels = sum(int(t.valid.sum()) for t in tiles)
    print(
        f"{args.dataset} {args.split} split, {len(tiles)} tiles, {valid_pixels} valid pixels; "
        f"base {Path(args.base).name}; device {device}\n"
    )
    print(
        "| output | focal (pseudo) | boundary (pseudo) | BCE (truth) | branch loss | road IoU "
        "| pixels changed from base @ 0.5 |\n|---|---|---|---|---|---|---|"
    )
    for name, outputs in candidates.items():
        terms = np.mean(
            [
                loss_terms(o, q, t.label > 0, t.valid)
                for o, q, t in zip(outputs, pseudo_labels, tiles, strict=True)
            ],
            axis=0,
        )
        iou = scores([o > 0.5 for o in outputs], tiles)["road IoU"]
        changed = sum(
            int(((o > 0.5) != (p > 0.5))[t.valid].sum())
            for o, p, t in zip(outputs, probs, tiles, strict=True)
        )
        print(
            f"| {name} | "
            + " | ".join(f"{v:.4f}" for v in terms)
            + f" | {100 * iou:.2f} | {100 * changed / valid_pixels:.2f} % |"
        )


if __name__ == "__main__":
    run_script(main)
