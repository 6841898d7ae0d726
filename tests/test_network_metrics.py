"""Completeness / correctness / quality and APLS: hand-computed cases, and on real OSM roads
against an independent computation (points every 10 cm and a k-d tree)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely
from scipy.spatial import cKDTree
from shapely import LineString

from geoprn.evaluate_inputs import Grid, open_labels
from geoprn.network_metrics import LengthCounts, apls, length_counts
from tests.conftest import SAMPLE_SCENE, SHARED_DATA

STREET = [LineString([(0, 0), (100, 0)])]
CROSS = [LineString([(0, 0), (100, 0)]), LineString([(50, -50), (50, 50)])]


def test_identical_networks_score_one():
    counts = length_counts(CROSS, CROSS)
    assert counts.completeness == counts.correctness == counts.quality == 1.0
    assert apls(CROSS, CROSS).score == 1.0


def test_partial_road_by_hand():
    # The first 60 m found: the 5 m buffer round its end covers 65 m of the reference.
    counts = length_counts(STREET, [LineString([(0, 0), (60, 0)])], buffer_m=5)
    assert counts.reference == pytest.approx(100) and counts.predicted == pytest.approx(60)
    assert counts.completeness == pytest.approx(0.65)
    assert counts.correctness == pytest.approx(1.0)
    assert counts.quality == pytest.approx(60 / (60 + 35))
    # APLS: reference control points at 0, 50, 100 m; 100 has no counterpart within 4 m, so
    # two of three paths are missing: 1/3. Onto the reference every path is exact: 1.
    result = apls(STREET, [LineString([(0, 0), (60, 0)])])
    assert result.gt_onto_prop == pytest.approx(1 / 3)
    assert result.prop_onto_gt == pytest.approx(1.0)
    assert result.score == pytest.approx(0.5)  # harmonic mean


def test_buffer_decides_a_shifted_road():
    shifted = [LineString([(0, 3), (100, 3)])]
    assert length_counts(STREET, shifted, buffer_m=5).quality == pytest.approx(1.0)
    far = length_counts(STREET, [LineString([(0, 6), (100, 6)])], buffer_m=5)
    assert far.completeness == far.correctness == far.quality == 0.0
    assert apls(STREET, shifted).score == pytest.approx(1.0)  # within the 4 m snap


def test_region_counts_inside_but_matches_across():
    # Only the left half is counted; the prediction's right half still buffers it.
    region = shapely.box(0, -10, 50, 10)
    counts = length_counts(STREET, [LineString([(52, 0), (100, 0)])], 5, region)
    assert counts.reference == pytest.approx(50)
    assert counts.reference_matched == pytest.approx(3)
    assert counts.predicted == 0


def test_counts_add_up():
    a, b = LengthCounts(10, 5, 8, 4), LengthCounts(2, 1, 2, 2)
    assert sum([a, b]) == LengthCounts(12, 6, 10, 6)


def test_apls_missing_branch_by_hand():
    # Reference control points: the junction, four 50 m arm ends; 10 pairs. The proposal lacks
    # the vertical arms: 7 pairs lose a node (1 each), 3 are exact: 0.3 one way, 1 the other.
    result = apls(CROSS, [CROSS[0]])
    assert result.gt_onto_prop == pytest.approx(0.3)
    assert result.prop_onto_gt == pytest.approx(1.0)
    assert result.score == pytest.approx(2 * 0.3 / 1.3)


def test_apls_a_gap_breaks_every_route():
    gap = [LineString([(0, 0), (45, 0)]), LineString([(55, 0), (100, 0)])]
    result = apls(STREET, gap)
    assert result.gt_onto_prop == 0.0 and result.prop_onto_gt == 1.0
    assert result.score == 0.0


def test_apls_detour_by_hand():
    # A 100 m street predicted as a detour 0 -> (50, 3) -> 100 (2 x 50.09 m). The reference
    # midpoint (50, 0) snaps to its projection on the first leg, 2500 / 50.09 m along it.
    detour = [LineString([(0, 0), (50, 3), (100, 0)])]
    leg = math.hypot(50, 3)
    at = 2500 / leg
    result = apls(STREET, detour)
    diffs = [abs(50 - at) / 50, abs(50 - (2 * leg - at)) / 50, (2 * leg - 100) / 100]
    assert result.gt_onto_prop == pytest.approx(1 - np.mean(diffs), abs=1e-6)


def test_apls_edge_cases():
    assert math.isnan(apls([], []).score)
    assert apls(STREET, []).score == 0.0
    assert apls([], STREET).score == 0.0
    assert math.isnan(apls([LineString([(0, 0), (8, 0)])], []).score)  # paths under 10 m
    a = [LineString([(0, 0), (80, 0), (80, 70)])]
    assert apls(a, CROSS).score == pytest.approx(apls(CROSS, a).score)  # symmetric


def _osm_lines() -> list[shapely.Geometry]:
    """The sample scene's OpenStreetMap centrelines in the metres frame."""
    import rasterio

    with rasterio.open(SAMPLE_SCENE) as ds:
        grid = Grid(ds.height, ds.width, ds.transform, ds.crs)
    labels = open_labels(SHARED_DATA / "spacenet" / "paris_img1447_osm_roads.geojson", grid)
    return labels.lines_m


def _points(line: shapely.LineString, step: float) -> np.ndarray:
    """Points every ``step`` metres along a line, both ends included."""
    n = max(2, int(line.length / step) + 1)
    return shapely.get_coordinates(
        shapely.line_interpolate_point(line, np.linspace(0, line.length, n))
    )


def _matched(lines, other, buffer_m: float) -> tuple[float, float]:
    """Length, and length within buffer_m of ``other``, by sampling points every 10 cm."""
    total = matched = 0.0
    parts = shapely.get_parts(np.asarray(other, dtype=object))
    tree = cKDTree(np.concatenate([_points(g, 0.05) for g in parts]))
    for line in shapely.get_parts(np.asarray(lines, dtype=object)):
        pts = _points(line, 0.1)
        n = len(pts)
        near = tree.query(pts)[0] <= buffer_m
        seg = line.length / (n - 1)
        total += line.length
        matched += seg * (near[:-1] & near[1:]).sum() + seg * 0.5 * (near[:-1] ^ near[1:]).sum()
    return total, matched


def test_length_counts_match_an_independent_computation_on_osm_roads():
    reference = _osm_lines()
    assert sum(g.length for g in reference) > 300  # real data, hundreds of metres
    # A prediction: the roads shifted 3 m east, every third one missed, one false road.
    predicted = [shapely.affinity.translate(g, 3, 1) for i, g in enumerate(reference) if i % 3]
    predicted.append(LineString([(20, 20), (60, 25)]))
    counts = length_counts(reference, predicted, buffer_m=4)
    ref_total, ref_matched = _matched(reference, predicted, 4)
    pred_total, pred_matched = _matched(predicted, reference, 4)
    assert counts.reference == pytest.approx(ref_total, rel=1e-6)
    assert counts.completeness == pytest.approx(ref_matched / ref_total, abs=2e-3)
    assert counts.correctness == pytest.approx(pred_matched / pred_total, abs=2e-3)
    assert 0.2 < counts.completeness < 0.95 and counts.correctness < 1


def test_apls_on_osm_roads():
    reference = _osm_lines()
    assert apls(reference, reference).score == pytest.approx(1.0)
    fewer = apls(reference, reference[1:]).score
    assert 0 < fewer < 1
    shifted = [shapely.affinity.translate(g, 2, 0) for g in reference]
    assert apls(reference, shifted).score > fewer
