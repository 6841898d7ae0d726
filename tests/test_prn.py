"""PatchRefineNet: shapes, modes, size, gradients, exact patch locality, checkpoints.

Small inputs (128 or 256 px) keep this light on two CPU cores; one 512 x 512 forward pass
checks the production tile size.
"""

from __future__ import annotations

import json

import pytest
import torch

from geoprn.models.checkpoint import load_model, read_header, save_checkpoint
from geoprn.models.prn import PatchRefineNet


def probability_map(n: int, size: int, seed: int) -> torch.Tensor:
    """A probability-like (n, 1, size, size) map: smooth blobs plus noise, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, size // 16, size // 16, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    return (0.7 * smooth + 0.3 * torch.rand(n, 1, size, size, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def net() -> PatchRefineNet:
    torch.manual_seed(0)
    return PatchRefineNet(patch_size=32)


def test_parameter_count_is_near_the_papers():
    counts = {p: sum(t.numel() for t in PatchRefineNet(patch_size=p).parameters()) for p in (64,)}
    count = counts[64]
    print(f"PatchRefineNet(default) parameters: {count:,} (paper: 3.9 M)")
    assert 3_000_000 <= count <= 5_000_000
    # P changes how the local branch cuts the map, not the weights.
    for p in (8, 32, 128, 512):
        assert sum(t.numel() for t in PatchRefineNet(patch_size=p).parameters()) == count


def test_train_mode_gives_two_logit_maps_eval_mode_their_mean_probability(net):
    x = probability_map(2, 128, seed=1)
    net.train()
    out = net(x)
    assert isinstance(out, tuple) and len(out) == 2
    global_logits, local_logits = out
    assert global_logits.shape == local_logits.shape == (2, 1, 128, 128)
    assert torch.isfinite(global_logits).all() and torch.isfinite(local_logits).all()
    assert not torch.equal(global_logits, local_logits)  # two decoders, two maps
    net.eval()
    with torch.inference_mode():
        probs = net(x)
        global_logits, local_logits = net.logits(x)
        predicted = net.predict(x)
    assert probs.shape == (2, 1, 128, 128) and probs.dtype == torch.float32
    assert probs.min() >= 0 and probs.max() <= 1
    mean = (torch.sigmoid(global_logits) + torch.sigmoid(local_logits)) / 2
    torch.testing.assert_close(probs, mean)
    assert torch.equal(probs, predicted)


def test_production_tile_forward():
    torch.manual_seed(0)
    net = PatchRefineNet().eval()  # P = 64: 64 patches of a 512 tile
    with torch.inference_mode():
        probs = net(probability_map(1, 512, seed=2))
    assert probs.shape == (1, 1, 512, 512)
    assert torch.isfinite(probs).all() and probs.min() >= 0 and probs.max() <= 1


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = PatchRefineNet(patch_size=32).train()
    x = probability_map(2, 64, seed=3).requires_grad_(True)
    target = (x.detach() > 0.5).float()
    global_logits, local_logits = net(x)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    (bce(global_logits, target) + bce(local_logits, target)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, param in net.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize(("patch", "size"), [(64, 128), (32, 128), (128, 256)])
def test_local_branch_sees_its_own_patch_only(patch, size):
    torch.manual_seed(0)
    net = PatchRefineNet(patch_size=patch).eval()
    x = probability_map(1, size, seed=4)
    changed = x.clone()
    rows = cols = size // patch
    r, c = rows - 1, 0  # a corner patch, so neighbours lie both up and right of it
    changed[..., r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = (
        1 - changed[..., r * patch : (r + 1) * patch, c * patch : (c + 1) * patch]
    )
    with torch.inference_mode():
        g0, l0 = net.logits(x)
        g1, l1 = net.logits(changed)

    def patches(t: torch.Tensor) -> torch.Tensor:  # (rows, cols, P, P)
        return t[0, 0].reshape(rows, patch, cols, patch).transpose(1, 2)

    l0, l1, g0, g1 = map(patches, (l0, l1, g0, g1))
    others = torch.ones(rows, cols, dtype=torch.bool)
    others[r, c] = False
    assert not torch.equal(l0[r, c], l1[r, c])  # the changed patch's own output moves...
    assert torch.equal(l0[others], l1[others])  # ...no other patch's local output does (bitwise)
    # The global decoder does look across patch borders.
    assert not torch.equal(g0[others], g1[others])
    assert (g0[r - 1, c] - g1[r - 1, c]).abs().max() > 0
    assert (g0[r, c + 1] - g1[r, c + 1]).abs().max() > 0


def test_inputs_that_do_not_tile_are_refused(net):
    with pytest.raises(ValueError, match="32-px patches"):
        net(torch.rand(1, 1, 96, 80))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        net(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="multiple of 8"):
        PatchRefineNet(patch_size=60)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    net = PatchRefineNet(patch_size=32)
    net.train()
    with torch.no_grad():  # move the BatchNorm running statistics off their defaults
        net(probability_map(2, 64, seed=5))
    net.eval()
    arguments = json.loads(json.dumps(net.arguments))
    assert PatchRefineNet(**arguments).arguments == net.arguments
    header = {
        "kind": "prn",
        "architecture": "PatchRefineNet",
        "arguments": arguments,
        "bands": [1],
        "tile_size": 512,
        "patch_size": 32,
        "output": "probability",
    }
    path = save_checkpoint(net, header, tmp_path / "prn.safetensors")
    assert read_header(path, kind="prn")["arguments"] == arguments
    model = load_model(path, kind="prn")
    assert not model.training and not model.net.training
    assert isinstance(model.net, PatchRefineNet) and model.net.patch_size == 32
    x = probability_map(1, 128, seed=6)
    with torch.inference_mode():
        expected = net(x)
        loaded = model(x)
    # The Predictor passes probabilities through (no second sigmoid): the same map.
    assert loaded.min() >= 0 and loaded.max() <= 1
    torch.testing.assert_close(loaded, expected, rtol=0, atol=1e-6)
    for name, tensor in net.state_dict().items():
        assert torch.equal(model.net.state_dict()[name], tensor), name
