"""How much of the patch-optimal oracle's gain can be predicted from the probability map alone,
the only input PRN sees: per-patch threshold policies learned on some splits, scored on another.

Each P x P patch of the base model's probabilities gets one of 20 choices: binarise at
τ ∈ {0.05, ..., 0.95} (PRN's pseudo-label thresholds) or blank it (no road). Rows, road IoU
pooled over valid pixels, on the fitting splits (``--fit``, default train + val) and on the
scored split (``--split``, default test):

- the base model at 0.5;
- oracles, which choose given the truth (the pooled IoU maximised by Dinkelbach's method):
  all 20 choices, thresholds only, and 0.5-or-blank (where the oracle's gain comes from);
- a rule: the choice for each quantile bin of the patch's road fraction at 0.5, fitted;
- a policy: a small MLP over 13 statistics of the patch's probabilities (the share of valid
  pixels above 10 levels, the largest value, the valid share, the 3 x 3 neighbourhood's share
  above 0.5), trained on the fitting splits to minimise the expected regret of its soft
  choices under Dinkelbach's objective (5 rounds, each at the IoU the last one reached);
- a check: the same policy also told each patch's true road share, which it must learn to
  use (it shows the policy can learn when its input says something).

If neither learned row gains on the fitting splits, the patch-wise bias of this base model is
not predictable from its output, and a refiner of its output can recover little of the oracle.
Base probabilities come from the cache ``prn_accuracy.py`` fills.

    python benchmarks/research/prn_ceiling.py              # shipped base, Massachusetts
    python benchmarks/research/prn_ceiling.py --base B.safetensors --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from prn_accuracy import add_probability_options, labelled_probabilities  # noqa: E402

from geoprn.errors import run_script  # noqa: E402
from geoprn.inference import resolve_device  # noqa: E402
from geoprn.pseudo_labels import THRESHOLDS  # noqa: E402

CHOICES = [float(t) for t in THRESHOLDS] + [np.inf]  # the last: blank
HALF = CHOICES.index(0.5)
LEVELS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class Patches:
    """Per valid patch of some tiles: features of the probabilities, the true road share, and
    intersection and predicted road counts under each choice; ``truth`` is the road pixel
    count of all of them together."""

    def __init__(self, probs: list[np.ndarray], tiles, patch: int):
        features, inter, predicted, road_share, self.truth = [], [], [], [], 0
        for prob, tile in zip(probs, tiles, strict=True):
            pad = ((0, -prob.shape[0] % patch), (0, -prob.shape[1] % patch))
            valid = np.pad(tile.valid, pad)
            road = np.pad(tile.label > 0, pad) & valid
            rows, cols = valid.shape[0] // patch, valid.shape[1] // patch

            def split(a, rows=rows, cols=cols):  # (H, W) -> (patches, P * P)
                return a.reshape(rows, patch, cols, patch).swapaxes(1, 2).reshape(rows * cols, -1)

            p, v, g = split(np.pad(prob, pad)), split(valid), split(road)
            count = v.sum(1)
            share = (
                np.stack([((p > t) & v).sum(1) for t in LEVELS], 1) / np.maximum(count, 1)[:, None]
            )
            around = np.pad(share[:, LEVELS.index(0.5)].reshape(rows, cols), 1)
            nearby = sum(
                np.roll(np.roll(around, dy, 0), dx, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
            )
            keep = count > 0
            road_share.append((g.sum(1) / np.maximum(count, 1))[keep])
            stats = [np.where(v, p, 0).max(1), count / patch**2, nearby[1:-1, 1:-1].ravel() / 9]
            features.append(np.column_stack([share, *stats])[keep])
            masks = [(p > c) & v for c in CHOICES]
            inter.append(np.stack([(m & g).sum(1) for m in masks], 1)[keep])
            predicted.append(np.stack([m.sum(1) for m in masks], 1)[keep])
            self.truth += int(g.sum())
        self.features = np.concatenate(features)
        self.road_share = np.concatenate(road_share)  # of the truth: for the check row only
        self.inter = np.concatenate(inter).astype(np.float64)
        self.predicted = np.concatenate(predicted).astype(np.float64)

    def iou(self, choice: np.ndarray) -> float:
        """Pooled road IoU with ``choice`` (one index into CHOICES per patch)."""
        pick = np.arange(len(choice)), choice
        inter = self.inter[pick].sum()
        return inter / (self.predicted[pick].sum() + self.truth - inter)

    def gains(self, q: float) -> np.ndarray:
        """Dinkelbach's separable objective at IoU ``q``: I - q (P - I) per patch and choice
        (the pooled IoU exceeds q exactly when its sum over patches is above q's)."""
        return self.inter - q * (self.predicted - self.inter)


def dinkelbach(patches: Patches, choose) -> tuple[np.ndarray, float]:
    """Iterate ``choose(gains) -> choice`` from the base at 0.5 until the pooled IoU settles."""
    choice = np.full(len(patches.inter), HALF)
    q = patches.iou(choice)
    for _ in range(50):
        choice = choose(patches.gains(q))
        q, last = patches.iou(choice), q
        if abs(q - last) < 1e-12:
            break
    return choice, q


def oracle(patches: Patches, allowed: list[int]) -> float:
    """The best pooled IoU given the truth, each patch choosing among ``allowed``."""

    def choose(gains):
        return np.array(allowed)[gains[:, allowed].argmax(1)]

    return dinkelbach(patches, choose)[1]


def fit_rule(patches: Patches, bins: int):
    """One choice per quantile bin of the road share at 0.5; returns the rule as a function."""
    share = patches.features[:, LEVELS.index(0.5)]
    edges = np.unique(np.quantile(share, np.linspace(0, 1, bins + 1)[1:-1]))
    index = np.searchsorted(edges, share)

    def choose(gains):
        per_bin = np.stack([gains[index == b].sum(0) for b in range(len(edges) + 1)])
        return per_bin.argmax(1)[index]

    choice, _ = dinkelbach(patches, choose)
    table = np.full(len(edges) + 1, HALF)
    table[index] = choice
    return lambda features: table[np.searchsorted(edges, features[:, LEVELS.index(0.5)])]


def fit_policy(patches: Patches, features: np.ndarray, hidden: int, steps: int, rounds: int = 5):
    """An MLP from ``features`` (one row per patch) to a softmax over the choices, trained to
    minimise the expected regret of its choice under Dinkelbach's objective at the IoU its
    last round reached; returns its argmax as a function of such features."""
    torch.manual_seed(0)
    mean, std = features.mean(0), features.std(0) + 1e-6

    def scaled(rows: np.ndarray) -> torch.Tensor:
        return torch.tensor((rows - mean) / std, dtype=torch.float32)

    def policy(rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(scaled(rows)).argmax(1).numpy()

    net = torch.nn.Sequential(
        torch.nn.Linear(features.shape[1], hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, len(CHOICES)),
    )
    optimiser = torch.optim.Adam(net.parameters(), 1e-3)
    x = scaled(features)
    q = patches.iou(np.full(len(features), HALF))
    for _ in range(rounds):
        gains = torch.tensor(patches.gains(q), dtype=torch.float32)
        regret = gains.max(1, keepdim=True).values - gains
        for _ in range(steps):
            loss = (net(x).softmax(1) * regret).sum(1).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        q = patches.iou(policy(features))
    return policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probability_options(parser, "test")
    parser.add_argument("--fit", default="train,val", help="splits the policies are fitted on")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--bins", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1000, help="per round (5 rounds)")
    args = parser.parse_args()
    args.device = resolve_device(args.device)

    def patches_of(splits: list[str]) -> Patches:
        tiles, probs = labelled_probabilities(args, splits)
        return Patches(probs, tiles, args.patch)

    fit, scored = patches_of(args.fit.split(",")), patches_of([args.split])
    rule = fit_rule(fit, args.bins)
    policy = fit_policy(fit, fit.features, args.hidden, args.steps)
    told = fit_policy(fit, np.column_stack([fit.features, fit.road_share]), args.hidden, args.steps)
    print(
        f"{args.dataset}, base {Path(args.base).name}, P = {args.patch}: fitted on {args.fit} "
        f"({len(fit.inter)} patches), scored on {args.split} ({len(scored.inter)} patches)"
    )
    print(f"\n| road IoU | {args.fit} | {args.split} |\n|---|---|---|")
    rows = {
        "base @ 0.5": lambda s: s.iou(np.full(len(s.inter), HALF)),
        "oracle: any threshold or blank": lambda s: oracle(s, list(range(len(CHOICES)))),
        "oracle: thresholds only": lambda s: oracle(s, list(range(len(THRESHOLDS)))),
        "oracle: 0.5 or blank": lambda s: oracle(s, [HALF, len(CHOICES) - 1]),
        f"rule: a choice per bin of the road share at 0.5 ({args.bins} bins)": (
            lambda s: s.iou(rule(s.features))
        ),
        f"policy: MLP over {fit.features.shape[1]} patch statistics ({args.hidden} hidden)": (
            lambda s: s.iou(policy(s.features))
        ),
        "check: the same policy also told the patch's true road share": (
            lambda s: s.iou(told(np.column_stack([s.features, s.road_share])))
        ),
    }
    for name, score in rows.items():
        print(f"| {name} | {100 * score(fit):.2f} | {100 * score(scored):.2f} |")


if __name__ == "__main__":
    run_script(main)
