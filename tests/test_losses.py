"""The training losses on small hand-computed cases; nodata pixels count for nothing."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from geoprn.errors import InputError
from geoprn.losses import (
    EDGE_MIN,
    base_loss,
    edge_map,
    masked_bce,
    masked_boundary,
    masked_focal,
    masked_lovasz,
    masked_soft_dice,
    prn_branch_loss,
    prn_loss,
)
from geoprn.train import load_config
from tests.conftest import SMALL_BASE_RECIPE


def maps(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)


def test_focal_by_hand():
    logits = maps(0.0, math.log(3.0), math.log(3.0))  # p = 0.5, 0.75, 0.75
    target = maps(1.0, 1.0, 0.0)
    # -(1 - p_t)^2 log p_t with p_t = 0.5, 0.75, 0.25
    expected = [0.25 * math.log(2), 0.0625 * -math.log(0.75), 0.5625 * -math.log(0.25)]
    ones = torch.ones_like(target)
    assert masked_focal(logits, target, ones).item() == pytest.approx(sum(expected) / 3, rel=1e-5)
    only_last = maps(0.0, 0.0, 1.0)
    assert masked_focal(logits, target, only_last).item() == pytest.approx(expected[2], rel=1e-5)
    # gamma = 0 is plain BCE
    assert masked_focal(logits, target, ones, gamma=0.0).item() == pytest.approx(
        masked_bce(logits, target, ones).item(), rel=1e-6
    )


def test_bce_by_hand_and_all_nodata_is_zero():
    logits, target = maps(0.0, math.log(3.0)), maps(1.0, 0.0)
    expected = (math.log(2) + -math.log(0.25)) / 2
    assert masked_bce(logits, target, torch.ones_like(target)).item() == pytest.approx(expected)
    assert masked_bce(logits, target, torch.zeros_like(target)).item() == 0.0


def test_lovasz_by_hand_per_crop_and_nodata_left_out():
    # hinge errors 1 - logit x sign: 0.5 on the road pixel, 1 on the background one. Sorted,
    # the Jaccard loss of {background wrong} is 1 - 1/2 and of both wrong 1, so the Lovász
    # extension is 1 x 0.5 + 0.5 x (1 - 0.5) = 0.75
    logits, target, ones = maps(0.5, 0.0), maps(1.0, 0.0), maps(1.0, 1.0)
    assert masked_lovasz(logits, target, ones).item() == pytest.approx(0.75)
    # a nodata pixel, whatever its logit and label, changes nothing
    valid = maps(1.0, 1.0, 0.0)
    assert masked_lovasz(maps(0.5, 0.0, 9.0), maps(1.0, 0.0, 0.0), valid).item() == pytest.approx(
        0.75
    )
    # one loss per crop, averaged: a crop predicted right (hinge errors below 0) adds 0
    right = torch.cat([logits, maps(2.0, -2.0)])
    assert masked_lovasz(right, torch.cat([target, target]), torch.cat([ones, ones])).item() == (
        pytest.approx(0.75 / 2)
    )


def test_base_loss_adds_the_lovasz_hinge_only_when_weighted():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.7).float()
    valid = torch.ones_like(target)
    bce_dice = masked_bce(logits, target, valid) + 0.5 * masked_soft_dice(logits, target, valid)
    assert base_loss(logits, target, valid, 0.5).item() == pytest.approx(bce_dice.item())
    with_lovasz = base_loss(logits, target, valid, 0.5, lovasz_weight=2.0).item()
    expected = bce_dice.item() + 2.0 * masked_lovasz(logits, target, valid).item()
    assert with_lovasz == pytest.approx(expected)


def test_recipes_weigh_the_lovasz_hinge(tmp_path):
    assert load_config("base_unet_mnv2")["lovasz_weight"] == 0.0  # off in the shipped recipe
    assert (
        load_config("base_unet_mnv2", lovasz_weight=1.0)["lovasz_weight"] == 1.0
    )  # --lovasz-weight
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**SMALL_BASE_RECIPE, "lovasz_weight": -1}))
    with pytest.raises(InputError, match="lovasz_weight"):
        load_config(path)


def bf16(value: float) -> float:
    """``value`` rounded to bf16."""
    return torch.tensor(value).bfloat16().item()


def test_edge_map_of_a_dot_and_of_flat_maps():
    dot = torch.zeros(1, 1, 5, 5)
    dot[0, 0, 2, 2] = 1.0
    edges = edge_map(dot)[0, 0]  # in bf16: tanh(4) rounds to 1, tanh(1) to 0.76171875
    assert edges.dtype == torch.float32
    assert edges[2, 2].item() == bf16(math.tanh(4.0)) == 1.0
    for y, x in ((1, 2), (3, 2), (2, 1), (2, 3)):
        assert edges[y, x].item() == bf16(math.tanh(1.0)) == 0.76171875
    assert edges[0, 0].item() == 0.0 and edges[1, 1].item() == 0.0
    # replicate padding: a flat map has no edge anywhere, the tile border included
    assert edge_map(torch.ones(1, 1, 4, 4)).abs().max().item() == 0.0


def test_boundary_loss_by_hand():
    dot = torch.zeros(1, 1, 5, 5)
    dot[0, 0, 2, 2] = 1.0
    flat_logits = torch.zeros_like(dot)  # sigmoid 0.5 everywhere: no predicted edge (1e-6)
    big, small = -math.log(EDGE_MIN), -math.log(1.0 - EDGE_MIN)
    bce = lambda t: t * big + (1.0 - t) * small  # noqa: E731
    centre, neighbour = bce(bf16(math.tanh(4.0))), bce(bf16(math.tanh(1.0)))
    ones = torch.ones_like(dot)
    assert masked_boundary(flat_logits, dot, ones).item() == pytest.approx(
        (centre + 4 * neighbour + 20 * small) / 25, rel=1e-5
    )
    valid = ones.clone()
    valid[0, 0, 2, 2] = 0.0
    assert masked_boundary(flat_logits, dot, valid).item() == pytest.approx(
        (4 * neighbour + 20 * small) / 24, rel=1e-5
    )
    # a prediction whose edges match the target's costs far less than a flat one
    sharp = (dot * 2 - 1) * 20.0
    assert masked_boundary(sharp, dot, ones) < 0.2 * masked_boundary(flat_logits, dot, ones)


def test_boundary_loss_is_finite_on_saturated_maps_under_bf16_autocast():
    # a near-0/1 prediction (a strongly biased map) has edges that round to exactly 1 in bf16,
    # where the loss's log(1 - p) was infinite and PRN training skipped every batch
    torch.manual_seed(0)
    target = (torch.rand(2, 1, 32, 32) > 0.7).float()
    logits = (target * 2 - 1) * 30.0 + torch.randn_like(target)
    logits[..., :8, :8] *= -1  # a wrong patch, so the loss has something to count
    ones = torch.ones_like(target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = masked_boundary(logits.requires_grad_(), target, ones)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_boundary_loss_and_its_gradient_are_the_same_in_float32_and_under_bf16_autocast():
    # the term PRN learns from must not depend on the machine's precision: bf16's edge maps
    # (faint edges 0, no gradient) in both; exact edges' gradient swamped the others in float32
    torch.manual_seed(0)
    target = (torch.rand(2, 1, 32, 32) > 0.7).float()
    logits = target * 4 - 2 + torch.randn_like(target)
    ones = torch.ones_like(target)
    results = []
    for autocast in (False, True):
        x = logits.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = masked_boundary(x, target, ones)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (loss32, grad32), (loss16, grad16) = results
    torch.testing.assert_close(loss16, loss32)
    torch.testing.assert_close(grad16, grad32)


def test_prn_loss_composition_and_nodata_gradient():
    torch.manual_seed(0)
    shape = (2, 1, 16, 16)
    global_logits = torch.randn(shape, requires_grad=True)
    local_logits = torch.randn(shape, requires_grad=True)
    pseudo = (torch.rand(shape) > 0.7).float()
    truth = (torch.rand(shape) > 0.7).float()
    valid = torch.ones(shape)
    valid[..., :4] = 0.0
    branch = prn_branch_loss(global_logits, pseudo, truth, valid)
    by_hand = 0.7 * (
        masked_focal(global_logits, pseudo, valid) + masked_boundary(global_logits, pseudo, valid)
    ) + 0.3 * masked_bce(global_logits, truth, valid)
    assert branch.item() == pytest.approx(by_hand.item(), rel=1e-6)
    total = prn_loss(global_logits, local_logits, pseudo, truth, valid)
    assert total.item() == pytest.approx(
        branch.item() + prn_branch_loss(local_logits, pseudo, truth, valid).item(), rel=1e-6
    )
    total.backward()
    # nodata columns 0-3 get no gradient except through the Laplacian of column 4 (its
    # neighbour), so columns 0-2 get none at all
    assert global_logits.grad[..., :3].abs().max().item() == 0.0
    assert global_logits.grad[..., 5:].abs().max().item() > 0.0
