"""DCGAN shapes at both resolutions, FQ layer placement, and DiffAugment's determinism."""

from __future__ import annotations

import pytest
import torch

from sqgan.data.diffaugment import diff_augment
from sqgan.models.dcgan import Discriminator, Generator


@pytest.mark.parametrize("res, blocks", [(32, 3), (64, 4)])
def test_generator_and_discriminator_shapes(res, blocks):
    g = Generator(z_dim=16, resolution=res, channels=8)
    x = g(torch.randn(5, 16))
    assert x.shape == (5, 3, res, res) and x.abs().max() <= 1
    d = Discriminator(res, 8, fq_layers=[blocks - 1], codebook_size=4)
    out = d(x)
    assert out.logits.shape == (5,)
    assert out.fq[blocks - 1].indices.shape == (5, 4, 4)  # the last block is 4×4
    assert d.widths == [8 * 2**i for i in range(blocks)]


def test_discriminator_rejects_missing_fq_layer():
    with pytest.raises(ValueError, match=r"fq layers \[3\] do not exist.*blocks 0..2"):
        Discriminator(32, 8, fq_layers=[3])


def test_fq_loss_is_sum_over_layers():
    torch.manual_seed(0)
    d = Discriminator(32, 8, fq_layers=[0, 1, 2], codebook_size=4).eval()
    out = d(torch.randn(2, 3, 32, 32))
    assert out.fq_loss.item() == pytest.approx(sum(q.loss.item() for q in out.fq.values()))


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
