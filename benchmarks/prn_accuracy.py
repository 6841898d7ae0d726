"""Road IoU, mIoU and mBA of the base model and its refiners on the test places of each
labelled set, and each gain over the base model at 0.5 with a bootstrap 90 % interval over
the places (a gain whose interval holds zero is no gain).

Rows per set, all on the same places and valid pixels (white Massachusetts areas are nodata):

- the base model at 0.5, and at the one global threshold best on that set's ``val`` places;
- base + each PRN, with its branches combined as its header says (the mean, at 0.5) and by
  the rule the authors' released code reports its figures with, global ∪ dilate(global ∩
  local) (``--rules``); and each of those at the one threshold best on the val places held
  out of that PRN's training (``trained_on.val_tiles``), pooled over the sets scored: a PRN
  whose gain is only a shift of the cut-off gains no more there than the tuned base does;
- base + BPR and base + PRN + BPR, as ``refine --refiner bpr`` / ``prn+bpr`` runs them;
- the patch-optimal oracle (each 64 x 64 patch at its own best threshold given the truth).

With ``--symmetries N`` (4 or 8) the base model's map is averaged over that many window
symmetries, as ``refine --symmetries N`` makes it: the first two rows stay the base model in
one pass, then come the averaged map at 0.5 and at the one threshold best on every val place
of the sets scored, and the refiner, BPR and oracle rows run on the averaged map. ``--record``
then also stores that gain, the symmetries and that cut-off in the base model's checkpoint
(``refine --symmetries auto`` and ``--threshold auto`` read them), and a PRN's gain over the
averaged map at its cut-off (what runs without the PRN). Each refiner's gain over that map,
place by place, is printed too. ``--prn-symmetries N`` averages each PRN over N window
symmetries as well (a research option: ``refine`` runs a PRN once, so it cannot be recorded).

The sets are scored alone and pooled (``massachusetts + massachusetts_crops``, the issue's
target). Probabilities are computed as ``refine`` computes them (overlapping 512 windows,
blended) and cached (``--cache``). ``--record`` stores the first PRN's gain over all the test
places scored (``geoprn info`` prints it; ``refine`` runs a refiner by default only if that
gain's interval is above zero), at the PRN's tuned threshold, which it records too (``refine
--threshold auto`` binarises at it); then BPR's, at 0.5 (BPR sees the previous stage's
probabilities recentred at its cut-off): after the PRN it was trained on, over that PRN at
its cut-off (what runs without BPR), else right after the base model, over the base at 0.5.
``--record-bpr`` stores BPR's alone.

    python benchmarks/prn_accuracy.py                       # shipped weights, the three sets
    python benchmarks/prn_accuracy.py --base B --prn P --bpr none --record
    python benchmarks/prn_accuracy.py --sets massachusetts --prn none --bpr none   # the room
    python benchmarks/prn_accuracy.py --symmetries 8 --prn none --bpr none --record
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from geoprn.data import discover_pairs, load_tiles
from geoprn.errors import run_script
from geoprn.gain import METRICS, bootstrap_gain, boundary_arrays, place_counts
from geoprn.inference import PRECISIONS, autocast_dtype, predict_array, resolve_device
from geoprn.metrics import BoundaryCounts, Confusion, evaluate
from geoprn.models.bpr import BoundaryRefiner
from geoprn.models.checkpoint import (
    DEFAULT_BASE,
    DEFAULT_BPR,
    DEFAULT_PRN,
    file_sha256,
    load_cached,
    read_header,
    record_gain,
    rewrite_header,
)
from geoprn.models.header import recorded_cut_off
from geoprn.models.predictor import SYMMETRIES
from geoprn.pseudo_labels import THRESHOLDS, patch_optimal_labels
from geoprn.train import base_probabilities, refined_probabilities

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def split_tiles(dataset: str, split: str):
    names = set(json.loads((DATA / "splits.json").read_text())[dataset][split])
    return [p for p in discover_pairs([DATA / dataset / split]) if p.name in names]


def add_probability_options(parser: argparse.ArgumentParser, split: str) -> None:
    """The options of the scripts that score a base model's cached probabilities on a split."""
    parser.add_argument("--dataset", default="massachusetts")
    parser.add_argument("--split", default=split)
    parser.add_argument("--base", default=str(DEFAULT_BASE))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="as refine's")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--symmetries", type=int, choices=SYMMETRIES, default=1,
        help="average the base model over this many window symmetries, as refine does",
    )  # fmt: skip
    parser.add_argument(
        "--cache",
        help="Zarr cache of the base and PRN probabilities, reused by later runs (default: "
        "geoprn-accuracy-<base hash>.zarr in the temporary folder: one per base model); "
        "maps averaged over N symmetries go beside it (<name>-sN.zarr for <name>.zarr)",
    )


