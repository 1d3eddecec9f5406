"""SNGAN through the backbone contract (base.Generator / base.Discriminator): shapes, gradients, spectral norm,
determinism of the power iteration and state_dict round trips."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from sqgan.models.base import Discriminator, Generator
from sqgan.models.sngan import SNGANSynthesis, SNGANTrunk
from sqgan.quant.fq import FeatureQuantizer

# FQ after block 1 once FeatureQuantizer.forward takes `update` (base.Discriminator passes it); none before that.
FQ_LAYERS = [1] if "update" in inspect.signature(FeatureQuantizer.forward).parameters else []
Z = 16


def _sn_layers(trunk: nn.Module) -> list[nn.Module]:
    return [m for m in trunk.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


@pytest.mark.parametrize("res, widths, sizes", [
    (32, [8, 8, 8, 8], [16, 8, 8, 8]),
    (64, [8, 16, 32, 64, 128], [32, 16, 8, 4, 2]),
])
def test_forward_backward_through_the_contract(res, widths, sizes):
    torch.manual_seed(0)
    G = Generator(SNGANSynthesis(Z, res, 8), Z, w_dim=Z)
    D = Discriminator(SNGANTrunk(res, 8), fq_layers=FQ_LAYERS, codebook_size=4)
    assert G.num_ws == 1 and D.trunk.widths == widths and len(D.trunk.blocks) == len(widths)
    out = G(torch.randn(3, Z), generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (3, 3, res, res) and out.images.abs().max() <= 1
    d = D(out.images)
    assert d.logits.shape == (3,) and d.features.shape == (3, widths[-1])
    assert sorted(d.quant) == [f"fq/layer{i}" for i in FQ_LAYERS]
    (d.logits.mean() + d.loss).backward()
    for name, module in (("G", G), ("D", D)):
        missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"{name} parameters without a gradient: {missing}"
    h = out.images.detach()
    for block, size in zip(D.trunk.blocks, sizes, strict=True):
        h = block(h)
        assert h.shape[2:] == (size, size)


def test_default_widths_are_the_papers():
    assert SNGANSynthesis(128, 32).blocks[0].conv1.out_channels == 256  # CIFAR G: 256 throughout
    assert SNGANTrunk(32).widths == [128] * 4  # CIFAR D: 128 throughout
    assert SNGANSynthesis(128, 64).to_rgb.in_channels == 64  # 64² G: 1024 → 64
    assert SNGANTrunk(64).widths == [64, 128, 256, 512, 1024]


@pytest.mark.parametrize("make", [lambda r: SNGANSynthesis(Z, r, 8), lambda r: SNGANTrunk(r, 8)],
                         ids=["synthesis", "trunk"])
def test_other_resolutions_are_rejected(make):
    with pytest.raises(ValueError, match=r"32 or 64, got 48"):
        make(48)


def test_synthesis_checks_ws_and_ignores_generator_and_noise_mode():
    torch.manual_seed(0)
    s = SNGANSynthesis(Z, 32, 8).eval()
    ws = torch.randn(2, 1, Z)
    a = s(ws, generator=torch.Generator().manual_seed(1), noise_mode="random")
    b = s(ws, generator=None, noise_mode="const")
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"ws \[B, num_ws, 16\]"):
        s(torch.randn(2, Z))


def test_every_discriminator_weight_is_spectrally_normalised():
    torch.manual_seed(0)
    trunk = SNGANTrunk(32, 8).train()
    layers = _sn_layers(trunk)
    assert len(layers) == 3 + 3 + 2 + 2 + 1  # optimised and down block (2 convs + 1×1), 2 plain blocks, fc
    assert all(parametrize.is_parametrized(m, "weight") for m in layers)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for _ in range(10):  # power iterations happen in training-mode forwards
            trunk.head(torch.nn.Sequential(*trunk.blocks)(x))
    for m in layers:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2).item()
        assert sigma == pytest.approx(1.0, abs=0.02), f"{m}: σ_max = {sigma}"
    G = SNGANSynthesis(Z, 32, 8)  # G is not normalised (the paper: SN in D only)
    assert not any(parametrize.is_parametrized(m) for m in G.modules())


def _run(D: Discriminator, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [D(x).logits for x in xs]


def test_trunk_is_deterministic_and_round_trips_its_state_dict(tmp_path):
    xs = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    torch.manual_seed(7)
    a = Discriminator(SNGANTrunk(32, 8)).train()
    torch.manual_seed(7)
    b = Discriminator(SNGANTrunk(32, 8)).train()
    for la, lb in zip(_run(a, xs), _run(b, xs), strict=True):  # each train forward is one power iteration
        assert torch.equal(la, lb)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert any(k.endswith("_u") for k in a.state_dict())  # the power iteration's vectors are saved

    torch.save(a.state_dict(), tmp_path / "d.pt")
    torch.manual_seed(123)
    c = Discriminator(SNGANTrunk(32, 8)).train()
    c.load_state_dict(torch.load(tmp_path / "d.pt", weights_only=True))
    for la, lc in zip(_run(a, xs), _run(c, xs), strict=True):  # continues the same iteration
        assert torch.equal(la, lc)
    a.eval(), c.eval()
    assert torch.equal(a(xs[0]).logits, c(xs[0]).logits)


def test_eval_mode_does_not_move_the_power_iteration():
    torch.manual_seed(0)
    trunk = SNGANTrunk(32, 8).eval()
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        trunk.head(torch.nn.Sequential(*trunk.blocks)(x))
    assert all(torch.equal(before[k], v) for k, v in trunk.state_dict().items())


def test_trunk_blocks_matches_the_trunk():
    from sqgan.models.sngan import trunk_blocks

    assert [trunk_blocks(r) for r in (32, 64)] == [len(SNGANTrunk(r, 4).blocks) for r in (32, 64)] == [4, 5]
    with pytest.raises(ValueError, match="32 or 64, got 128"):
        trunk_blocks(128)
