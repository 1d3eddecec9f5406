"""StyleGAN2 in pure torch: shapes and gradients through base.Generator / base.Discriminator, modulated conv against a
per-sample reference, seeded noise, w_avg, minibatch stddev on odd batches, resolution checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sqgan.models.base import Discriminator, Generator
from sqgan.models.stylegan2 import (
    DiscriminatorTrunk,
    MappingNetwork,
    MinibatchStdLayer,
    SynthesisNetwork,
    fir_filter,
    modulated_conv2d,
    stylegan2_parts,
    upfirdn2d,
    upsample2d,
)

TINY = dict(z_dim=16, w_dim=32, channel_base=512, channel_max=32, mapping_layers=2)


def tiny(resolution: int):
    return stylegan2_parts(resolution=resolution, **TINY)


def assert_grads(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    for name, p in module.named_parameters():
        if any(s in name for s in skip):
            continue
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("res, num_ws, blocks", [(32, 8, 3), (64, 10, 4)])
@pytest.mark.parametrize("fq_layers", [[], [1]])
def test_forward_backward_through_base_wrappers(res, num_ws, blocks, fq_layers):
    torch.manual_seed(0)
    mapping, synthesis, trunk = tiny(res)
    g = Generator(synthesis, TINY["z_dim"], TINY["w_dim"], mapping=mapping)
    d = Discriminator(trunk, fq_layers=fq_layers, codebook_size=8)
    assert g.num_ws == synthesis.num_ws == num_ws and len(trunk.blocks) == len(trunk.widths) == blocks
    out = g(torch.randn(6, TINY["z_dim"]), generator=torch.Generator().manual_seed(1))
    assert out.images.shape == (6, 3, res, res) and out.ws.shape == (6, num_ws, TINY["w_dim"])
    dout = d(out.images)
    assert dout.logits.shape == (6,) and dout.features.shape == (6, trunk.widths[-1])
    assert set(dout.quant) == {f"fq/layer{i}" for i in fq_layers}
    (dout.logits.sum() + dout.loss).backward()
    assert_grads(g)
    assert_grads(d)


def test_trunk_blocks_halve_the_resolution_down_to_4():
    trunk = DiscriminatorTrunk(64, channel_base=512, channel_max=32)
    x = torch.randn(3, 3, 64, 64)
    for block, width, res in zip(trunk.blocks, trunk.widths, [32, 16, 8, 4], strict=True):
        x = block(x)
        assert x.shape == (3, width, res, res)
    assert trunk.widths == [min(512 // r, 32) for r in (32, 16, 8, 4)]
    logits, features = trunk.head(x)
    assert logits.shape == (3,) and features.shape == (3, 32)


def test_r1_penalty_backpropagates_through_the_trunk():
    """R1 (StyleGAN2's D regulariser) needs the gradient of D's gradient: every op here must support it."""
    torch.manual_seed(0)
    trunk = DiscriminatorTrunk(32, channel_base=512, channel_max=32)
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    logits, _ = trunk(x)
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    grad.square().sum().backward()
    # Only weights: with piecewise-linear activations ∂D/∂x is locally constant in the biases.
    assert_grads(trunk, skip=("bias",))
    assert all(torch.isfinite(p.grad).all() for p in trunk.parameters() if p.grad is not None)


def test_truncation_and_style_mixing_through_generator():
    torch.manual_seed(0)
    mapping, synthesis, _ = tiny(32)
    g = Generator(synthesis, TINY["z_dim"], TINY["w_dim"], mapping=mapping).eval()
    z = torch.randn(4, TINY["z_dim"])
    out = g(z, mix_z=torch.randn(4, TINY["z_dim"]), mix_cutoff=torch.tensor([0, 3, 5, 8]), noise_mode="const")
    assert torch.equal(out.ws[1, 3], out.ws[1, 7]) and not torch.equal(out.ws[1, 2], out.ws[1, 3])
    assert torch.equal(out.ws[0, 0], out.ws[0, 7]) and torch.equal(out.ws[3, 0], out.ws[3, 7])  # cutoffs 0 and 8
    at_avg = g(z, truncation_psi=0.0, noise_mode="const").images
    assert torch.allclose(at_avg, at_avg[:1].expand_as(at_avg), atol=1e-5)  # ψ = 0: every z gives w_avg's image


def reference_modulated_conv(x, weight, styles, demodulate, padding):
    outs = []
    for xi, si in zip(x, styles, strict=True):
        w = weight * si[None, :, None, None]
        if demodulate:
            w = w / (w.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8).sqrt()
        outs.append(F.conv2d(xi[None], w, padding=padding))
    return torch.cat(outs)


@pytest.mark.parametrize("demodulate", [True, False])
@pytest.mark.parametrize("kernel, padding", [(3, 1), (1, 0)])
def test_modulated_conv_equals_per_sample_conv(demodulate, kernel, padding):
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 5, 8, 8, generator=g), torch.randn(7, 5, kernel, kernel, generator=g)
    styles = torch.randn(3, 5, generator=g)
    got = modulated_conv2d(x, weight, styles, demodulate=demodulate, padding=padding)
    want = reference_modulated_conv(x, weight, styles, demodulate, padding)
    assert got.shape == (3, 7, 8, 8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_modulated_conv_up_equals_per_sample_transposed_conv_and_blur():
    """up=2: per sample, the stride-2 transposed conv written as an ordinary conv (zero insertion, full padding,
    flipped kernel) of the modulated weight, then the [1,3,3,1] blur with gain 4."""
    g = torch.Generator().manual_seed(0)
    x, weight, styles = torch.randn(3, 4, 6, 6, generator=g), torch.randn(5, 4, 3, 3, generator=g), torch.randn(3, 4)
    f = fir_filter()
    got = modulated_conv2d(x, weight, styles, padding=1, up=2, resample_filter=f)
    z = torch.zeros(3, 4, 11, 11)
    z[:, :, ::2, ::2] = x  # zero insertion: 2H − 1
    full = reference_modulated_conv(z, weight.flip([2, 3]), styles, True, padding=2)  # 2H + 1
    blur = (4 * torch.outer(f, f)).expand(5, 1, 4, 4)
    want = F.conv2d(F.pad(full, [1, 1, 1, 1]), blur, groups=5)
    assert got.shape == (3, 5, 12, 12)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fir_upsampling_keeps_a_constant_away_from_the_border():
    up = upsample2d(torch.full((1, 2, 8, 8), 3.0), fir_filter())
    assert up.shape == (1, 2, 16, 16)
    torch.testing.assert_close(up[..., 2:-2, 2:-2], torch.full((1, 2, 12, 12), 3.0))


def test_fir_downsampling_keeps_every_second_blurred_pixel():
    x, f = torch.randn(2, 3, 8, 8), fir_filter()
    down = upfirdn2d(x, f, down=2, padding=(1, 1, 1, 1))
    assert down.shape == (2, 3, 4, 4)
    torch.testing.assert_close(down, upfirdn2d(x, f, padding=(1, 1, 1, 1))[..., ::2, ::2])
    torch.testing.assert_close(upfirdn2d(torch.ones(1, 1, 8, 8), f, down=2), torch.ones(1, 1, 3, 3))


def test_noise_is_a_function_of_the_generator_seed():
    torch.manual_seed(0)
    synthesis = SynthesisNetwork(32, 32, channel_base=512, channel_max=32)
    for name, p in synthesis.named_parameters():
        if name.endswith("noise_strength"):
            p.data.fill_(0.5)  # 0 at init: make the noise visible
    ws = torch.randn(2, synthesis.num_ws, 32)

    def run(seed: int, mode: str = "random") -> torch.Tensor:
        return synthesis(ws, generator=torch.Generator().manual_seed(seed), noise_mode=mode)

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))
    assert torch.equal(run(1, "const"), run(2, "const"))
    assert not torch.allclose(run(1, "const"), run(1, "none"))
    assert torch.equal(run(1, "none"), run(2, "none"))
    with pytest.raises(ValueError, match="noise_mode"):
        run(1, "fixed")


def test_mapping_updates_w_avg_only_when_asked():
    torch.manual_seed(0)
    mapping = MappingNetwork(16, 32, num_layers=2, w_avg_beta=0.9)
    assert torch.equal(mapping.w_avg, torch.zeros(32))
    z = torch.randn(8, 16)
    w = mapping(z)
    assert w.shape == (8, 32) and torch.equal(mapping.w_avg, torch.zeros(32))
    mapping(z, update_w_avg=True)
    torch.testing.assert_close(mapping.w_avg, 0.1 * w.mean(0))  # lerp(mean, 0, 0.9) = 0.1 · mean
    before = (mapping.w_avg - w.mean(0)).norm()
    mapping(z, update_w_avg=True)
    assert (mapping.w_avg - w.mean(0)).norm() < before


def test_mapping_normalises_z_scale():
    torch.manual_seed(0)
    mapping = MappingNetwork(16, 32, num_layers=2)
    z = torch.randn(4, 16)
    torch.testing.assert_close(mapping(z), mapping(5 * z))


@pytest.mark.parametrize("batch, group", [(6, 3), (8, 4), (3, 3), (1, 1), (7, 1)])
def test_mbstd_picks_a_group_that_divides_the_batch(batch, group):
    layer = MinibatchStdLayer(group_size=4, num_channels=1)
    assert layer.group_for(batch) == group
    x = torch.randn(batch, 8, 4, 4)
    y = layer(x)
    assert y.shape == (batch, 9, 4, 4) and torch.equal(y[:, :8], x)
    # Sample i is in group i mod (B / G): its stat is the stddev over that group.
    n = batch // group
    members = x[torch.arange(0, batch, n)]
    want = (members.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
    torch.testing.assert_close(y[0, 8], want.expand(4, 4))


def test_trunk_head_with_a_batch_of_six():
    trunk = DiscriminatorTrunk(32, channel_base=512, channel_max=32, mbstd_group_size=4)
    logits, features = trunk(torch.randn(6, 3, 32, 32))
    assert logits.shape == (6,) and features.shape == (6, 32) and torch.isfinite(logits).all()


@pytest.mark.parametrize("bad", [48, 16, 2048, 0])
def test_bad_resolution_is_rejected(bad):
    for build in (lambda: SynthesisNetwork(32, bad), lambda: DiscriminatorTrunk(bad), lambda: tiny(bad)):
        with pytest.raises(ValueError, match=rf"powers of two from 32 to 1024.*got {bad}$"):
            build()