def cache_path(args: argparse.Namespace) -> str:
    """``--cache``, or the default cache of ``--base``: a cache holds one base model's
    probabilities in one pass or averaged over one number of symmetries, so another base,
    or the same base's other map, gets its own instead of replacing it."""
    averaged = f"-s{args.symmetries}" * (args.symmetries > 1)
    if args.cache:
        given = Path(args.cache)
        return str(given.with_name(given.stem + averaged + given.suffix))
    tag = file_sha256(args.base)[:12] + averaged
    return str(Path(tempfile.gettempdir()) / f"geoprn-accuracy-{tag}.zarr")


def labelled_probabilities(args: argparse.Namespace, splits: list[str]):
    """The tiles of ``splits`` and the base model's probabilities on them (cached)."""
    header = read_header(args.base, "base")
    pairs = [p for split in splits for p in split_tiles(args.dataset, split)]
    tiles = load_tiles(pairs, header["bands"], header.get("nodata"))
    probs = base_probabilities(
        tiles, cache_path(args), args.base, None, args.batch_size, args.device, args.precision,
        args.symmetries,
    )  # fmt: skip
    return tiles, probs


def scores(preds, tiles) -> dict[str, float]:
    conf, bnd = Confusion(), BoundaryCounts()
    for pred, tile in zip(preds, tiles, strict=True):
        c, b = evaluate(pred, tile.label > 0, tile.valid)
        conf, bnd = conf + c, bnd + b
    return {"road IoU": conf.road_iou, "mIoU": conf.miou, "mBA": bnd.mba}


def oracle(probs: np.ndarray, tile, patch: int) -> np.ndarray:
    h, w = probs.shape
    pad = ((0, -h % patch), (0, -w % patch))
    labels, _ = patch_optimal_labels(
        np.pad(probs, pad), np.pad(tile.label, pad), patch, np.pad(tile.valid, pad)
    )
    return labels[:h, :w] > 0.5


def timed_predictions(
    model, probs, tiles, batch_size, device, precision
) -> tuple[list, float, int]:
    """A window-level refiner (BPR) run as ``refine`` runs it, on each tile's probabilities
    and image: predictions, seconds, boxes."""
    started, model.boxes_seen = time.perf_counter(), 0
    out = [
        predict_array(
            model,
            np.concatenate([p[None], t.image.astype(np.float32)]),
            512,
            64,
            batch_size,
            device,
            precision,
        )
        for p, t in zip(probs, tiles, strict=True)
    ]
    return out, time.perf_counter() - started, model.boxes_seen


SETS = ("massachusetts", "massachusetts_crops", "cil2022")
POOLED = ("massachusetts", "massachusetts_crops")


def with_rule(prn: str, rule: str, folder: Path) -> str:
    """``prn`` with its branches combined by ``rule`` (a copy with that header; same weights)."""
    header = read_header(prn, "prn")
    if header["arguments"].get("rule", "mean") == rule:
        return prn
    header["arguments"] = {**header["arguments"], "rule": rule}
    return str(rewrite_header(prn, header, folder / f"{Path(prn).stem}.{rule}.safetensors"))


