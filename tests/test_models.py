"""The model factory: every backbone at 32² and 64², with FQ and SQ, through the one G/D form; DCGAN's layout."""

from __future__ import annotations

import pytest
import torch

from sqgan.config import ConfigError, default_params
from sqgan.data.diffaugment import diff_augment
from sqgan.losses.gan import GANLoss
from sqgan.losses.regularizers import r1_penalty
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


# ------------------------------------------------------------------------------------------ PacGAN (model.pack)
@pytest.mark.parametrize("arch", ["dcgan", "sngan", "stylegan2"])
def test_a_packing_d_scores_m_consecutive_samples_stacked_along_channels(arch):
    """pack = 2: one logit per pair (x0, x1), (x2, x3), …, the trunk seeing [x_2i ‖ x_2i+1] on channels; each sample
    gets its pair's logit, and the pair's order matters (it is one 6-channel image, not two). No minibatch stddev
    here, so each pack's score is its own."""
    torch.manual_seed(0)
    D = build_discriminator(tiny(arch, 32, "model.pack=2", "fq.enabled=false", "model.mbstd_num_channels=0")).eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        out = D(x)
        h = torch.cat([x[0::2], x[1::2]], dim=1)
        for block in D.trunk.blocks:
            h = block(h)
        ref_logits, ref_features = D.trunk.head(h)
        swapped = D(x[[1, 0, 2, 3, 4, 5]]).logits
    assert out.logits.shape == (6,) and out.features.shape[0] == 6
    torch.testing.assert_close(out.logits, ref_logits.repeat_interleave(2))
    torch.testing.assert_close(out.features, ref_features.repeat_interleave(2, dim=0))
    assert (swapped[:2] - out.logits[:2]).abs().min() > 1e-6 and torch.equal(swapped[2:], out.logits[2:])


@pytest.mark.parametrize("arch", ["dcgan", "stylegan2"])  # stylegan2: minibatch stddev over the packs of one part
def test_packs_never_mix_parts_and_a_short_part_repeats_its_last_sample(arch):
    torch.manual_seed(0)
    D = build_discriminator(tiny(arch, 32, "model.pack=2", "fq.enabled=false")).eval()
    real, fake = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = D(torch.cat([real, fake]), parts=(3, 3)).logits
        other = D(torch.cat([real, torch.randn(3, 3, 32, 32)]), parts=(3, 3)).logits
        last = D(torch.cat([real, real[2:]]), parts=(4,)).logits  # the reals' second pack is (x2, x2)
    assert torch.equal(out[:3], other[:3]) and not torch.equal(out[3:], other[3:])
    torch.testing.assert_close(out[:3], last[:3])
    assert out[0] == out[1] and out[3] == out[4] and out[2] != out[3]


def test_packing_d_trains_with_fq_and_its_r1_is_the_packs_gradient():
    """FQ on a packing D (forward, backward, dictionaries see the packs), and d_r1 ÷ m: R1 of the network D on its
    own 6-channel input, E over packs ‖∇ D(pack)‖²."""
    torch.manual_seed(0)
    p = tiny("dcgan", 32, "model.pack=2", "train.r1_gamma=1.0", "train.r1_every=1", "train.batch_size=4")
    G, D = build_generator(p), build_discriminator(p)
    out = D(G(torch.randn(4, 16)).images)
    assert set(out.quant) == {"fq/layer1", "fq/layer2"} and out.quant["fq/layer1"].indices.shape[0] == 2
    (out.logits.mean() + out.loss).backward()
    assert D.trunk.blocks[0][0].weight.shape[1] == 6 and D.trunk.blocks[0][0].weight.grad.abs().sum() > 0
    loss = GANLoss(p, G, D, lambda x, g: x, torch.device("cpu"), G.num_ws)
    real = torch.randn(4, 3, 32, 32)
    got = loss.d_r1(real, torch.Generator().manual_seed(0), 0).stats["loss/r1"]
    packed = torch.cat([real[0::2], real[1::2]], dim=1).requires_grad_(True)
    h = packed
    for block in D.trunk.blocks:
        h = block(h)
    want = r1_penalty(D.trunk.head(h)[0], packed)
    torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-6)


def test_config_rejects_a_pack_that_cannot_run():
    with pytest.raises(ConfigError, match=r"model.pack: D packs 3 samples, so train.batch_size \(16\) must be a "
                                          r"multiple of it"):
        default_params(["model.pack=3", "train.batch_size=16"])
    with pytest.raises(ConfigError, match=r"model.pack: MixDL scores single mixed images"):
        default_params(["model.pack=2", "mixdl.enabled=true"])
    assert default_params(["model.pack=4", "train.batch_size=16"]).model.pack == 4
