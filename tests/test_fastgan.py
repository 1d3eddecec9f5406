"""FastGAN (issue 19): widths as the official code, skip-layer excitation in G and D, D's self-supervised decoders and
their reconstruction loss on reals, and FastGAN with FQ, SQ and MixDL in the loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_overrides

from sqgan.config import ConfigError, d_blocks, default_params
from sqgan.losses.mixdl import patch_taps
from sqgan.metrics.features import LPIPSNet
from sqgan.models.factory import build_discriminator, build_generator
from sqgan.models.fastgan import (
    FastGANSynthesis,
    FastGANTrunk,
    SkipLayerExcitation,
    crop_part,
    reconstruction_loss,
)
from sqgan.train.loop import Runtime, reported_metrics, setup, train_step

FASTGAN = {"model.arch": "fastgan", "model.resolution": 256, "model.g_channels": 4, "model.d_channels": 4,
           "fq.layers": "[3, 5]", "train.batch_size": 4, "metrics.eval_every": 0, "metrics.diversity_every": 0,
           "metrics.names": "[fid]"}


def _params(**extra):
    return default_params(tiny_overrides(**{**FASTGAN, **extra}))


def test_widths_are_the_official_ones():
    g = FastGANSynthesis(256, 1024, 64)  # ngf 64: nfc = {4: 1024, 8: 512, 16: 256, 32: 128, 64: 128, 128: 64, …}
    assert [b.conv1.weight.shape[0] // 2 for b in g.blocks] == [512, 256, 128, 128, 64, 32, 16, 8]
    assert set(g.sle) == {"64", "128", "256", "512"}  # none at 1024, as the official
    assert g.sle["64"].main[1].weight.shape[1] == 1024  # the 64² gate reads the 4² map
    d = FastGANTrunk(256, 64)
    assert d.widths == [16, 32, 64, 128, 256, 512] and len(d.blocks) == d_blocks("fastgan", 256)
    x = torch.zeros(1, 3, 256, 256)
    maps = []
    for i, block in enumerate(d.blocks):
        x = block(x) if i not in d.skips else block(x, maps[d.skips[i]])
        maps.append(x)
    assert [m.shape[-1] for m in maps] == d.sides == [256, 128, 64, 32, 16, 8]
    logits, features, aux = d.head(x, image=torch.zeros(1, 3, 256, 256), maps=maps)
    assert logits.shape == (1, 50) and features.shape == (1, 512) and aux["small"].shape[-1] == 8


def test_gs_sle_gates_the_64_128_256_maps_by_the_4_8_16_maps():
    torch.manual_seed(0)
    g = FastGANSynthesis(16, 256, 8).eval()
    seen: dict[str, torch.Tensor] = {}
    g.init.register_forward_hook(lambda m, i, o: seen.__setitem__("4", o))
    for k, block in enumerate(g.blocks):
        block.register_forward_hook(lambda m, i, o, s=g.sides[k]: seen.__setitem__(f"up{s}", o))
    for s, sle in g.sle.items():
        sle.register_forward_hook(lambda m, i, o, s=s: seen.__setitem__(f"sle{s}", (i[0], i[1], o)))
    img = g(torch.randn(2, 1, 16))
    assert torch.equal(seen["sle64"][0], seen["4"]) and torch.equal(seen["sle64"][1], seen["up64"])
    assert torch.equal(seen["sle128"][0], seen["up8"]) and torch.equal(seen["sle256"][0], seen["up16"])
    assert img.shape == (2, 3, 256, 256)


def test_skip_layer_excitation_by_hand():
    torch.manual_seed(0)
    sle = SkipLayerExcitation(6, 4).eval()
    small, big = torch.randn(2, 6, 8, 8), torch.randn(2, 4, 32, 32)
    pooled = F.adaptive_avg_pool2d(small, 4)
    h = F.conv2d(pooled, sle.main[1].weight)  # 4×4 conv: [2, 4, 1, 1]
    h = h * torch.sigmoid(h)
    gate = torch.sigmoid(F.conv2d(h, sle.main[3].weight))
    assert torch.allclose(sle(small, big), big * gate, atol=1e-6)


def test_forward_backward_with_fq_sq_reaches_every_parameter_and_ds_sle_reads_the_right_maps():
    p = _params(**{"sq.enabled": "true"})
    torch.manual_seed(0)
    G, D = build_generator(p), build_discriminator(p)
    seen = {}
    for i in (3, 4, 5):
        D.trunk.blocks[i].sle.register_forward_hook(lambda m, inp, o, i=i: seen.__setitem__(i, inp[0]))
    out = G(torch.randn(2, p.model.z_dim))
    d = D(out.images, feed=False)
    maps = d.aux["maps"]
    assert all(torch.equal(seen[i], maps[j]) for i, j in ((3, 0), (4, 1), (5, 2)))  # 32² ← 256², 16² ← 128², …
    rec = reconstruction_loss(D.trunk, d.aux, out.images.detach(), 1, LPIPSNet("alex").net)
    (d.logits.mean() + d.loss + out.loss + rec).backward()
    missing = [n for m in (G, D) for n, q in m.named_parameters() if q.grad is None]
    assert not missing, missing
    assert set(d.quant) == {"fq/layer3", "fq/layer5"}



def test_d_normalises_reals_among_reals_and_fakes_among_fakes_as_the_officials_two_calls():
    """One D call on [reals, fakes] with parts gives what two calls give (BatchNorm statistics within each part, as
    in G's step, where D sees fakes alone); over the joint batch it would not."""
    p = _params(**{"fq.enabled": "false"})
    torch.manual_seed(0)
    D = build_discriminator(p).train()
    for m in D.modules():  # spectral norm's power iteration held still, so the calls compare exactly
        if type(m).__name__ == "_SpectralNorm":
            m.eval()
    real, fake = torch.randn(3, 3, 256, 256), torch.randn(3, 3, 256, 256) * 0.5 + 0.4
    both = D(torch.cat([real, fake]), parts=(3, 3)).logits
    apart = torch.cat([D(real).logits, D(fake).logits])
    joint = D(torch.cat([real, fake])).logits
    assert torch.allclose(both, apart, atol=1e-5), (both - apart).abs().max()
    assert (joint - apart).abs().max() > 0.05
    assert all(m.parts is None for m in D.modules() if hasattr(m, "parts"))  # reset after the call
    assert not any(hasattr(m, "parts") for m in D.trunk.decoder_big.modules())  # decoders see reals alone

def test_the_reconstruction_loss_rebuilds_the_whole_the_small_and_one_quadrant():
    torch.manual_seed(0)
    trunk = FastGANTrunk(256, 4).eval()
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    assert torch.equal(crop_part(x, 1), x[:, :, :128, 128:]) and torch.equal(crop_part(x, 2), x[:, :, 128:, :128])
    maps, h = [], x
    for i, block in enumerate(trunk.blocks):
        h = block(h) if i not in trunk.skips else block(h, maps[trunk.skips[i]])
        maps.append(h)
    _, _, aux = trunk.head(h, image=x, maps=maps)
    seen = {}
    trunk.decoder_part.register_forward_hook(lambda m, inp, o: seen.__setitem__("part", inp[0]))
    lp = LPIPSNet("alex").net
    loss = reconstruction_loss(trunk, aux, x, 3, lp)
    assert torch.equal(seen["part"], maps[4][:, :, 8:, 8:])  # quadrant 3 of the 16² map
    for part in range(4):  # the decoded quadrant of the map is the image's quadrant it is compared with
        trunk.reconstructions(aux, 2, part)
        assert torch.equal(seen["part"], crop_part(maps[4], part))
    whole, small, quad = trunk.decoder_big(maps[5]), trunk.decoder_small(aux["small"]), seen["part"]
    target = F.interpolate(x, size=128, mode="nearest")
    want = (lp(whole, target).sum() + lp(small, target).sum()
            + lp(trunk.decoder_part(quad), F.interpolate(x[:, :, 128:, 128:], size=128, mode="nearest")).sum())
    assert torch.allclose(loss, want, atol=1e-5)
    assert not torch.allclose(reconstruction_loss(trunk, aux, x, 0, lp), loss)  # another quadrant, another target


class _Data:
    def __init__(self) -> None:
        self.images = torch.rand(8, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
        self.labels = None

    def __len__(self) -> int:
        return 8

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images[idx]


def test_a_training_step_trains_d_on_its_reconstructions_and_a_mixdl_step_runs():
    p = _params(**{"sq.enabled": "true", "mixdl.enabled": "true"})  # steps 0 plain, 1 MixDL (every = 2)
    state = setup(p, Runtime())
    assert [t for t, _, _ in patch_taps(state.D, 256)] == ["trunk.blocks.3", "trunk.blocks.4"]  # the 32², 16² maps
    plain = train_step(state, p, _Data(), Runtime())
    d = next(ph for ph in plain if "loss/d_adv" in ph.stats)
    assert d.stats["loss/d_recon"] > 0 and "loss/d_recon" in reported_metrics(p)
    assert torch.allclose(d.stats["loss/d"], d.stats["loss/d_adv"] + d.stats["loss/d_recon"] + d.stats["loss/fq"])
    mixdl = train_step(state, p, _Data(), Runtime())
    assert any("mixdl/d_kl" in ph.stats for ph in mixdl) and any("mixdl/g_kl" in ph.stats for ph in mixdl)


def test_params_refuse_a_resolution_fastgan_does_not_have():
    with pytest.raises(ConfigError, match="256, 512, 1024"):
        _params(**{"model.resolution": 128})
