"""Cluster-guided sampling (sqgan.sampling.cluster): k-means on features of generated images, a nearest-centroid
classifier, per-cluster IMLE latent maps, cluster accuracy and FID cost, on a generator with two known modes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from sqgan.metrics.evaluate import generate_uint8
from sqgan.metrics.features import RandomCNNFeatures
from sqgan.metrics.fid import fid_from_features
from sqgan.models.base import GeneratorOutput
from sqgan.sampling.cluster import (
    SAMPLER_FORMAT,
    ClusterLatentMaps,
    ClusterSampler,
    LatentClusters,
    cluster_accuracy,
    cluster_latents,
    fid_cost,
    fit_cluster_sampler,
    image_batches,
    imle_loss,
    latent_features,
    nearest_centroid,
    proportional_counts,
    seeded_latents,
    train_imle,
)

Z_DIM, RES = 8, 8
N_CLUSTERED = 400
FIT = {"steps": 300, "hidden": 64, "num_samples": 128, "targets_per_step": 64, "lr": 3e-3}  # small, converged


class TwoModeGenerator(nn.Module):
    """Images bright (+0.6) when z[0] > 0 and dark (−0.6) otherwise, plus a little texture that varies with all of z."""

    def __init__(self, texture_seed: int = 123, z_dim: int = Z_DIM) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(texture_seed)
        self.register_buffer("texture", torch.randn(z_dim, 3 * RES * RES, generator=g))
        self.z_dim = z_dim

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None,
                noise_mode: str = "random") -> GeneratorOutput:
        level = torch.where(z[:, :1] > 0, 0.6, -0.6)
        images = (level + 0.15 * torch.tanh(z @ self.texture / math.sqrt(self.z_dim))).view(-1, 3, RES, RES)
        return GeneratorOutput(images, z[:, None], z.new_zeros(()))


def channel_stats(images: torch.Tensor) -> torch.Tensor:
    """[N, 6]: per-channel mean and std of uint8 images in [0, 1]."""
    x = images.double() / 255
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def bright_cluster(clusters: LatentClusters) -> int:
    """The cluster whose centroid has the larger mean brightness (features 0..2 are channel means)."""
    return int(clusters.centroids[:, :3].mean(dim=1).argmax())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread, or OpenMP's spin-waits make a step ~50x slower on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def G() -> TwoModeGenerator:
    return TwoModeGenerator()


@pytest.fixture(scope="module")
def clusters(G: TwoModeGenerator) -> LatentClusters:
    return cluster_latents(G, Z_DIM, N_CLUSTERED, 2, channel_stats, seed=0, n_init=4)


@pytest.fixture(scope="module")
def sampler(G: TwoModeGenerator, clusters: LatentClusters) -> ClusterSampler:
    return fit_cluster_sampler(G, clusters, seed=0, **FIT)


# ------------------------------------------------------------------------------------------ codes and clustering
def test_seeded_latents_give_generate_uint8s_images_across_a_chunk_boundary() -> None:
    G3 = TwoModeGenerator(z_dim=3)  # 3-d codes: one randn(1030, 3) differs from chunks of 1024 after row 1024
    n = 1030  # past Z_CHUNK = 1024: the second chunk must be drawn as generate_uint8 draws it
    ours = torch.cat(list(image_batches(G3, seeded_latents(n, 3, 5), batch=100)))
    theirs = torch.cat(list(generate_uint8(G3, n, 3, 64, 5, torch.device("cpu"))))
    assert torch.equal(ours, theirs)


def test_kmeans_with_k2_finds_the_two_modes(clusters: LatentClusters) -> None:
    bright = bright_cluster(clusters)
    is_bright = clusters.z[:, 0] > 0
    assert torch.equal(clusters.labels == bright, is_bright)  # every code lands in its mode's cluster
    assert clusters.sizes.tolist()[bright] == int(is_bright.sum())
    assert torch.all(clusters.members(bright)[:, 0] > 0) and torch.all(clusters.members(1 - bright)[:, 0] <= 0)
    means = clusters.centroids[:, :3].mean(dim=1)  # (±0.6 + 1) / 2 in [0, 1], the texture averaging out
    assert means[bright] == pytest.approx(0.8, abs=0.03) and means[1 - bright] == pytest.approx(0.2, abs=0.03)


def test_random_cnn_features_pool_is_used_and_separates_the_modes(G: TwoModeGenerator) -> None:
    net = RandomCNNFeatures(seed=0, num_features=16, size=16, num_classes=4)
    cl = cluster_latents(G, Z_DIM, 120, 2, net, seed=0, n_init=2)
    assert cl.features.shape == (120, 16)  # the pool of (pool, logits), not the logits
    first = next(image_batches(G, cl.z[:5]))
    assert torch.allclose(cl.features[:5], net(first)[0].double())
    assert cl.feature_net == "randcnn"
    agree = (cl.labels == (cl.z[:, 0] > 0).long()).double().mean().item()
    assert max(agree, 1 - agree) == 1.0


def test_nearest_centroid_takes_the_closest_centroid_on_a_hand_example() -> None:
    centroids = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.tensor([[1.0, 1.0], [9.0, 2.0], [4.0, 6.0], [4.9, 0.0], [-50.0, 0.0]])
    assert nearest_centroid(points, centroids).tolist() == [0, 1, 2, 0, 0]


def test_nearest_centroid_reproduces_kmeans_and_labels_held_out_images(G: TwoModeGenerator,
                                                                       clusters: LatentClusters) -> None:
    assert torch.equal(nearest_centroid(clusters.features, clusters.centroids), clusters.labels)
    z = seeded_latents(300, Z_DIM, 99)  # codes k-means never saw
    predicted = nearest_centroid(latent_features(G, z, channel_stats), clusters.centroids)
    assert torch.equal(predicted == bright_cluster(clusters), z[:, 0] > 0)


# ------------------------------------------------------------------------------------------ IMLE
def test_imle_loss_pulls_each_targets_nearest_sample_on_a_hand_example() -> None:
    targets = torch.tensor([[-3.0], [3.0]])
    samples = torch.tensor([[2.6], [3.5], [4.0]], requires_grad=True)
    loss = imle_loss(targets, samples)
    assert loss.item() == pytest.approx((5.6**2 + 0.4**2) / 2)  # both targets' nearest sample is 2.6
    loss.backward()
    # d/ds ((s + 3)² + (s − 3)²) / 2 = 2s at s = 2.6; the other samples are no target's nearest: no gradient
    assert samples.grad.flatten().tolist() == pytest.approx([5.2, 0.0, 0.0])


def test_imle_loss_is_per_cluster_on_batched_inputs() -> None:
    targets = torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]]])  # [k=2, b=1, d=2]
    samples = torch.tensor([[[1.0, 0.0], [5.0, 0.0]], [[0.0, 3.0], [0.0, -2.0]]])  # [2, m=2, 2]
    assert imle_loss(targets, samples).tolist() == pytest.approx([1.0, 4.0])


def test_imle_training_brings_samples_near_both_targets_at_plus_minus_3() -> None:
    targets = torch.tensor([[-3.0]] * 16 + [[3.0]] * 16)
    maps = ClusterLatentMaps(1, 1, hidden=32, layers=2, seed=0)
    draws, m = 200, 16
    e = torch.randn(draws * m, 1, generator=torch.Generator().manual_seed(1))

    def distances() -> torch.Tensor:  # [draws, 2]: each target's distance to its nearest of m samples, per draw
        with torch.no_grad():
            s = maps.map_cluster(0, e).view(draws, m, 1)
        return (s - torch.tensor([-3.0, 3.0])).abs().min(dim=1).values

    before = distances()
    losses = train_imle(maps, [targets], steps=300, num_samples=m, targets_per_step=32, lr=1e-2, seed=0)
    after = distances()
    assert before.mean() > 1.0 and after.mean() < 0.4  # 16 draws of N(0, 1) seldom reach ±3; the trained map does
    assert (before < 0.3).double().mean(dim=0).max() < 0.15
    assert (after < 0.3).double().mean(dim=0).min() > 0.5  # each target, not just one of them
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20


def test_untrained_latent_maps_are_the_identity() -> None:
    e = torch.randn(5, 3)
    maps = ClusterLatentMaps(4, 3, hidden=8, layers=2, seed=0)
    assert torch.equal(maps.map_cluster(2, e), e)


def test_imle_sampler_hits_its_cluster_and_unconditional_sampling_hits_it_at_its_share(
        sampler: ClusterSampler, clusters: LatentClusters) -> None:
    acc = cluster_accuracy(sampler, channel_stats, n_per_cluster=200, seed=1)
    share = (clusters.sizes.double() / N_CLUSTERED).tolist()
    assert min(acc.per_cluster) >= 0.95
    assert acc.overall == pytest.approx(sum(acc.per_cluster) / 2)
    assert acc.unconditional_per_cluster == pytest.approx(share, abs=0.06)  # chance: each cluster's share
    assert acc.unconditional_overall == pytest.approx(0.5)
    assert [sum(row) for row in acc.confusion] == [200, 200]
    assert [acc.confusion[j][j] / 200 for j in range(2)] == acc.per_cluster
    bright = bright_cluster(clusters)
    assert (sampler.latents(bright, 500, torch.Generator().manual_seed(2))[:, 0] > 0).double().mean() >= 0.95
    assert (sampler.latents(1 - bright, 500, torch.Generator().manual_seed(2))[:, 0] <= 0).double().mean() >= 0.95


def test_untrained_sampler_hits_a_cluster_only_at_chance(G: TwoModeGenerator, clusters: LatentClusters) -> None:
    untrained = fit_cluster_sampler(G, clusters, seed=0, **{**FIT, "steps": 0})
    acc = cluster_accuracy(untrained, channel_stats, n_per_cluster=200, seed=1)
    assert acc.per_cluster == pytest.approx(acc.unconditional_per_cluster, abs=0.1)
    assert max(acc.per_cluster) < 0.65


def test_sample_draws_images_of_the_asked_cluster(sampler: ClusterSampler, clusters: LatentClusters) -> None:
    bright = bright_cluster(clusters)
    images = sampler.sample(bright, 64, torch.Generator().manual_seed(3), batch=10)
    assert images.shape == (64, 3, RES, RES) and images.dtype == torch.uint8
    assert (images.double().mean(dim=(1, 2, 3)) > 127.5).double().mean() >= 0.95
    with pytest.raises(ValueError, match=r"cluster 2 does not exist: this sampler has clusters 0\.\.1"):
        sampler.sample(2, 4)


def test_train_imle_refuses_an_empty_cluster() -> None:
    with pytest.raises(ValueError, match=r"clusters \[1\] have no members"):
        train_imle(ClusterLatentMaps(2, 2), [torch.zeros(3, 2), torch.zeros(0, 2)], steps=1)


# ------------------------------------------------------------------------------------------ reproducibility, files
def test_seeded_runs_are_identical_and_another_seed_differs(G: TwoModeGenerator, clusters: LatentClusters) -> None:
    again = cluster_latents(G, Z_DIM, N_CLUSTERED, 2, channel_stats, seed=0, n_init=4)
    assert torch.equal(again.z, clusters.z) and torch.equal(again.labels, clusters.labels)
    assert torch.equal(again.centroids, clusters.centroids)
    fit = {**FIT, "steps": 30}
    a, b = (fit_cluster_sampler(G, clusters, seed=4, **fit) for _ in range(2))
    c = fit_cluster_sampler(G, clusters, seed=5, **fit)
    assert a.losses == b.losses
    for name, t in a.maps.state_dict().items():
        assert torch.equal(t, b.maps.state_dict()[name]), name
    assert a.losses != c.losses


def test_save_load_round_trips_exactly(tmp_path: Path, G: TwoModeGenerator, sampler: ClusterSampler) -> None:
    path = tmp_path / "samplers" / "cluster.pt"
    sampler.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["cluster.pt"]  # the atomic write left no temp file
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == SAMPLER_FORMAT and raw["meta"]["k"] == 2
    loaded = ClusterSampler.load(path, G)
    for name, t in sampler.maps.state_dict().items():
        assert torch.equal(t, loaded.maps.state_dict()[name]), name
    assert torch.equal(loaded.centroids, sampler.centroids) and torch.equal(loaded.sizes, sampler.sizes)
    assert loaded.meta == sampler.meta and loaded.losses == sampler.losses
    draws = [s.sample(1, 16, torch.Generator().manual_seed(8)) for s in (sampler, loaded)]
    assert torch.equal(draws[0], draws[1])
    with pytest.raises(ValueError, match="was fit for the generator with weights sha256"):
        ClusterSampler.load(path, TwoModeGenerator(texture_seed=7))


# ------------------------------------------------------------------------------------------ proportions, FID cost
def test_proportional_counts_split_n_by_size_exactly() -> None:
    assert proportional_counts([3, 1], 8) == [6, 2]
    assert proportional_counts([1, 1, 1], 10) == [4, 3, 3]  # the remainder goes to the lowest index on a tie
    assert proportional_counts(torch.tensor([5, 0, 15]), 7) == [2, 0, 5]  # quotas 1.75, 0, 5.25


def test_fid_cost_is_zero_when_the_samplers_images_are_the_unconditional_ones(
        G: TwoModeGenerator, clusters: LatentClusters) -> None:
    identity = fit_cluster_sampler(G, clusters, seed=0, **{**FIT, "steps": 0})  # T_j(e) = e for both clusters
    z, cluster = identity.mixture_latents(300, seed=6)
    assert torch.equal(z, seeded_latents(300, Z_DIM, 6))
    G3 = TwoModeGenerator(z_dim=3)  # past a chunk with 3-d codes, where only the chunked draw matches
    identity3 = ClusterSampler(G3, ClusterLatentMaps(2, 3, hidden=4), clusters.centroids, clusters.sizes)
    assert torch.equal(identity3.mixture_latents(1030, seed=6)[0], seeded_latents(1030, 3, 6))
    assert torch.bincount(cluster).tolist() == proportional_counts(clusters.sizes, 300)
    reference = latent_features(G, seeded_latents(500, Z_DIM, 11), channel_stats)
    cost = fid_cost(identity, channel_stats, reference, n=300, seed=6)
    assert cost.cost == 0.0 and cost.fid_sampler == cost.fid_unconditional
    unconditional = latent_features(G, seeded_latents(300, Z_DIM, 6), channel_stats)
    assert cost.fid_unconditional == pytest.approx(fid_from_features(reference, unconditional), rel=1e-12)


def test_fid_cost_is_positive_when_the_sampler_drops_a_mode(G: TwoModeGenerator, clusters: LatentClusters,
                                                            sampler: ClusterSampler) -> None:
    reference = latent_features(G, seeded_latents(500, Z_DIM, 11), channel_stats)
    planted = fit_cluster_sampler(G, clusters, seed=0, **{**FIT, "steps": 0})
    with torch.no_grad():
        planted.maps.biases[-1][:, 0] = 6.0  # every code's z[0] pushed positive: only bright images
    dropped = fid_cost(planted, channel_stats, reference, n=300, seed=6)
    trained = fid_cost(sampler, channel_stats, reference, n=300, seed=6)
    assert dropped.fid_unconditional == trained.fid_unconditional  # the same unconditional images
    assert dropped.cost > 0.3  # half the reference is dark: ‖Δμ‖² alone is ~3 · 0.3² (channel means 0.8 vs 0.5)
    assert trained.cost < 0.1 * dropped.cost  # the trained sampler keeps both modes in their proportions
    assert dropped.counts == trained.counts == proportional_counts(clusters.sizes, 300)
