"""Road-network metrics of centrelines: completeness, correctness, quality, and APLS.

Every geometry is in one planar frame in metres (:mod:`geoprn.evaluate` maps pixel coordinates
to it), so buffers and lengths are metres whatever the raster's CRS.

**Completeness, correctness, quality** (Wiedemann, Heipke, Mayer and Jamet, "Empirical
evaluation of automatically extracted road axes", 1998). A piece of a line is *matched* when it
lies within ``buffer`` metres of the other network::

    completeness = matched reference length / reference length
    correctness  = matched predicted length / predicted length
    quality      = matched predicted length / (predicted length + unmatched reference length)

Lengths add up over the parts of a scene (:class:`LengthCounts` adds with ``+``).

**APLS**, Average Path Length Similarity (Van Etten, Lindenbaum and Bacastow, "SpaceNet: A
Remote Sensing Dataset and Challenge Series", 2018; the SpaceNet 3 road metric). Each network
becomes a graph: lines are split where they cross, and *control points* are added along every
edge so that none are more than ``spacing`` apart (SpaceNet: 50 m). Going from graph G onto
graph H, every control point of G is snapped to the nearest point of H within ``snap`` metres
(SpaceNet: 4 m) and inserted there as a node of H; a control point with nothing that close has
no counterpart. For every pair (a, b) of G's control points joined by a path of length
``L(a, b) >= min_path`` (SpaceNet: 10 m), the path difference is
``min(1, |L(a, b) - L(a', b')| / L(a, b))``, and 1 when a' or b' does not exist or no path joins
them in H. ``APLS(G -> H) = 1 - mean difference``. The score is symmetric, the harmonic mean of
``APLS(gt -> prop)`` (penalises missed and broken roads) and ``APLS(prop -> gt)`` (penalises
false roads), 0 when either is 0 or undefined, as SpaceNet's reference code scores it; it is
undefined (NaN) when neither graph holds a path. Shortest paths: scipy.sparse.csgraph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import dijkstra
from shapely.ops import substring

from geoprn.metrics import Counts

BUFFER_M = 5.0
"""Default matching buffer of completeness / correctness / quality, in metres."""
SNAP_M = 4.0
"""APLS: a control point finds its counterpart within this distance (SpaceNet's 4 m)."""
SPACING_M = 50.0
"""APLS: control points lie at most this far apart along an edge (SpaceNet's 50 m)."""
MIN_PATH_M = 10.0
"""APLS: paths shorter than this are not scored (SpaceNet's 10 m)."""


def _ratio(num: float, den: float) -> float:
    """``num / den``, or 1.0 when ``den`` is 0 (nothing to find and nothing found)."""
    return num / den if den > 0 else 1.0


@dataclass(frozen=True)
class LengthCounts(Counts):
    """Reference and predicted centreline lengths (metres), in all and within the buffer."""

    reference: float = 0.0
    reference_matched: float = 0.0
    predicted: float = 0.0
    predicted_matched: float = 0.0

    @property
    def completeness(self) -> float:
        """Share of the reference length found; 1.0 when there is no reference."""
        return _ratio(self.reference_matched, self.reference)

    @property
    def correctness(self) -> float:
        """Share of the predicted length that is right; 1.0 when nothing is predicted."""
        return _ratio(self.predicted_matched, self.predicted)

    @property
    def quality(self) -> float:
        """Matched predicted length over predicted plus missed reference length."""
        missed = self.reference - self.reference_matched
        return _ratio(self.predicted_matched, self.predicted + missed)


def _union(lines: Sequence[shapely.Geometry]) -> shapely.Geometry:
    """One (Multi)LineString of the lines, overlaps dissolved."""
    return shapely.union_all(np.asarray(lines, dtype=object)) if len(lines) else shapely.Point()


def length_counts(
    reference: Sequence[shapely.Geometry],
    predicted: Sequence[shapely.Geometry],
    buffer_m: float = BUFFER_M,
    region: shapely.Geometry | None = None,
) -> LengthCounts:
    """Centreline lengths of two networks, and how much of each lies within ``buffer_m`` of
    the other.

    Args:
        reference, predicted: (Multi)LineStrings in metres.
        buffer_m: matching distance in metres.
        region: lengths are counted inside this polygon only (a block of a scene, its valid
            part); lines outside it still match lines inside it. Everywhere when None.
    """
    ref, pred = _union(reference), _union(predicted)
    ref_in = ref if region is None else shapely.intersection(ref, region)
    pred_in = pred if region is None else shapely.intersection(pred, region)
    return LengthCounts(
        reference=ref_in.length,
        reference_matched=shapely.intersection(ref_in, shapely.buffer(pred, buffer_m)).length,
        predicted=pred_in.length,
        predicted_matched=shapely.intersection(pred_in, shapely.buffer(ref, buffer_m)).length,
    )


class _Graph:
    """An undirected graph of line pieces: node coordinates and (i, j, LineString) edges."""

    def __init__(self) -> None:
        self.coords: list[tuple[float, float]] = []
        self.edges: list[tuple[int, int, shapely.LineString]] = []
        self._index: dict[tuple[float, float], int] = {}

    def node(self, x: float, y: float) -> int:
        """The node at (x, y) (to the millimetre), added if new."""
        key = (round(x, 3), round(y, 3))
        if key not in self._index:
            self._index[key] = len(self.coords)
            self.coords.append((x, y))
        return self._index[key]

    def add(self, line: shapely.LineString) -> None:
        """Add a line as one edge between nodes at its ends."""
        if line.length > 0:
            (x0, y0), (x1, y1) = line.coords[0], line.coords[-1]
            self.edges.append((self.node(x0, y0), self.node(x1, y1), line))

    def distances(self, sources: np.ndarray | None = None) -> np.ndarray:
        """Shortest path lengths from ``sources`` (all nodes if None) to every node."""
        n = len(self.coords)
        best: dict[tuple[int, int], float] = {}
        for i, j, line in self.edges:
            if i != j:
                key = (min(i, j), max(i, j))
                best[key] = min(best.get(key, math.inf), line.length)
        if best:
            (rows, cols), weights = zip(*best.keys(), strict=True), list(best.values())
        else:
            rows, cols, weights = (), (), []
        matrix = coo_matrix((weights, (rows, cols)), shape=(n, n)).tocsr()
        return dijkstra(matrix, directed=False, indices=sources)


def _graph(lines: Sequence[shapely.Geometry], spacing_m: float) -> _Graph:
    """The graph of lines split where they cross, with control points every ``spacing_m``."""
    graph = _Graph()
    if not len(lines):
        return graph
    parts = [
        p
        for p in shapely.get_parts(np.asarray(lines, dtype=object))
        if p.geom_type == "LineString" and p.length > 0
    ]
    if not parts:
        return graph
    for piece in shapely.get_parts(shapely.node(shapely.multilinestrings(parts))):
        count = max(1, math.ceil(piece.length / spacing_m - 1e-9))
        step = piece.length / count
        for k in range(count):
            graph.add(substring(piece, k * step, (k + 1) * step))
    return graph


def _inject(graph: _Graph, points: np.ndarray, snap_m: float) -> tuple[_Graph, np.ndarray]:
    """``graph`` with nodes inserted at the points of its edges nearest to ``points``.

    Returns:
        The new graph, and each point's node in it (-1 when no edge is within ``snap_m``).
    """
    mapped = np.full(len(points), -1, np.int64)
    out = _Graph()
    for x, y in graph.coords:
        out.node(x, y)
    if not graph.edges or not len(points):
        for i, j, line in graph.edges:
            out.edges.append((i, j, line))
        return out, mapped
    lines = [line for _, _, line in graph.edges]
    tree = shapely.STRtree(lines)
    geoms = shapely.points(points)
    which, edge = tree.query_nearest(geoms, max_distance=snap_m, all_matches=False)
    cuts: dict[int, list[tuple[float, int]]] = {}
    for p, e in zip(which, edge, strict=True):
        cuts.setdefault(int(e), []).append((lines[e].project(geoms[p]), int(p)))
    for e, (i, j, line) in enumerate(graph.edges):
        if e not in cuts:
            out.edges.append((i, j, line))
            continue
        stops = sorted({0.0, line.length, *(t for t, _ in cuts[e])})
        nodes = []
        for t in stops:
            x, y = line.interpolate(t).coords[0]
            nodes.append(i if t == 0.0 else j if t == line.length else out.node(x, y))
        for a, b, n0, n1 in zip(stops, stops[1:], nodes, nodes[1:], strict=False):
            if b > a:
                out.edges.append((n0, n1, substring(line, a, b)))
        at = dict(zip(stops, nodes, strict=True))
        for t, p in cuts[e]:
            mapped[p] = at[t]
    return out, mapped


def _one_way(source: _Graph, target: _Graph, snap_m: float, min_path_m: float) -> float:
    """APLS(source -> target); NaN when ``source`` has no path of at least ``min_path_m``."""
    n = len(source.coords)
    if n < 2:
        return math.nan
    lengths = source.distances()
    upper = np.triu_indices(n, 1)
    truth = lengths[upper]
    scored = np.isfinite(truth) & (truth >= min_path_m)
    if not scored.any():
        return math.nan
    injected, mapped = _inject(target, np.asarray(source.coords), snap_m)
    found = np.full((n, n), np.inf)
    have = np.flatnonzero(mapped >= 0)
    if have.size:
        sources, row = np.unique(mapped[have], return_inverse=True)
        found[np.ix_(have, have)] = injected.distances(sources)[np.ix_(row, mapped[have])]
    other = found[upper][scored]
    truth = truth[scored]
    diff = np.where(np.isfinite(other), np.minimum(1.0, np.abs(truth - other) / truth), 1.0)
    return float(1.0 - diff.mean())


@dataclass(frozen=True)
class Apls:
    """APLS of a proposal against ground truth, and its two one-way scores."""

    score: float
    gt_onto_prop: float
    prop_onto_gt: float


def apls(
    reference: Sequence[shapely.Geometry],
    proposal: Sequence[shapely.Geometry],
    snap_m: float = SNAP_M,
    spacing_m: float = SPACING_M,
    min_path_m: float = MIN_PATH_M,
) -> Apls:
    """Average Path Length Similarity of two road networks (see the module docstring).

    Args:
        reference, proposal: (Multi)LineStrings in metres; lines are joined where they cross
            or share an end.
        snap_m: how far a control point looks for its counterpart.
        spacing_m: the most distance between control points along an edge.
        min_path_m: shorter paths are not scored.

    Returns:
        ``score`` in [0, 1] (NaN when neither network holds a path), and the one-way scores.
    """
    gt, prop = _graph(reference, spacing_m), _graph(proposal, spacing_m)
    forward = _one_way(gt, prop, snap_m, min_path_m)
    backward = _one_way(prop, gt, snap_m, min_path_m)
    if math.isnan(forward) and math.isnan(backward):
        score = math.nan
    elif math.isnan(forward) or math.isnan(backward) or min(forward, backward) <= 0:
        score = 0.0
    else:
        score = 2 * forward * backward / (forward + backward)
    return Apls(score, forward, backward)
