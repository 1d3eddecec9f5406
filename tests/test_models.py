"""The model factory: every backbone at 32² and 64², with FQ and SQ, through the one G/D form; DCGAN's layout."""

from __future__ import annotations

import pytest
import torch

from sqgan.config import ConfigError, default_params
from sqgan.data.diffaugment import diff_augment
from sqgan.models.base import Discriminator, Generator
from sqgan.models.dcgan import DCGANSynthesis, DCGANTrunk
from sqgan.models.factory import build_discriminator, build_generator

TINY = {
    "dcgan": ["model.g_channels=8", "model.d_channels=8"],
    "sngan": ["model.g_channels=8", "model.d_channels=8"],
    "stylegan2": ["model.channel_base=512", "model.channel_max=16", "model.w_dim=32", "model.mapping_layers=2"],
}


def tiny(arch: str, res: int, *extra: str):
    return default_params([f"model.arch={arch}", f"model.resolution={res}", "model.z_dim=16", "model.w_dim=32",
                           "sq.codebook_size=8", "fq.codebook_size=4", *TINY[arch], *extra])


@pytest.mark.parametrize("arch", ["dcgan", "sngan", "stylegan2"])
@pytest.mark.parametrize("res", [32, 64])
def test_every_backbone_trains_forward_and_backward_with_fq_and_sq(arch, res):
    torch.manual_seed(0)
    p = tiny(arch, res)
    G, D = build_generator(p), build_discriminator(p)
    out = G(torch.randn(4, 16), generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (4, 3, res, res)
    assert out.ws.shape == (4, G.num_ws, 32)
    assert set(out.quant) == {"sq"} and out.quant["sq"].indices.shape == (4, 32 // 4)
    d = D(out.images)
    assert d.logits.shape == (4,) and d.features.shape[0] == 4
    assert set(d.quant) == {"fq/layer1", "fq/layer2"}
    (d.logits.mean() + d.loss + out.loss).backward()
    no_grad = [n for n, prm in [*G.named_parameters(), *D.named_parameters()] if prm.grad is None]
    assert not no_grad, no_grad
    assert G.quantizer.codebook.grad.abs().sum() > 0  # L_sq reaches the codebook


@pytest.mark.parametrize("arch", ["dcgan", "sngan"])
def test_without_sq_dcgan_and_sngan_take_z_directly(arch):
    p = tiny(arch, 32, "sq.enabled=false")
    G = build_generator(p)
    assert G.mapping is None and G.quantizer is None and G.w_dim == 16
    assert G(torch.randn(2, 16)).quant == {}


def test_stylegan2_keeps_its_mapping_network_without_sq():
    G = build_generator(tiny("stylegan2", 32, "sq.enabled=false"))
    assert G.mapping is not None and G.quantizer is None and G.num_ws > 1


def test_config_rejects_what_the_arch_cannot_build():
    with pytest.raises(ConfigError, match=r"model.resolution: dcgan supports 32, 64 px, got 128"):
        default_params(["model.resolution=128"])
    with pytest.raises(ConfigError, match=r"model.resolution.*power of two"):
        default_params(["model.arch=stylegan2", "model.resolution=48"])
    with pytest.raises(ConfigError, match=r"fq.layers: the 32px stylegan2 discriminator has blocks 0..2"):
        default_params(["model.arch=stylegan2", "fq.layers=[3]"])
    with pytest.raises(ConfigError, match=r"sq.code_dim: 5 does not divide model.w_dim=128"):
        default_params(["sq.code_dim=5"])
    default_params(["model.arch=stylegan2", "model.resolution=256", "fq.layers=[5]"])  # 256 → 4: blocks 0..5


@pytest.mark.parametrize("res, blocks", [(32, 3), (64, 4)])
def test_dcgan_layout(res, blocks):
    g = Generator(DCGANSynthesis(16, res, 8), z_dim=16, w_dim=16)
    x = g(torch.randn(5, 16)).images
    assert x.shape == (5, 3, res, res) and x.abs().max() <= 1
    d = Discriminator(DCGANTrunk(res, 8), fq_layers=[blocks - 1], codebook_size=4)
    out = d(x)
    assert out.logits.shape == (5,) and out.features.shape == (5, 8 * 2 ** (blocks - 1) * 16)
    assert out.quant[f"fq/layer{blocks - 1}"].indices.shape == (5, 4, 4)  # the last block is 4×4
    assert d.trunk.widths == [8 * 2**i for i in range(blocks)]


def test_discriminator_rejects_missing_fq_layer():
    with pytest.raises(ValueError, match=r"fq layers \[3\] do not exist.*blocks 0..2"):
        Discriminator(DCGANTrunk(32, 8), fq_layers=[3])


def test_fq_loss_is_sum_over_layers():
    torch.manual_seed(0)
    d = Discriminator(DCGANTrunk(32, 8), fq_layers=[0, 1, 2], codebook_size=4).eval()
    out = d(torch.randn(2, 3, 32, 32))
    assert out.loss.item() == pytest.approx(sum(q.loss.item() for q in out.quant.values()))


def test_style_mixing_takes_the_second_styles_after_the_cutoff():
    torch.manual_seed(1)
    G = build_generator(tiny("stylegan2", 32, "sq.enabled=false"))
    z, z2 = torch.randn(2, 16), torch.randn(2, 16)
    cut = torch.tensor([2, G.num_ws])  # sample 0 mixes from layer 2; sample 1 not at all
    ws = G(z, mix_z=z2, mix_cutoff=cut, noise_mode="const").ws
    w1, w2 = G.mapping(z), G.mapping(z2)
    assert torch.allclose(ws[0, :2], w1[0].expand(2, -1)) and torch.allclose(ws[0, 2:], w2[0].expand(G.num_ws - 2, -1))
    assert torch.allclose(ws[1], w1[1].expand(G.num_ws, -1))


def test_truncation_pulls_w_to_w_avg():
    G = build_generator(tiny("stylegan2", 32, "sq.enabled=false")).eval()
    G.mapping.w_avg.fill_(0.5)
    z = torch.randn(3, 16)
    w, _, _ = G.map(z, truncation_psi=0.0)
    assert torch.allclose(w, torch.full_like(w, 0.5))
    w1, _, _ = G.map(z, truncation_psi=1.0)
    assert torch.allclose(w1, G.mapping(z))


def test_diffaugment_is_a_function_of_its_generator_and_passes_gradients():
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    policies = ["color", "translation", "cutout"]
    a = diff_augment(x, policies, torch.Generator().manual_seed(1))
    b = diff_augment(x, policies, torch.Generator().manual_seed(1))
    c = diff_augment(x, policies, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    cut = diff_augment(torch.ones(8, 3, 16, 16), ["cutout"], torch.Generator().manual_seed(0))
    zero_share = (cut == 0).float().mean().item()
    assert 0.1 < zero_share < 0.3  # a half-side square: about a quarter of the pixels
