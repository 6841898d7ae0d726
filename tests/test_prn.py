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


def window_gflop(net: PatchRefineNet) -> float:
    """GFLOP of one 512 x 512 window (both branches), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    net = net.to("meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net.logits(torch.empty(1, 1, 512, 512, device="meta"))
    return counter.get_total_flops() / 1e9


def test_configs_set_width_and_recurrence_and_the_cpu_variants_are_cheaper():
    from geoprn.train import load_config

    paper = PatchRefineNet(**load_config("prn_p64")["arguments"])
    assert (paper.channels, paper.recurrence) == ([32, 64, 128, 256], 2)
    assert window_gflop(paper) == pytest.approx(481.3, abs=0.5)  # the figure DESIGN.md quotes
    for name, widths in (("prn_lite", [16, 32, 64, 128]), ("prn_tiny", [8, 16, 32, 64])):
        config = load_config(name)
        net = PatchRefineNet(**config["arguments"])
        assert net.channels == widths and net.recurrence == 1 and net.patch_size == 64
        assert window_gflop(net) * 5 <= window_gflop(paper)
        assert sum(p.numel() for p in net.parameters()) < 1e6


def test_union_rule_is_the_authors_post_step_at_one_half():
    from scipy.ndimage import binary_dilation

    from geoprn.models.prn import union_rule

    g, loc = probability_map(2, 64, 5), probability_map(2, 64, 6)
    union = union_rule(g, loc) > 0.5
    expected = [
        (gi > 0.5) | binary_dilation((gi > 0.5) & (li > 0.5), structure=torch.ones(3, 3).numpy())
        for gi, li in zip(g[:, 0].numpy(), loc[:, 0].numpy(), strict=True)
    ]
    assert (union[:, 0].numpy() == expected).all()
    assert (union_rule(g, loc) >= g).all()  # never removes a road of the global branch


def test_rule_changes_the_output_not_the_weights(tmp_path):
    torch.manual_seed(3)
    mean_net = PatchRefineNet(channels=(8, 16), patch_size=32, recurrence=0).eval()
    union_net = PatchRefineNet(**{**mean_net.arguments, "rule": "union"}).eval()
    union_net.load_state_dict(mean_net.state_dict())
    x = probability_map(1, 64, 7)
    g, loc = (torch.sigmoid(t) for t in mean_net.logits(x))
    with torch.no_grad():
        assert torch.allclose(mean_net(x), 0.5 * (g + loc))
        assert not torch.allclose(union_net(x), mean_net(x))
    with pytest.raises(ValueError, match="rule"):
        PatchRefineNet(rule="max")
    # a header written before the rule existed loads as the mean
    old_arguments = {k: v for k, v in mean_net.arguments.items() if k != "rule"}
    header = {"kind": "prn", "architecture": "PatchRefineNet", "bands": [1], "tile_size": 64}
    header["arguments"] = old_arguments
    path = save_checkpoint(mean_net, header, tmp_path / "old.safetensors")
    assert load_model(path).net.rule == "mean"


def test_input_skip_starts_as_the_identity_and_learns_a_correction():
    torch.manual_seed(4)
    net = PatchRefineNet(channels=(8, 16), patch_size=32, recurrence=0, input_skip=True)
    x = probability_map(2, 64, 8).clamp(0.01, 0.99)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), x, atol=1e-5)
    net.train()
    global_logits, local_logits = net.logits(x)
    (global_logits.mean() + local_logits.mean()).backward()
    assert net.global_decoder.head.weight.grad.abs().sum() > 0
    assert PatchRefineNet(**net.arguments).input_skip
