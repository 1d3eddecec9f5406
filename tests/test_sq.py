"""Style quantization (SQ-GAN): nearest code on the sphere, straight-through, L_sq/L_uf, usage, QCR, the G step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sqgan.config import default_params
from sqgan.losses.gan import GANLoss
from sqgan.losses.regularizers import qcr_penalty
from sqgan.models.factory import build_discriminator, build_generator
from sqgan.quant.sq import StyleQuantizer, uniformity_loss


def test_nearest_code_on_the_sphere_equals_brute_force_search():
    torch.manual_seed(0)
    q = StyleQuantizer(w_dim=12, code_dim=3, codebook_size=10)
    w = torch.randn(7, 12) * torch.rand(7, 12) * 5  # norms vary: only directions may matter
    out = q(w)
    codes = F.normalize(q.codebook.detach(), dim=-1)
    for b in range(7):
        for j in range(4):
            sub = F.normalize(w[b, 3 * j : 3 * j + 3], dim=0)
            dists = [(sub - codes[k]).norm().item() for k in range(10)]
            assert out.indices[b, j].item() == min(range(10), key=dists.__getitem__)
            assert torch.allclose(out.quantized[b, 3 * j : 3 * j + 3], codes[out.indices[b, j]], atol=1e-5)


def test_straight_through_gradient_is_the_identity():
    q = StyleQuantizer(w_dim=8, code_dim=4, codebook_size=4)
    w = torch.randn(3, 8, requires_grad=True)
    g = torch.randn(3, 8)
    (q(w).quantized * g).sum().backward()
    assert torch.equal(w.grad, g)


def test_sq_loss_is_codebook_plus_commitment_on_the_sphere():
    q = StyleQuantizer(w_dim=2, code_dim=2, codebook_size=2, commitment=0.25, uniformity_t=2.0)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    w = torch.tensor([[3.0, 3.0]])  # direction (1, 1)/√2: nearest code (1, 0), squared distance 2 − √2
    out = q(w)
    d2 = 2 - math.sqrt(2)
    l_uf = -2.0 * 4.0  # two antipodal codes: ‖c1 − c2‖² = 4, one value for both ordered pairs
    assert out.indices.tolist() == [[0]]
    assert out.loss.item() == pytest.approx(d2 * 1.25 + l_uf, rel=1e-5)


def test_uniformity_loss_hand_cases():
    same = torch.ones(3, 4)
    assert uniformity_loss(same, t=2.0).item() == pytest.approx(0.0, abs=1e-6)  # all codes equal: log 1
    square = torch.tensor([[1.0, 0], [0, 1.0], [-1.0, 0], [0, -1.0]])
    # each code: two neighbours at ‖·‖² = 2, one opposite at 4 → mean of exp over the 12 ordered pairs
    expect = math.log((8 * math.exp(-2 * 2) + 4 * math.exp(-2 * 4)) / 12)
    assert uniformity_loss(square, t=2.0).item() == pytest.approx(expect, rel=1e-6)
    # spreading codes lowers it
    assert uniformity_loss(square).item() < uniformity_loss(square + torch.tensor([3.0, 3.0])).item()


def test_utilisation_and_perplexity_count_the_codes_in_use():
    q = StyleQuantizer(w_dim=4, code_dim=2, codebook_size=4)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[1.0, 0], [0, 1.0], [-1.0, 0], [0, -1.0]]))
    w = torch.tensor([[1.0, 0.1, 0.1, 1.0], [1.0, -0.1, 0.1, 1.0]])  # codes 0, 1, 0, 1
    out = q(w)
    assert out.counts.tolist() == [2.0, 2.0, 0.0, 0.0]
    assert out.perplexity.item() == pytest.approx(2.0)
    from sqgan.metrics.codebook import utilisation

    assert utilisation(out.counts).item() == 0.5


def test_code_dim_must_divide_w():
    with pytest.raises(ValueError, match=r"code_dim \(3\) must divide w_dim \(8\)"):
        StyleQuantizer(8, 3, 4)


def _loss(*extra: str) -> tuple[GANLoss, object]:
    p = default_params(["model.z_dim=16", "model.w_dim=16", "model.g_channels=8", "model.d_channels=8",
                        "sq.codebook_size=8", "train.batch_size=4", *extra])
    torch.manual_seed(0)
    G, D = build_generator(p), build_discriminator(p)
    return GANLoss(p, G, D, lambda x, g: x, torch.device("cpu"), G.num_ws), p


def test_qcr_is_zero_when_sigma_is_zero_and_positive_otherwise():
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    loss, _ = _loss("sq.qcr_sigma=0.0")
    ph = loss.d_qcr(real, torch.Generator().manual_seed(0), step=0)
    assert ph.stats["loss/qcr"].item() == 0.0
    loss, _ = _loss("sq.qcr_sigma=0.5")
    ph = loss.d_qcr(real, torch.Generator().manual_seed(0), step=0)
    assert ph.stats["loss/qcr"].item() > 0
    assert ph.loss.item() == pytest.approx(0.01 * ph.stats["loss/qcr"].item())  # λ_qcr, every step
    assert qcr_penalty(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])).item() == pytest.approx(2.5)


def test_qcr_leaves_fq_dictionaries_and_runs_only_every_qcr_every_steps():
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    loss, _ = _loss("sq.qcr_every=4")
    D = loss.D
    D(real)  # initialise the dictionaries
    before = [q.codebook.clone() for q in D.quantizers.values()]
    assert loss.d_qcr(real, torch.Generator().manual_seed(0), step=3) is None
    ph = loss.d_qcr(real, torch.Generator().manual_seed(0), step=4)
    assert ph.loss.item() == pytest.approx(0.01 * 4 * ph.stats["loss/qcr"].item())  # lazy: × qcr_every
    assert all(torch.equal(a, q.codebook) for a, q in zip(before, D.quantizers.values(), strict=True))


def test_g_step_adds_lambda_sq_times_the_quantizer_losses():
    loss, p = _loss("sq.lambda_sq=0.5")
    ph = loss.g_main(torch.Generator().manual_seed(0), step=0)
    assert ph.stats["loss/g"].item() == pytest.approx(ph.stats["loss/g_adv"].item() + 0.5 * ph.stats["loss/sq"].item(),
                                                      rel=1e-6)
    assert "sq" in ph.quant
    off, _ = _loss("sq.enabled=false")
    ph = off.g_main(torch.Generator().manual_seed(0), step=0)
    assert "loss/sq" not in ph.stats and ph.stats["loss/g"].item() == ph.stats["loss/g_adv"].item()
