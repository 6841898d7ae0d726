"""Skeleton → graph → centrelines: the tracing and cleaning behind :mod:`geoprn.vectorize`.

A block of the road mask, read with a halo of context, has holes of a few pixels filled and is
thinned to a one-pixel skeleton (scikit-image). Skeleton pixels with two neighbours are *path*
pixels; the others are *nodes*: ends (one neighbour) and junctions (three or more), where
8-connected node pixels form one node at their centroid. A block traces the paths through the
pixels it owns into pieces; a piece ends at a node or where its path leaves the block, as the
pair (last pixel, next pixel). Pieces cut at block borders are joined by matching those pairs:
a road crossing a border becomes one line again, with nothing doubled or lost, whatever the
block size.

Then the graph is cleaned: spurs (an end joined to a junction) and isolated lines shorter
than ``min_length_m`` are dropped, lines meeting at a node of degree two are merged (one
feature per edge between junctions or ends), and lines are simplified with a tolerance in
metres (Douglas-Peucker, shapely). Lengths are measured in metres along the simplified line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from scipy import ndimage
from skimage.morphology import skeletonize

from geoprn.tiling import Range

HOLE_AREA = 64
"""Holes in the road mask smaller than this (in pixels) are filled before thinning, so a
speckle inside a road does not split its centreline into a loop."""
EIGHT = np.ones((3, 3), bool)

Reader = Callable[[Range, Range], tuple[np.ndarray, np.ndarray | None]]
"""Reads rows × cols of a scene (pixels outside it read as background): road mask (bool)
and road probability (float, NaN unknown) or None."""


@dataclass(frozen=True)
class RoadNetwork:
    """Road centrelines of a scene, in its CRS (pixel coordinates when it has none)."""

    lines: list[shapely.LineString]
    length_m: np.ndarray
    mean_probability: np.ndarray
    road_id: list[str]
    crs: CRS | None

    @property
    def total_length_m(self) -> float:
        return float(self.length_m.sum())


@dataclass
class _Piece:
    """A run of path pixels traced inside one block: (n, 2) scene (row, col) coordinates.

    Each end is ``("node", key, row, col)``, ``("open", pixel, next_pixel)`` (the path goes on
    in another block; both as linear scene indices) or ``("ring",)`` for a closed loop.
    """

    pixels: np.ndarray
    ends: list[tuple]
    prob_sum: float
    prob_count: int


@dataclass
class _Edge:
    """A line of the assembled graph: (row, col) vertices and the nodes at its ends."""

    coords: np.ndarray
    nodes: list[object]
    prob_sum: float
    prob_count: int
    npixels: int
    metric: shapely.LineString | None = None
    """The simplified line in metres (see :func:`_metric_line`), once measured."""


# ---------------------------------------------------------------------------------------------
# Tracing one block


def trace_block(
    read: Reader, rows: Range, cols: Range, scene_width: int, halo: int
) -> list[_Piece]:
    """The pieces of skeleton path owned by one block (rows × cols), read with a halo."""
    top, left = rows[0] - halo, cols[0] - halo
    road, probs = read((top, rows[1] + halo), (left, cols[1] + halo))
    skeleton = skeletonize(_fill_small_holes(road))
    degree = ndimage.convolve(skeleton.astype(np.uint8), EIGHT.astype(np.uint8), mode="constant")
    degree = np.where(skeleton, degree.astype(np.int16) - 1, 0)
    skeleton &= degree > 0
    node = skeleton & (degree != 2)
    core = np.zeros_like(skeleton)
    core[halo : halo + rows[1] - rows[0], halo : halo + cols[1] - cols[0]] = True
    paths, count = ndimage.label(skeleton & (degree == 2) & core, EIGHT)
    if count == 0:
        return []
    node_of = _node_keys(node, top, left, scene_width)

    def linear(r: int, c: int) -> int:
        return (r + top) * scene_width + (c + left)

    pieces = []
    for label, box in enumerate(ndimage.find_objects(paths), start=1):
        rr, cc = np.nonzero(paths[box] == label)
        members = set(zip((rr + box[0].start).tolist(), (cc + box[1].start).tolist(), strict=True))
        ordered = _walk(members)
        ends = []
        for tip in (ordered[0], ordered[-1]) if len(ordered) > 1 else (ordered[0],):
            for q in _neighbours(tip, skeleton):
                if q in members:
                    continue
                if node[q]:
                    ends.append(("node", *node_of[q]))
                else:
                    ends.append(("open", linear(*tip), linear(*q)))
        if not ends:
            ends = [("ring",), ("ring",)]
        if len(ends) != 2:
            continue  # not a simple path (cannot happen on a thinned skeleton); skip safely
        pr, pc = np.array(ordered).T
        values = None if probs is None else probs[pr, pc]
        known = 0 if values is None else int(np.count_nonzero(~np.isnan(values)))
        pieces.append(
            _Piece(
                pixels=np.stack([pr + top, pc + left], axis=1).astype(np.int64),
                ends=ends,
                prob_sum=0.0 if values is None else float(np.nansum(values, dtype=np.float64)),
                prob_count=known,
            )
        )
    return pieces


def _fill_small_holes(road: np.ndarray) -> np.ndarray:
    """Fill background specks smaller than HOLE_AREA enclosed by road (not at the window edge)."""
    holes, count = ndimage.label(~road)
    if count == 0:
        return road
    sizes = np.bincount(holes.ravel(), minlength=count + 1)
    edge = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    small = sizes < HOLE_AREA
    small[edge] = False
    small[0] = False
    return road | small[holes]


def _node_keys(node: np.ndarray, top: int, left: int, width: int) -> dict:
    """For each node pixel (window coordinates): its node's key and centroid in the scene.

    A node is an 8-connected cluster of node pixels; its key is its first pixel's linear
    scene index, the same from whichever block it is seen.
    """
    labels, count = ndimage.label(node, EIGHT)
    rr, cc = np.nonzero(labels)
    ids = labels[rr, cc]
    index = (rr + top).astype(np.int64) * width + (cc + left)
    first = np.full(count + 1, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first, ids, index)
    n = np.bincount(ids, minlength=count + 1).astype(np.float64)
    mean_r = np.bincount(ids, weights=rr + top, minlength=count + 1) / np.maximum(n, 1)
    mean_c = np.bincount(ids, weights=cc + left, minlength=count + 1) / np.maximum(n, 1)
    return {
        (r, c): (int(first[i]), float(mean_r[i]), float(mean_c[i]))
        for r, c, i in zip(rr.tolist(), cc.tolist(), ids.tolist(), strict=True)
    }


OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _neighbours(pixel: tuple[int, int], skeleton: np.ndarray) -> list[tuple[int, int]]:
    r, c = pixel
    h, w = skeleton.shape
    return [
        (r + dr, c + dc)
        for dr, dc in OFFSETS
        if 0 <= r + dr < h and 0 <= c + dc < w and skeleton[r + dr, c + dc]
    ]


def _walk(members: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """Order the pixels of a simple path (or ring) from one end to the other."""

    def inside(p: tuple[int, int]) -> list[tuple[int, int]]:
        return [(p[0] + dr, p[1] + dc) for dr, dc in OFFSETS if (p[0] + dr, p[1] + dc) in members]

    start = min((p for p in members if len(inside(p)) < 2), default=min(members))
    ordered, previous, current = [start], None, start
    while True:
        step = [q for q in inside(current) if q != previous and q != start]
        if not step or len(ordered) == len(members):
            return ordered
        previous, current = current, step[0]
        ordered.append(current)


# ---------------------------------------------------------------------------------------------
# Assembling the graph


def _assemble(pieces: list[_Piece]) -> list[_Edge]:
    """Join pieces across block borders into edges between nodes (or rings)."""
    by_open = {}
    for i, piece in enumerate(pieces):
        for side, end in enumerate(piece.ends):
            if end[0] == "open":
                by_open[(end[1], end[2])] = (i, side)

    def node_of(end: tuple) -> object:
        if end[0] == "node":
            return end[1]
        return ("tip", end[1])  # a path cut off where the other block saw no continuation

    def follow(i: int, entry: int, visited: set[int]) -> tuple[list[tuple[int, bool]], tuple]:
        chain = []
        while True:
            visited.add(i)
            forward = entry == 0
            chain.append((i, forward))
            exit_end = pieces[i].ends[1 - entry]
            if exit_end[0] != "open":
                return chain, exit_end
            match = by_open.get((exit_end[2], exit_end[1]))
            if match is None or match[0] in visited:
                return chain, exit_end
            i, entry = match

    edges, visited = [], set()
    for i, piece in enumerate(pieces):
        if i in visited:
            continue
        starts = [
            s for s, e in enumerate(piece.ends) if e[0] != "open" or (e[2], e[1]) not in by_open
        ]
        if piece.ends[0][0] == "ring":
            edges.append(_edge([(i, True)], pieces, piece.ends[0], piece.ends[1]))
            visited.add(i)
        elif starts:
            chain, last = follow(i, starts[0], visited)
            edges.append(_edge(chain, pieces, piece.ends[starts[0]], last, node_of))
    for i in range(len(pieces)):
        if i not in visited:  # a ring cut by block borders: every end matched
            chain, last = follow(i, 0, visited)
            edges.append(_edge(chain, pieces, ("ring",), ("ring",)))
    return edges


def _edge(chain, pieces, first: tuple, last: tuple, node_of=None) -> _Edge:
    parts = [pieces[i].pixels if forward else pieces[i].pixels[::-1] for i, forward in chain]
    coords = np.concatenate(parts).astype(np.float64)
    if first[0] == "ring":  # start at the ring's first pixel, whichever block it was cut by
        start = np.lexsort((coords[:, 1], coords[:, 0]))[0]
        coords = np.roll(coords, -start, axis=0)
        coords = np.vstack([coords, coords[:1]])
    if first[0] == "node":
        coords = np.vstack([[first[2], first[3]], coords])
    if last[0] == "node":
        coords = np.vstack([coords, [last[2], last[3]]])
    nodes = [None, None] if node_of is None else [node_of(first), node_of(last)]
    return _Edge(
        coords=coords,
        nodes=nodes,
        prob_sum=sum(pieces[i].prob_sum for i, _ in chain),
        prob_count=sum(pieces[i].prob_count for i, _ in chain),
        npixels=sum(len(pieces[i].pixels) for i, _ in chain),
    )


def _clean(edges: list[_Edge], min_length: float) -> list[_Edge]:
    """Drop short spurs and isolated bits, then merge edges through nodes of degree two."""
    degree: dict[object, int] = {}
    for edge in edges:
        for node in edge.nodes:
            if node is not None:
                degree[node] = degree.get(node, 0) + 1

    def keep(edge: _Edge) -> bool:
        if edge.metric.length >= min_length:
            return True
        a, b = edge.nodes
        if a is None or a == b:
            return False  # a short ring or a small loop at a junction
        return degree[a] > 1 and degree[b] > 1  # short links between junctions stay

    edges = [e for e in edges if keep(e)]
    return _merge_through(edges)


def _merge_through(edges: list[_Edge]) -> list[_Edge]:
    """Merge pairs of edges that meet at a node no other edge touches."""
    at: dict[object, list[_Edge]] = {}
    for edge in edges:
        for node in edge.nodes:
            if node is not None:
                at.setdefault(node, []).append(edge)
    alive = {id(e): e for e in edges}
    for node in sorted(at, key=str):
        touching = [e for e in at[node] if id(e) in alive]
        if len(touching) != 2 or touching[0] is touching[1]:
            continue
        a, b = touching
        a_coords = a.coords if a.nodes[1] == node else a.coords[::-1]
        b_coords = b.coords if b.nodes[0] == node else b.coords[::-1]
        a_far = a.nodes[0] if a.nodes[1] == node else a.nodes[1]
        b_far = b.nodes[1] if b.nodes[0] == node else b.nodes[0]
        merged = _Edge(
            coords=np.vstack([a_coords, b_coords[1:]]),
            nodes=[a_far, b_far],
            prob_sum=a.prob_sum + b.prob_sum,
            prob_count=a.prob_count + b.prob_count,
            npixels=a.npixels + b.npixels,
        )
        del alive[id(a)], alive[id(b)]
        alive[id(merged)] = merged
        for far in (a_far, b_far):
            if far is not None:
                at[far] = [merged if e is a or e is b else e for e in at[far]]
    return list(alive.values())


def network(
    pieces: list[_Piece],
    transform: Affine,
    crs: CRS | None,
    pixel_size: tuple[float, float],
    simplify_m: float,
    min_length_m: float,
    width: int,
) -> RoadNetwork:
    """Assemble, clean, simplify and georeference the traced pieces."""
    py, px = pixel_size
    edges = _assemble(pieces)
    for edge in edges:
        edge.metric = _metric_line(edge.coords, py, px, simplify_m)
    edges = _clean(edges, min_length_m)
    rows = []
    for edge in edges:
        metric = edge.metric or _metric_line(edge.coords, py, px, simplify_m)  # merged: new
        xy = shapely.get_coordinates(metric) / [px, py] + 0.5  # (col, row) of pixel centres
        if _key(xy[-1]) < _key(xy[0]):
            xy = xy[::-1]
        x, y = rasterio.transform.xy(transform, xy[:, 1], xy[:, 0], offset="ul")
        mean = edge.prob_sum / edge.prob_count if edge.prob_count else np.nan
        ident = hashlib.blake2b(
            np.round(xy[[0, -1]], 3).tobytes() + str(edge.npixels).encode(), digest_size=8
        ).hexdigest()
        rows.append((shapely.LineString(np.stack([x, y], axis=1)), metric.length, mean, ident))
    rows.sort(key=lambda row: row[3])
    return RoadNetwork(
        lines=[r[0] for r in rows],
        length_m=np.array([r[1] for r in rows], np.float64),
        mean_probability=np.array([r[2] for r in rows], np.float32),
        road_id=[r[3] for r in rows],
        crs=crs,
    )


def _key(point: np.ndarray) -> tuple[float, float]:
    return (round(float(point[1]), 6), round(float(point[0]), 6))


def _metric_line(coords: np.ndarray, py: float, px: float, tolerance: float) -> shapely.LineString:
    """The (row, col) polyline in metres (x = col · px, y = row · py), simplified."""
    xy = np.stack([coords[:, 1] * px, coords[:, 0] * py], axis=1)
    if len(xy) == 1:
        xy = np.vstack([xy, xy])
    return shapely.simplify(shapely.LineString(xy), tolerance)
