"""MixDL (Kong et al., ECCV 2022): mixing coefficients, the mix in W, the KL distance loss against hand-computed values,
the G-layer hooks against a manual synthesis forward, gradients into G and the projection head, patch-head shapes."""

from __future__ import annotations

import math

import pytest
import torch

from sqgan.config import default_params
from sqgan.losses.mixdl import (
    MixDLSettings,
    MixupPatchHead,
    ProjectionHead,
    cosine_similarities,
    d_mixdl_term,
    distance_kl,
    g_layer_names,
    g_mixdl_term,
    mix_styles,
    mixdl_distance_loss,
    mixing_coefficients,
    patch_logits,
    patch_taps,
    random_layers,
    synthesis_activations,
)
from sqgan.models.factory import build_discriminator, build_generator

TINY = ["model.arch=stylegan2", "model.resolution=32", "model.channel_base=256", "model.channel_max=16",
        "model.z_dim=16", "model.w_dim=16", "model.mapping_layers=2"]


@pytest.fixture(scope="module")
def params():
    return default_params(TINY)


@pytest.fixture
def G(params):
    torch.manual_seed(0)
    return build_generator(params)


@pytest.fixture
def D(params):
    torch.manual_seed(1)
    return build_discriminator(params)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kl_by_hand(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def softmax_by_hand(x: list[float]) -> list[float]:
    e = [math.exp(v) for v in x]
    return [v / sum(e) for v in e]


def cos_by_hand(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double().tolist(), b.flatten().double().tolist()
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


# ----------------------------------------------------------------------------------------------- coefficients, mix


@pytest.mark.parametrize("kind", ["dirichlet", "gaussian", "uniform"])
def test_coefficients_are_seeded_mixing_vectors(kind):
    c = mixing_coefficients(5, 3, gen(7), kind)
    assert c.shape == (5, 3)
    assert (c >= 0).all() and torch.allclose(c.sum(1), torch.ones(5), atol=1e-6)
    assert torch.equal(c, mixing_coefficients(5, 3, gen(7), kind))
    assert not torch.equal(c, mixing_coefficients(5, 3, gen(8), kind))


def test_gaussian_coefficients_are_the_softmax_of_a_standard_normal_draw():
    """Official --gaussian: MultivariateNormal(0, I) then Softmax(dim=1); --uniform: U(0, 1) over the row sum."""
    x = torch.randn(4, 3, generator=gen(3))
    assert torch.allclose(mixing_coefficients(4, 3, gen(3), "gaussian"), x.softmax(1))
    u = torch.rand(4, 3, generator=gen(3))
    assert torch.allclose(mixing_coefficients(4, 3, gen(3), "uniform"), u / u.sum(1, keepdim=True))


def test_dirichlet_one_has_mean_one_over_b_and_the_dirichlet_variance():
    b, n = 4, 20000
    c = mixing_coefficients(n, b, gen(0), "dirichlet", alpha=1.0)
    assert torch.allclose(c.mean(0), torch.full((b,), 1 / b), atol=0.01)
    # Var c_j = (B − 1) / (B² (B + 1)) for Dir(1): 0.0375 at B = 4 (uniform-over-row-sum has ≈ 0.029, softmax less)
    assert torch.allclose(c.var(0), torch.full((b,), (b - 1) / (b**2 * (b + 1))), rtol=0.05)
    # Dir(α) with α < 1 is sparser: Var = (B − 1) / (B² (Bα + 1)) = 0.0625 at α = 0.5
    c_half = mixing_coefficients(n, b, gen(1), "dirichlet", alpha=0.5)
    assert torch.allclose(c_half.var(0), torch.full((b,), (b - 1) / (b**2 * (b * 0.5 + 1))), rtol=0.06)


def test_mix_row_is_the_coefficient_weighted_sum_of_anchors():
    c = mixing_coefficients(5, 3, gen(2))
    w = torch.randn(3, 6, generator=gen(4))
    by_hand = torch.stack([sum(c[i, j] * w[j] for j in range(3)) for i in range(5)])
    assert mix_styles(c, w).shape == (5, 6)
    assert torch.allclose(mix_styles(c, w), by_hand, atol=1e-6)


# -------------------------------------------------------------------------------------------------- distance loss


def test_kl_is_zero_when_the_similarities_reproduce_the_coefficients():
    """Anchors e_1..e_B, mix = (c_1, …, c_B, √(1 − Σc²)) is a unit vector whose cosine with e_j is c_j, so
    softmax(sims) = softmax(c). Features are [·, 1, 2, 2] maps, so the flattening is exercised."""
    c = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    anchors = torch.eye(3, 4).reshape(3, 1, 2, 2)
    mix = torch.cat([c, (1 - c.square().sum(1, keepdim=True)).sqrt()], 1).reshape(2, 1, 2, 2)
    assert torch.allclose(cosine_similarities(mix, anchors), c, atol=1e-6)
    assert mixdl_distance_loss(c, mix, anchors).abs() < 1e-6
    moved = mix.clone()
    moved[:, 0, 0, 0] += 0.5  # a different direction: q no longer equals p
    assert mixdl_distance_loss(c, moved, anchors) > 1e-3


def test_two_anchor_kl_equals_the_hand_computed_value():
    """c = (0.7, 0.3), anchors (1, 0) and (0, 2), mix (3, 1): cos = (3/√10, 1/√10) (dot products would be (3, 2))."""
    c = torch.tensor([[0.7, 0.3]])
    anchors, mix = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 1.0]])
    p = softmax_by_hand([0.7, 0.3])
    q = softmax_by_hand([3 / math.sqrt(10), 1 / math.sqrt(10)])
    expected = kl_by_hand(p, q)
    assert expected > 1e-3
    assert mixdl_distance_loss(c, mix, anchors).item() == pytest.approx(expected, rel=1e-5)
    assert mixdl_distance_loss(c, mix, anchors, weight=1000.0).item() == pytest.approx(1000 * expected, rel=1e-5)
    # "mean" (official nn.KLDivLoss() default) divides by the B = 2 anchors too
    assert mixdl_distance_loss(c, mix, anchors, reduction="mean").item() == pytest.approx(expected / 2, rel=1e-5)