def per_place(preds, tiles) -> tuple[np.ndarray, np.ndarray]:
    """Confusion and boundary counts of each place: (n, 3) and (n, 4)."""
    counted = [evaluate(p, t.label > 0, t.valid) for p, t in zip(preds, tiles, strict=True)]
    return place_counts([c for c, _ in counted]), boundary_arrays([b for _, b in counted])


def pooled(counts: np.ndarray, boundary: np.ndarray) -> dict[str, float]:
    """Road IoU and mBA pooled over the places."""
    return {"road IoU": float(METRICS["road IoU"](counts.sum(0))),
            "mBA": float(METRICS["mBA"](boundary.sum(0)))}  # fmt: skip


class SetScores:
    """Per-place counts of every row on one set's test places, and its tuned threshold."""

    def __init__(self, args, dataset: str, prns: list[str], rules: list[str], folder: Path):
        ns = argparse.Namespace(**{**vars(args), "dataset": dataset})
        val, val_probs = labelled_probabilities(ns, ["val"])
        test, probs = labelled_probabilities(ns, [args.split])
        self.places, self.test = len(test), test
        names = [t.name for t in test]
        self.bpr_seconds: list[tuple[str, float, int, float]] = []
        self.refined: dict[str, list[np.ndarray]] = {}  # row -> test maps (thresholds later)
        self.held_out: dict[str, np.ndarray] = {}  # row -> (thresholds, 3) counts on val
        self.held_out_places: dict[str, int] = {}  # row -> how many val places those are
        one_val, one_test = val_probs, probs  # the base model in one pass: the first rows
        if args.symmetries > 1:
            one = argparse.Namespace(**{**vars(ns), "symmetries": 1})
            one_val, one_test = (labelled_probabilities(one, [s])[1] for s in ("val", args.split))
        self.tau = max(TUNED, key=lambda t: scores([p > t for p in one_val], val)["road IoU"])
        rows = {
            "base @ 0.5": per_place([p > 0.5 for p in one_test], test),
            "base @ tuned global threshold": per_place([p > self.tau for p in one_test], test),
        }
        if args.symmetries > 1:  # the averaged map, its cut-off tuned on every val place
            averaged = f"base, {args.symmetries} symmetries"
            rows[averaged] = per_place([p > 0.5 for p in probs], test)
            self.refined[averaged] = probs
            self.held_out[averaged] = np.stack([
                per_place([p > t for p in val_probs], val)[0].sum(0) for t in TUNED
            ])  # fmt: skip
            self.held_out_places[averaged] = len(val)
        for prn in prns:
            tag = "PRN" if len(prns) == 1 else f"PRN {Path(prn).stem}"
            held = set((read_header(prn, "prn").get("trained_on") or {}).get("val_tiles", []))
            kept = [i for i, t in enumerate(val) if t.name in held]
            for rule in rules:
                ruled = with_rule(prn, rule, folder)
                refined = refined_probabilities(
                    probs, names, cache_path(args), ruled,
                    args.batch_size, args.device, args.precision, [t.image for t in test],
                    args.prn_symmetries,
                )  # fmt: skip
                row = f"base + {tag} ({rule})"
                rows[row] = per_place([r > 0.5 for r in refined], test)
                self.refined[row] = refined
                on_val = refined_probabilities(
                    [val_probs[i] for i in kept], [val[i].name for i in kept], cache_path(args),
                    ruled, args.batch_size, args.device, args.precision,
                    [val[i].image for i in kept], args.prn_symmetries,
                )  # fmt: skip
                self.held_out[row] = np.stack([
                    per_place([r > t for r in on_val], [val[i] for i in kept])[0].sum(0)
                    for t in TUNED
                ]) if kept else np.zeros((len(TUNED), 3))  # fmt: skip
                self.held_out_places[row] = len(kept)
        if args.bpr != "none":
            bpr, prn = (load_cached(str(Path(p).resolve()), file_sha256(p), str(args.device))
                        for p in (args.bpr, prns[0]))  # fmt: skip
            meta, base_cut = bpr.geoprn_meta, recorded_cut_off(read_header(args.base, "base"))
            for name, before in (("base + BPR", None), ("base + PRN + BPR", prn)):
                model = BoundaryRefiner(  # as refine runs it: alone, at the base's cut-off
                    bpr, before, meta["box"], meta["input_size"], meta["nms_iou"], cut_off=base_cut
                )
                preds, seconds, boxes = timed_predictions(
                    model, probs, test, args.batch_size, args.device, args.precision
                )
                rows[name] = per_place([r > 0.5 for r in preds], test)
                km2 = sum(int(t.valid.sum()) for t in test) * 1e-6
                self.bpr_seconds.append((name, seconds, boxes, km2))
        rows["patch-optimal oracle (P = 64)"] = per_place(
            [oracle(p, t, 64) for p, t in zip(probs, test, strict=True)], test
        )
        self.rows = rows

    def add_tuned(self, row: str, tau: float) -> None:
        """The row of PRN ``row`` binarised at ``tau`` instead of 0.5, before the oracle."""
        oracle_row = self.rows.pop("patch-optimal oracle (P = 64)")
        name = f"{row} @ {tau:.2f}, tuned on its held-out val places"
        self.rows[name] = per_place([r > tau for r in self.refined[row]], self.test)
        self.rows["patch-optimal oracle (P = 64)"] = oracle_row


