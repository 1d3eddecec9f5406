"""Multi-modal truncation (Self-Distilled StyleGAN): ψ's two ends, the LPIPS and W assignments, k-means on w, the
centres cache beside a checkpoint, and global truncation as StyleGAN's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sqgan.config import default_params
from sqgan.metrics.evaluate import to_uint8
from sqgan.metrics.features import LPIPSNet
from sqgan.models.factory import build_generator
from sqgan.sampling import truncation as T

torch.set_num_threads(1)

Z_DIM, W_DIM = 16, 32


def tiny_g(*extra: str, seed: int = 0):
    params = default_params(["model.arch=stylegan2", "model.resolution=32", f"model.z_dim={Z_DIM}",
                             f"model.w_dim={W_DIM}", "model.channel_base=512", "model.channel_max=16",
                             "model.mapping_layers=2", "sq.codebook_size=8", *extra])
    torch.manual_seed(seed)
    return build_generator(params).eval()


@pytest.fixture(scope="module")
def G():
    return tiny_g()  # with the style quantizer (sq.enabled is the default): rendering must go through it


@pytest.fixture(scope="module")
def centres(G):
    return T.fit_centres(G, n=300, n_clusters=4, seed=0, batch=128)


@pytest.fixture(scope="module")
def lpips_net():
    return LPIPSNet("alex")  # random backbone: no weights can be downloaded here


def z_of(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, Z_DIM, generator=torch.Generator().manual_seed(seed))


def untruncated_images(G, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return to_uint8(G(z, noise_mode="const").images)


@pytest.mark.parametrize("assign", ["lpips", "l2"])
def test_psi_one_is_the_identity(G, centres, lpips_net, assign):
    z = z_of(6)
    out = T.sample(G, z, 1.0, "multimodal", assign, centres=centres, lpips_net=lpips_net)
    assert torch.equal(out.images, untruncated_images(G, z))  # as Generator.forward renders, quantizer included
    with torch.no_grad():
        assert torch.equal(out.w, G.mapping(z))
    assert out.assignment.shape == (6,) and out.assignment.max() < 4


def test_psi_zero_returns_the_assigned_centre_and_its_image(G, centres, lpips_net):
    z = z_of(8, seed=2)
    out = T.sample(G, z, 0.0, "multimodal", "lpips", centres=centres, lpips_net=lpips_net)
    assert torch.equal(out.w, centres.w[out.assignment])
    assert torch.equal(out.images, centres.images[out.assignment])


def test_intermediate_psi_moves_w_toward_its_centre(G, centres):
    z = z_of(8, seed=3)
    out = T.sample(G, z, 0.3, "multimodal", "l2", centres=centres)
    with torch.no_grad():
        w = G.mapping(z)
    assert torch.equal(out.assignment, torch.cdist(w, centres.w).argmin(1))
    c = centres.w[out.assignment]
    torch.testing.assert_close(out.w, c + 0.3 * (w - c))
    assert ((out.w - c).norm(dim=1) < (w - c).norm(dim=1)).all()


def test_lpips_assignment_uses_the_image_of_the_untruncated_w(G, centres, lpips_net):
    z = z_of(48, seed=4)
    out = T.sample(G, z, 0.5, "multimodal", "lpips", centres=centres, lpips_net=lpips_net, batch=16)
    d = torch.stack([lpips_net(untruncated_images(G, z), centres.images[k : k + 1].expand(48, -1, -1, -1))
                     for k in range(4)], dim=1)  # brute force, one centre at a time through LPIPSNet itself
    assert torch.equal(out.assignment, d.argmin(1)) and len(out.assignment.unique()) > 1


def photos(size: int = 64) -> torch.Tensor:
    """Six clearly different photos (skimage.data) as uint8 [6, 3, size, size]."""
    import skimage.data as data

    out = []
    for name in ("astronaut", "camera", "coffee", "chelsea", "rocket", "immunohistochemistry"):
        img = torch.from_numpy(np.ascontiguousarray(getattr(data, name)()))
        img = img[..., None].expand(-1, -1, 3) if img.dim() == 2 else img[..., :3]
        x = img.permute(2, 0, 1)[None].float()
        out.append(F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8)


def test_lpips_assignment_picks_the_planted_source_photo(lpips_net):
    ref = photos()
    gen = torch.Generator().manual_seed(0)
    source = torch.tensor([3, 0, 5, 1, 4, 2, 2, 0, 3, 1])
    noisy = (ref[source].float() + 12 * torch.randn(ref[source].shape, generator=gen)).round().clamp(0, 255)
    noisy = noisy.to(torch.uint8)
    assert torch.equal(T.assign_lpips(noisy, ref, lpips_net, batch=4), source)


def test_lpips_distances_equal_lpipsnet_pair_by_pair_for_any_batch(lpips_net):
    ref = photos()
    gen = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (5, 3, 64, 64), generator=gen, dtype=torch.uint8)
    imgs[:2] = ref[:2]  # two exact matches: distance 0 to their own photo
    brute = torch.stack([lpips_net(imgs, ref[k : k + 1].expand(5, -1, -1, -1)) for k in range(6)], dim=1)
    for batch in (1, 2, 64):
        d = T.lpips_distances(imgs, ref, lpips_net, batch=batch)
        torch.testing.assert_close(d, brute, atol=2e-5, rtol=1e-4)
    assert d[0, 0].abs() < 1e-5 and d[1, 1].abs() < 1e-5 and d[0, 1] > 0.05


def test_l2_assignment_picks_the_nearest_centre_in_w():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    w = torch.tensor([[1.0, 1.0], [9.0, -1.0], [-2.0, 11.0], [6.0, 1.0], [4.0, 4.5], [3.0, 7.0]])
    assert T.assign_l2(w, centres).tolist() == [0, 1, 2, 1, 0, 2]


def test_kmeans_recovers_planted_clusters_of_w():
    gen = torch.Generator().manual_seed(0)
    means = 20 * torch.randn(3, 8, generator=gen)  # few clusters: random init (the paper's) can stall with many
    labels = torch.arange(300) % 3
    w = means[labels] + 0.3 * torch.randn(300, 8, generator=gen)
    found, inertia = T.kmeans_centres(w, n_clusters=3, seed=0)
    nearest = torch.cdist(means, found).argmin(1)
    assert sorted(nearest.tolist()) == [0, 1, 2]  # one centre per planted cluster
    torch.testing.assert_close(found[nearest], means, atol=0.1, rtol=0)
    # inertia: Σ of squared distances to the nearest centre (≈ 300 · 8 · 0.3² for the planted noise)
    assert inertia == pytest.approx(float(torch.cdist(w, found).min(1).values.pow(2).sum()), rel=1e-3)
    assert 0.7 * 300 * 8 * 0.09 < inertia < 1.3 * 300 * 8 * 0.09
    assert T.kmeans_centres(w, n_clusters=6, seed=0)[1] < inertia  # more centres, less inertia: the elbow's y


def test_centres_are_kmeans_of_the_unquantized_mapped_w(G, centres):
    from sklearn.cluster import KMeans

    z = torch.randn(1024, Z_DIM, generator=torch.Generator().manual_seed(0))[:300]  # generate_uint8's draws
    with torch.no_grad():
        w = G.mapping(z)
    want = KMeans(n_clusters=4, init="random", random_state=0).fit(w.numpy()).cluster_centers_
    torch.testing.assert_close(centres.w, torch.from_numpy(want).float(), atol=1e-5, rtol=1e-5)
    assert centres.w.shape == (4, W_DIM) and centres.images.dtype == torch.uint8
    assert torch.equal(centres.images, untruncated_images_of_w(G, centres.w))
    assert not G.training and G.mapping.w_avg.abs().sum() == 0  # fitting never updates w_avg


def untruncated_images_of_w(G, w: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        ws = G.quantizer(w).quantized[:, None].expand(-1, G.num_ws, -1)
        return to_uint8(G.synthesis(ws, noise_mode="const"))


def test_fitting_without_a_mapping_network_names_the_fix():
    G = build_generator(default_params(["model.arch=dcgan", "model.g_channels=8", "model.d_channels=8",
                                        "sq.enabled=false"]))
    with pytest.raises(ValueError, match=r"needs a mapping network.*has none.*model.arch=stylegan2 or sq.enabled=true"):
        T.fit_centres(G, n=64, n_clusters=2)


def test_cache_round_trips_exactly_and_refuses_another_generator_or_settings(G, centres, tmp_path):
    path = T.centres_path(tmp_path / "ckpt" / "g_ema.pt")
    assert path == tmp_path / "ckpt" / "g_ema.mmt-centres.pt"
    T.save_centres(centres, path)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left behind
    back = T.load_centres(path, G, n=300, n_clusters=4, seed=0)
    assert torch.equal(back.w, centres.w) and torch.equal(back.images, centres.images)
    assert (back.n, back.seed, back.g_sha256) == (300, 0, T.generator_fingerprint(G))
    with pytest.raises(T.StaleCentres, match=r"g_ema.mmt-centres.pt.*n_clusters 4 ≠ 8.*load_or_fit"):
        T.load_centres(path, G, n=300, n_clusters=8, seed=0)
    with pytest.raises(T.StaleCentres, match=r"seed 0 ≠ 1"):
        T.load_centres(path, G, n=300, n_clusters=4, seed=1)
    other = tiny_g()
    with torch.no_grad():
        other.synthesis.parameters().__next__().add_(1e-3)  # the same G but one weight nudged
    with pytest.raises(T.StaleCentres, match=r"g_ema.mmt-centres.pt.*G's weights differ.*delete it"):
        T.load_centres(path, other, n=300, n_clusters=4, seed=0)


def test_load_or_fit_reuses_a_matching_cache_and_refits_a_stale_one(G, centres, tmp_path):
    path = tmp_path / "g.mmt-centres.pt"
    T.save_centres(centres, path)
    got, fitted = T.load_or_fit(G, path, n=300, n_clusters=4, seed=0)
    assert not fitted and torch.equal(got.w, centres.w)
    other = tiny_g(seed=1)
    got, fitted = T.load_or_fit(other, path, n=300, n_clusters=4, seed=0, batch=128)
    assert fitted and got.g_sha256 == T.generator_fingerprint(other) != centres.g_sha256
    assert not torch.allclose(got.w, centres.w)
    assert T.load_centres(path, other, n=300, n_clusters=4, seed=0).g_sha256 == got.g_sha256  # written back
    path.write_bytes(b"")  # a damaged cache is refitted, not trusted
    assert T.load_or_fit(other, path, n=300, n_clusters=4, seed=0)[1]


def test_global_truncation_is_stylegans_toward_w_avg(G):
    z = z_of(6, seed=5)
    with torch.no_grad():
        G.mapping.w_avg.copy_(torch.randn(W_DIM, generator=torch.Generator().manual_seed(7)))
        try:
            out = T.sample(G, z, 0.6, "global")
            w = G.mapping(z)
            torch.testing.assert_close(out.w, G.mapping.w_avg + 0.6 * (w - G.mapping.w_avg))
            assert torch.equal(out.images, to_uint8(G(z, truncation_psi=0.6, noise_mode="const").images))
            assert not torch.equal(out.images, untruncated_images(G, z)) and out.assignment is None
        finally:
            G.mapping.w_avg.zero_()


def test_mode_none_is_plain_sampling(G):
    z = z_of(5, seed=6)
    out = T.sample(G, z, 0.2, "none")
    assert torch.equal(out.images, untruncated_images(G, z)) and out.assignment is None


@pytest.mark.parametrize("psi", [-0.1, float("nan"), float("inf")])
def test_bad_psi_is_refused(G, centres, psi):
    with pytest.raises(ValueError, match=r"truncation psi must be a finite number ≥ 0"):
        T.sample(G, z_of(2), psi, "multimodal", "l2", centres=centres)


def test_lpips_assignment_without_an_lpips_net_names_the_fix(G, centres):
    with pytest.raises(ValueError, match=r"needs an LPIPS net.*LPIPSNet.*sample.assign=l2"):
        T.sample(G, z_of(2), 0.5, "multimodal", "lpips", centres=centres)