def test_loss_averages_the_per_sample_kl_over_mixup_samples():
    c = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    anchors, mix = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 1.0], [1.0, -1.0]])
    per_sample = [kl_by_hand(softmax_by_hand(c[i].tolist()), softmax_by_hand(
        [cos_by_hand(mix[i], anchors[j]) for j in range(2)])) for i in range(2)]
    kl = distance_kl(c, cosine_similarities(mix, anchors))
    assert torch.allclose(kl, torch.tensor(per_sample, dtype=torch.float32), rtol=1e-5)
    assert mixdl_distance_loss(c, mix, anchors).item() == pytest.approx(sum(per_sample) / 2, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------- G side


def test_layer_helper_returns_the_hooked_layer_activation_of_a_manual_forward(G):
    syn = G.synthesis
    names = g_layer_names(syn)
    assert names == ["b4.conv1", "b8.conv0", "b8.conv1", "b16.conv0", "b16.conv1", "b32.conv0", "b32.conv1"]
    ws = G.map(torch.randn(3, 16, generator=gen(1)))[0][:, None].expand(-1, G.num_ws, -1)
    images, acts = synthesis_activations(syn, ws, [2, 4], noise_mode="const")
    # manual forward block by block: a block returns the output of its last conv (conv1)
    x, img = syn.b4(None, None, ws[:, 0:2], noise_mode="const")
    x, img = syn.b8(x, img, ws[:, 1:4], noise_mode="const")
    assert torch.allclose(acts[2], x, atol=1e-6)  # layer 2 = b8.conv1
    x, img = syn.b16(x, img, ws[:, 3:6], noise_mode="const")
    assert torch.allclose(acts[4], x, atol=1e-6)  # layer 4 = b16.conv1
    x, img = syn.b32(x, img, ws[:, 5:8], noise_mode="const")
    assert torch.allclose(images, img, atol=1e-6)
    assert acts[2].shape == (3, syn.b8.out_channels, 8, 8) and set(acts) == {2, 4}


def test_random_layers_are_seeded_and_leave_out_the_first_and_last_layer():
    layers = random_layers(7, 2000, gen(5))
    assert torch.equal(layers, random_layers(7, 2000, gen(5)))
    assert set(layers.tolist()) == {1, 2, 3, 4, 5}  # official randint(1, num_layers − 1)


def test_one_hot_coefficients_reduce_to_the_anchor_form(G):
    """c one-hot (a permutation, so c and cᵀ differ): each mix is exactly an anchor's w, its features equal that
    anchor's (const noise), cos = 1 with it, and the loss is λ_G · mean_k KL(softmax(one-hot) ‖ q_k) by hand."""
    perm = [2, 0, 1]
    c = torch.eye(3)[perm]
    z = torch.randn(3, 16, generator=gen(3))
    w = G.map(z)[0]
    assert torch.equal(mix_styles(c, w), w[perm])
    s = MixDLSettings(layer_per_sample=False)
    term = g_mixdl_term(G, gen(4), w=w, coefficients=c, settings=s, noise_mode="const")
    layer = int(term.layers[0])
    assert torch.equal(term.layers, torch.full((3,), layer)) and 1 <= layer <= 5
    _, acts = synthesis_activations(G.synthesis, w[:, None].expand(-1, G.num_ws, -1), [layer], noise_mode="const")
    f = acts[layer].detach()
    p_onehot = softmax_by_hand([1.0, 0.0, 0.0])  # p for the anchor itself first
    kls = []
    for i, k in enumerate(perm):
        sims = [cos_by_hand(f[k], f[j]) for j in range(3)]
        q = softmax_by_hand(sims)
        p = [p_onehot[0] if j == k else p_onehot[1] for j in range(3)]
        kls.append(kl_by_hand(p, q))
        assert sims[k] == pytest.approx(1.0, abs=1e-6)
        assert torch.allclose(term.images[3 + i], term.images[k], atol=1e-5)  # the mix is the anchor's image
    assert term.loss.item() == pytest.approx(1000.0 * sum(kls) / 3, rel=1e-4)
    assert term.stats["mixdl/g_kl"].item() == pytest.approx(sum(kls) / 3, rel=1e-4)


def test_g_term_is_seeded_per_sample_and_sends_gradients_into_g(G):
    z = torch.randn(4, 16, generator=gen(6))
    term = g_mixdl_term(G, gen(9), z=z)
    again = g_mixdl_term(G, gen(9), z=z)
    assert torch.equal(term.coefficients, again.coefficients) and torch.equal(term.layers, again.layers)
    assert term.loss.item() == pytest.approx(again.loss.item(), rel=1e-6)
    assert term.coefficients.shape == (4, 4) and term.images.shape == (8, 3, 32, 32)
    assert term.layers.shape == (4,) and term.loss.item() > 0
    # each mixup sample is compared with the anchors at its own layer (official feat_ind[pair1])
    const = g_mixdl_term(G, gen(11), z=z, noise_mode="const")
    assert len(set(const.layers.tolist())) > 1
    w = G.map(z)[0].detach()
    ws = torch.cat([w, mix_styles(const.coefficients, w)])[:, None].expand(-1, G.num_ws, -1)
    _, acts = synthesis_activations(G.synthesis, ws, const.layers.tolist(), noise_mode="const")
    kls = [kl_by_hand(softmax_by_hand(const.coefficients[i].tolist()),
                      softmax_by_hand([cos_by_hand(acts[int(layer)][4 + i], acts[int(layer)][j]) for j in range(4)]))
           for i, layer in enumerate(const.layers)]
    assert const.loss.item() == pytest.approx(1000.0 * sum(kls) / 4, rel=1e-4)
    term.loss.backward()
    for name in ("mapping.fc0.weight", "synthesis.b4.const", "synthesis.b8.conv0.weight",
                 "synthesis.b8.conv0.affine.weight"):
        grad = dict(G.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------------------- D side


def test_d_term_matches_the_distance_loss_on_projected_features_and_trains_the_head(D):
    torch.manual_seed(2)
    head = ProjectionHead(D.trunk.widths[-1], proj_dim=8)
    anchors, mixes = torch.randn(4, 3, 32, 32), torch.randn(3, 3, 32, 32)
    c = mixing_coefficients(3, 4, gen(1))
    term = d_mixdl_term(D, head, anchors, mixes, c)
    with torch.no_grad():
        proj = head(D(torch.cat([anchors, mixes]), update=False).features)
    assert term.loss.item() == pytest.approx(mixdl_distance_loss(c, proj[4:], proj[:4]).item(), rel=1e-5)
    assert term.logits.shape == (7,) and term.stats["mixdl/d"].item() == pytest.approx(term.loss.item())
    term.loss.backward()
    assert head.linear.weight.grad is not None and head.linear.weight.grad.abs().sum() > 0
    assert D.trunk.head.fc.weight.grad.abs().sum() > 0


def test_patch_head_gives_one_logit_per_patch_of_the_chosen_d_map(D, params):
    taps = patch_taps(D, params.model.resolution, sides=(8, 4))
    # 32 px: blocks 32→16, 16→8, 8→4; conv0 at the block's input side, conv1 at half of it
    assert [(n, s) for n, _, s in taps] == [("trunk.blocks.1.conv1", 8), ("trunk.blocks.2.conv0", 8),
                                            ("trunk.blocks.2.conv1", 4)]
    assert [n for n, _, _ in patch_taps(D, 32)] == ["trunk.blocks.2.conv1"]  # default sides {R/8, R/16} = {4, 2}
    head = MixupPatchHead(taps)
    x = torch.randn(5, 3, 32, 32)
    for i, side in enumerate([8, 8, 4]):
        logits = patch_logits(D, head, x, i)
        assert logits.shape == (5, side, side)
    # the logits are the head's conv on that D map
    maps = {}
    handle = D.trunk.blocks[2].conv0.register_forward_hook(lambda m, i, o: maps.setdefault("m", o))
    D(x, update=False)
    handle.remove()
    assert torch.allclose(patch_logits(D, head, x, 1), head.convs[1](maps["m"]).squeeze(1), atol=1e-6)
    patch_logits(D, head, x, 2).sum().backward()
    assert head.convs[2].weight.grad.abs().sum() > 0 and head.convs[0].weight.grad is None


def test_settings_follow_the_official_schedule_and_reject_bad_values():
    s = MixDLSettings()
    assert (s.lambda_g, s.lambda_d, s.every) == (1000.0, 1.0, 2)
    assert [s.due(i) for i in range(4)] == [False, True, False, True]  # official: i % interp_freq > 0
    assert [MixDLSettings(every=3).due(i) for i in range(6)] == [False, False, True, False, False, True]
    assert all(MixDLSettings(every=1).due(i) for i in range(3))
    with pytest.raises(ValueError, match="mixdl.every"):
        MixDLSettings(every=0)
    with pytest.raises(ValueError, match="dirichlet_alpha"):
        MixDLSettings(dirichlet_alpha=0.0)