TUNED = [float(t) for t in THRESHOLDS]
"""The thresholds a PRN's cut-off is tuned over, as the base model's."""


def tune_refiners(sets: dict[str, SetScores]) -> dict[str, tuple[float, float, int]]:
    """Each PRN row's one threshold, best on the val places held out of its training (the
    validation share ``trained_on.val_tiles`` records), pooled over every set scored, with
    the pooled road IoU it reaches there and on how many places; the row binarised at it is
    added to each set. PRNs recording no held-out places get none."""
    chosen = {}
    for row in next(iter(sets.values())).held_out:
        counts = sum(s.held_out[row] for s in sets.values())
        if counts.sum() == 0:
            continue
        iou = counts[:, 0] / np.maximum(counts.sum(1), 1)
        best = int(np.argmax(iou))
        places = sum(s.held_out_places[row] for s in sets.values())
        chosen[row] = (TUNED[best], float(iou[best]), places)
        for s in sets.values():
            s.add_tuned(row, TUNED[best])
    return chosen


def join_rows(tables: list[dict[str, tuple]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The rows of several sets' tables (same row names) over all their places."""
    return {
        row: tuple(np.concatenate([t[row][i] for t in tables]) for i in range(2))
        for row in tables[0]
    }


def concat(sets: list[SetScores]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The rows of several sets over all their places."""
    return join_rows([s.rows for s in sets])


def print_sets(rows: dict[str, dict[str, tuple]], reference: str = "base @ 0.5") -> None:
    """Each set's table (``rows``: set -> row -> per-place counts), then the Massachusetts
    sets pooled and all sets pooled; gains over row ``reference``."""
    for name, table in rows.items():
        print_table(f"**{name}**", table, reference)
    if all(name in rows for name in POOLED):
        pooled_rows = join_rows([rows[n] for n in POOLED])
        print_table(f"**{' + '.join(POOLED)}**", pooled_rows, reference)
    if len(rows) > 1:
        print_table(f"**all {len(rows)} sets**", join_rows(list(rows.values())), reference)


def print_table(
    title: str, rows: dict[str, tuple[np.ndarray, np.ndarray]], reference: str = "base @ 0.5"
) -> None:
    """The rows' pooled road IoU and mBA, and each one's gain over row ``reference`` with its
    90 % bootstrap interval over places."""
    base = rows[reference]
    print(f"\n{title}\n")
    print("| | road IoU | mBA | road IoU gain (90 % interval) | mBA gain (90 % interval) |")
    print("|---|---|---|---|---|")
    for name, (counts, boundary) in rows.items():
        s = pooled(counts, boundary)
        cells = [f"{100 * s['road IoU']:.2f}", f"{100 * s['mBA']:.2f}"]
        if name == reference:
            cells += ["", ""]
        else:
            for metric, i in (("road IoU", 0), ("mBA", 1)):
                gain, lo, hi = bootstrap_gain(base[i], (counts, boundary)[i], metric)
                verdict = "" if lo > 0 or hi < 0 else ", no gain"
                cells.append(f"{gain:+.2f} ({lo:+.2f} to {hi:+.2f}{verdict})")
        print(f"| {name} | " + " | ".join(cells) + " |")


def gain_record(
    rows,
    row: str,
    sets: dict[str, SetScores],
    args,
    base_sha: str,
    prn_sha: str | None,
    over: str = "base @ 0.5",
) -> dict:
    """The :class:`geoprn.gain.ValidatedGain` of ``row`` over row ``over``, on all places,
    after the base model averaged over ``args.symmetries``."""
    base = rows[over]
    road = bootstrap_gain(base[0], rows[row][0], "road IoU")
    mba = bootstrap_gain(base[1], rows[row][1], "mBA")
    return {
        "places": {f"{name} {args.split}": s.places for name, s in sets.items()},
        "base_sha256": base_sha,
        "prn_sha256": prn_sha,
        "base_symmetries": args.symmetries,
        "reference": "the base model at 0.5" if over == "base @ 0.5" else over,
        "base_road_iou": round(100 * pooled(*base)["road IoU"], 3),
        "refined_road_iou": round(100 * pooled(*rows[row])["road IoU"], 3),
        "road_iou_gain": round(road[0], 3),
        "road_iou_interval": (round(road[1], 3), round(road[2], 3)),
        "mba_gain": round(mba[0], 3),
        "mba_interval": (round(mba[1], 3), round(mba[2], 3)),
        "measured_by": "python benchmarks/prn_accuracy.py " + shlex.join(sys.argv[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probability_options(parser, "test")
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated labelled sets")
    parser.add_argument(
        "--prn", action="append", help="repeatable (default: the shipped PRN); 'none': no PRN row"
    )
    parser.add_argument("--rules", default="mean,union", help="PRN branch rules to score")
    parser.add_argument(
        "--prn-symmetries", type=int, choices=SYMMETRIES, default=1,
        help="average each PRN over this many window symmetries too",
    )  # fmt: skip
    parser.add_argument("--bpr", default=str(DEFAULT_BPR), help="'none' leaves the BPR rows out")
    parser.add_argument(
        "--record", action="store_true", help="store the gain over all places in the checkpoints"
    )
    parser.add_argument(
        "--record-bpr", action="store_true",
        help="store BPR's gain alone; the base model's and the PRN's records stay as they are",
    )  # fmt: skip
    args = parser.parse_args()
    prns = [] if args.prn == ["none"] else args.prn or [str(DEFAULT_PRN)]
    if not prns and args.bpr != "none":
        parser.error("--prn none needs --bpr none (BPR runs after the first PRN)")
    if args.split != "test" and (args.record or args.record_bpr):
        parser.error(f"--record{'-bpr' * args.record_bpr} measures on test places only")
    if args.record and args.prn_symmetries > 1:
        parser.error("--record stores what refine runs: a PRN in one pass (no --prn-symmetries)")
    if args.record_bpr and args.bpr == "none":
        parser.error("--record-bpr needs a BPR")
    rules = args.rules.split(",")
    args.device = resolve_device(args.device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        sets = {
            name: SetScores(args, name, prns, rules, Path(folder)) for name in args.sets.split(",")
        }
        tuned_on_val = tune_refiners(sets)
        tuned = {row: tau for row, (tau, _, _) in tuned_on_val.items()}
    print(
        f"{args.split} places: "
        + ", ".join(f"{name} {s.places}" for name, s in sets.items())
        + f"; base {Path(args.base).name}, PRN {', '.join(Path(p).name for p in prns) or 'none'}"
        + f" (× {args.prn_symmetries} symmetries)" * (args.prn_symmetries > 1)
        + f", BPR {Path(args.bpr).name}; device {args.device}, "
        f"{autocast_dtype(args.device, args.precision) or 'fp32'}; "
        f"{time.perf_counter() - started:.0f} s"
    )
    for row, (tau, iou, places) in tuned_on_val.items():
        print(
            f"{row}: threshold {tau:.2f}, best on the {places} val places held out of its "
            f"training (road IoU {100 * iou:.2f} there)"
        )
    for name, s in sets.items():
        print_table(f"**{name}** ({s.places} places; tuned threshold {s.tau:.2f})", s.rows)
    if all(name in sets for name in POOLED):
        print_table(f"**{' + '.join(POOLED)}**", concat([sets[n] for n in POOLED]))
    everything = concat(list(sets.values()))
    if len(sets) > 1:
        print_table(f"**all {len(sets)} sets**", everything)
    for s in sets.values():
        for name, seconds, boxes, km2 in s.bpr_seconds:
            print(f"{name}: {boxes / km2:.0f} boxes/km², {seconds / km2:.1f} s/km² at 1 m")
    averaged = f"base, {args.symmetries} symmetries"
    if averaged in tuned:
        averaged = f"{averaged} @ {tuned[averaged]:.2f}, tuned on its held-out val places"
        if prns:  # each refiner place by place against what runs without it
            if all(name in sets for name in POOLED):
                title = f"**{' + '.join(POOLED)}, over the averaged map**"
                print_table(title, concat([sets[n] for n in POOLED]), averaged)
            print_table(f"**all {len(sets)} sets, over the averaged map**", everything, averaged)
    if args.record and args.symmetries > 1:  # the base model's map as refine makes it
        base_gain = gain_record(everything, averaged, sets, args, file_sha256(args.base), None)
        record_gain(args.base, base_gain, tuned[f"base, {args.symmetries} symmetries"],
                    args.symmetries)  # fmt: skip
        print(f"recorded in {args.base} ({averaged}): `geoprn info {args.base}`")
    if (args.record or args.record_bpr) and prns:
        base_sha, scored_sha = file_sha256(args.base), file_sha256(prns[0])
        rule = read_header(prns[0], "prn")["arguments"].get("rule", "mean")
        tag = "PRN" if len(prns) == 1 else f"PRN {Path(prns[0]).stem}"
        row, tau = f"base + {tag} ({rule})", tuned.get(f"base + {tag} ({rule})")
        if tau is not None:  # refine --threshold auto binarises at it: the gain recorded
            row = f"{row} @ {tau:.2f}, tuned on its held-out val places"
        over = averaged if args.symmetries > 1 else "base @ 0.5"  # what runs without it
        if args.record:
            record_gain(
                prns[0], gain_record(everything, row, sets, args, base_sha, None, over), tau
            )
            print(f"recorded in {prns[0]} ({row}): `geoprn info {prns[0]}`")
        if args.bpr != "none":  # over what runs without it, after the chain it trained on
            prn_sha = file_sha256(prns[0])  # recording rewrote the PRN's header: its new hash
            after_prn = (read_header(args.bpr, "bpr").get("prn") or {}).get("sha256") in (
                scored_sha,
                prn_sha,
            )
            bpr_row, over = ("base + PRN + BPR", row) if after_prn else ("base + BPR", None)
            record_gain(args.bpr, gain_record(
                everything, bpr_row, sets, args, base_sha, prn_sha if after_prn else None,
                over or "base @ 0.5",
            ))  # fmt: skip
            print(f"recorded in {args.bpr} ({bpr_row}, over {over or 'base @ 0.5'})")


if __name__ == "__main__":
    run_script(main)
