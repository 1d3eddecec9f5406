"""Quality metrics: parity with independent computations (scipy sqrtm for FID, brute-force loops for KID, IS and
precision/recall), independence of the batch size, honest names, provenance, and the real-feature cache."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from sqgan.config import Params
from sqgan.metrics.codebook import perplexity, utilisation
from sqgan.metrics.evaluate import Evaluator, RealFeatureCache, Reference, generate_uint8, keys_of
from sqgan.metrics.features import INCEPTION_SHA256_PREFIX, RandomCNNFeatures, build_feature_net, feature_net_name
from sqgan.metrics.fid import fid_from_features
from sqgan.metrics.inception_score import inception_score
from sqgan.metrics.kid import kid_from_features
from sqgan.metrics.names import count_tag, metric_key, parse_metric_key
from sqgan.metrics.nn_modes import nearest_reals, nn_mode_count
from sqgan.metrics.ppl_uniformity import path_images, uniformity
from sqgan.metrics.precision_recall import precision_recall


def _images(seed: int, n: int, shift: int = 0, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 200, (n, 3, size, size), generator=g)
    return (base + shift).clamp(0, 255).to(torch.uint8)


def _features(seed: int, n: int, d: int = 8, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _brute_kid(a: np.ndarray, b: np.ndarray) -> float:
    d = a.shape[1]
    k = lambda x, y: (x @ y / d + 1) ** 3  # noqa: E731  (the KID paper's cubic kernel)
    m, n = len(a), len(b)
    kxx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    return float(kxx + kyy - 2 * kxy)


# ----------------------------------------------------------------------------------------- parity
def test_fid_equals_scipy_sqrtm_on_random_features():
    real, fake = _features(0, 300), _features(1, 250, shift=0.4) * 1.3
    assert fid_from_features(real, fake) == pytest.approx(_scipy_fid(real.numpy(), fake.numpy()), rel=1e-3)
    assert fid_from_features(real, real) == pytest.approx(0.0, abs=1e-6)


def test_unbiased_kid_equals_a_brute_force_loop_when_one_subset_takes_every_vector():
    real, fake = _features(2, 40, d=5), _features(3, 40, d=5, shift=0.3)
    mean, std = kid_from_features(real, fake, subsets=1, max_subset_size=1000)
    assert mean == pytest.approx(_brute_kid(real.numpy(), fake.numpy()), rel=1e-3)
    assert std == 0.0


def test_kid_equals_torch_fidelity_on_the_same_subsets():
    from torch_fidelity.metric_kid import kid_features_to_metric

    real, fake = _features(12, 90, d=16), _features(13, 70, d=16, shift=0.2)
    ours = kid_from_features(real, fake, subsets=6, max_subset_size=30, seed=3)
    ref = kid_features_to_metric(real, fake, kid_subsets=6, kid_subset_size=30, rng_seed=3, verbose=False)
    assert ours == pytest.approx((ref["kernel_inception_distance_mean"], ref["kernel_inception_distance_std"]),
                                 rel=1e-9)
    assert ours[1] > 0  # different subsets, different values


def test_kid_subset_size_follows_stylegan2_ada():
    from sqgan.metrics.kid import kid_subset_size

    assert kid_subset_size(5000, 50000) == 1000
    assert kid_subset_size(134, 500) == 134


def test_inception_score_equals_exp_mean_kl_by_hand():
    logits = _features(4, 60, d=6) * 2
    p = torch.softmax(logits, 1).numpy()
    by_hand = math.exp(np.mean([np.sum(pi * (np.log(pi) - np.log(p.mean(0)))) for pi in p]))
    mean, std = inception_score(logits, splits=1)
    assert mean == pytest.approx(by_hand, rel=1e-6) and std == 0.0
    assert inception_score(torch.zeros(20, 6), splits=2)[0] == pytest.approx(1.0)  # no class information: IS = 1


def _brute_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        return np.array([sorted(np.linalg.norm(x - xi, axis=1))[k] for xi in x])  # k-th neighbour (self = 0th)

    rr, rf = radii(real), radii(fake)
    precision = np.mean([any(np.linalg.norm(f - real[j]) <= rr[j] for j in range(len(real))) for f in fake])
    recall = np.mean([any(np.linalg.norm(r - fake[j]) <= rf[j] for j in range(len(fake))) for r in real])
    return float(precision), float(recall)


def test_precision_recall_equal_a_loop_over_k_nn_balls():
    real = _features(5, 50, d=3)
    fake = torch.cat([_features(6, 25, d=3), _features(7, 25, d=3, shift=8.0)])  # half far from every real
    p, r = precision_recall(real, fake, k=3)
    bp, br = _brute_pr(real.numpy(), fake.numpy(), 3)
    assert (p, r) == pytest.approx((bp, br))
    assert 0.4 <= p <= 0.6  # the far half is outside the real manifold


def _settings(**kw) -> object:
    return Params().metrics.model_copy(update={"features": "randcnn", "kid_subsets": 3, **kw})


class _Net(torch.nn.Module):
    """A stand-in generator: z → a fixed image pattern + z-dependent shift (deterministic per z)."""

    def __init__(self, size: int = 32) -> None:
        super().__init__()
        self.size = size
        self.lin = torch.nn.Linear(8, 3 * size * size)
        torch.nn.init.normal_(self.lin.weight, generator=torch.Generator().manual_seed(0))
        torch.nn.init.zeros_(self.lin.bias)  # every _Net() is the same function

    def forward(self, z, noise_mode="const"):
        from types import SimpleNamespace

        return SimpleNamespace(images=torch.tanh(self.lin(z)).reshape(-1, 3, self.size, self.size))


def _reference(n: int = 48, size: int = 32) -> Reference:
    return Reference(Path("ref"), "train", size, _images(9, n, size=size), "0" * 64)


def test_evaluation_does_not_depend_on_the_batch_size():
    G = _Net()
    a = Evaluator(_settings(batch_size=64), _reference())(G, 8, 60, ["fid", "kid", "is", "pr"])
    b = Evaluator(_settings(batch_size=7), _reference())(G, 8, 60, ["fid", "kid", "is", "pr"])
    assert a.metrics.keys() == b.metrics.keys()
    for k in a.metrics:
        assert a.metrics[k] == pytest.approx(b.metrics[k], rel=1e-6, abs=1e-9), k
    batches = [x for x in generate_uint8(G, 30, 8, 7, seed=0, device=torch.device("cpu"))]
    assert [len(x) for x in batches] == [7, 7, 7, 7, 2]
    assert torch.equal(torch.cat(batches), next(generate_uint8(G, 30, 8, 30, seed=0, device=torch.device("cpu"))))
    one = next(generate_uint8(G, 1, 8, 30, seed=0, device=torch.device("cpu")))
    assert torch.equal(one[0], batches[0][0])  # the first image of any N is the same image


def test_evaluator_fid_equals_scipy_on_the_features_it_extracted():
    G, ref = _Net(), _reference()
    ev = Evaluator(_settings(), ref)(G, 8, 50, ["fid"])
    net = RandomCNNFeatures()
    fake = torch.cat([net(x)[0] for x in generate_uint8(G, 50, 8, 100, 0, torch.device("cpu"))]).double()
    real = net(ref.images)[0].double()
    assert ev.metrics["fid50_train_randcnn"] == pytest.approx(_scipy_fid(real.numpy(), fake.numpy()), rel=1e-3)


class _Copier(torch.nn.Module):
    """A generator that copies reference images `keep` (the sign of z's first coordinates picks which)."""

    def __init__(self, reals: torch.Tensor, keep: list[int]) -> None:
        super().__init__()
        self.images = reals[keep].float() / 127.5 - 1.0

    def forward(self, z, noise_mode="const"):
        from types import SimpleNamespace

        pick = (z[:, 0] > 0).long() + (z[:, 1] > 0).long()  # 0, 1 or 2
        return SimpleNamespace(images=self.images[pick.clamp(max=len(self.images) - 1)])


def test_nn_mode_count_of_a_generator_that_copies_three_training_images_is_three():
    ref = _reference()
    ev = Evaluator(_settings(), ref)(_Copier(ref.images, [5, 17, 40]), 8, 60, ["nnmodes", "fid"])
    assert ev.metrics["nnmodes60_train_randcnn"] == 3.0
    assert ev.provenance["nnmodes60_train_randcnn"]["n_real"] == 48
    one = Evaluator(_settings(), ref)(_Copier(ref.images, [7]), 8, 60, ["nnmodes"])
    assert one.metrics == {"nnmodes60_train_randcnn": 1.0}
    # the reals themselves: each is its own nearest neighbour
    f = _features(1, 30)
    assert nn_mode_count(f, f) == 30 and torch.equal(nearest_reals(f, f), torch.arange(30))


def test_nn_modes_are_the_nearest_reals_by_a_loop():
    real, fake = _features(2, 25, d=5), _features(3, 200, d=5, shift=0.5)
    by_loop = [min(range(25), key=lambda j: float(((fake[i] - real[j]) ** 2).sum())) for i in range(200)]
    assert nearest_reals(real, fake, chunk=7).tolist() == by_loop
    assert nn_mode_count(real, fake) == len(set(by_loop))
    assert 1 < len(set(by_loop)) < 25  # a case where nearest ≠ farthest and not every real is hit
    with pytest.raises(ValueError, match="5 dimensions, generated 4"):
        nn_mode_count(real, fake[:, :4])


class _Stair(torch.nn.Module):
    """A synthesis that draws image a where w's first coordinate is > 0 and b elsewhere: a path that crosses 0
    jumps once, by LPIPS(a, b); any other path does not move."""

    num_ws = 1

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.a, self.b = a.float() / 127.5 - 1.0, b.float() / 127.5 - 1.0

    def forward(self, ws, generator=None, noise_mode="random"):
        return torch.where((ws[:, 0, 0] > 0)[:, None, None, None], self.a, self.b)


def test_ppl_uniformity_of_a_stair_generator_is_one_jump_in_ten_steps():
    from sqgan.metrics.features import LPIPSNet
    from sqgan.models.base import Generator

    ref = _reference()
    G = Generator(_Stair(ref.images[3], ref.images[30]), z_dim=8, w_dim=8)
    ev = Evaluator(_settings(), ref)(G, 8, 400, ["pplu"])  # 40 paths, their ends drawn with metrics.seed (0)
    got = {k.rsplit("_", 1)[1]: v for k, v in ev.metrics.items()}
    assert set(ev.metrics) == {"pplu40_randalex_mean", "pplu40_randalex_std", "pplu40_randalex_end"}
    z = torch.randn(80, 8, generator=torch.Generator().manual_seed(0))
    crossing = float(((z[0::2, 0] > 0) != (z[1::2, 0] > 0)).double().mean())
    jump = float(LPIPSNet("alex")(ref.images[3:4], ref.images[30:31]))
    assert 0.2 < crossing < 0.8 and jump > 0.05
    assert got["end"] == pytest.approx(crossing * jump, rel=1e-5)
    assert got["mean"] == pytest.approx(crossing * jump / 10, rel=1e-5)  # 10 sub-intervals, one of them the jump
    assert got["std"] == pytest.approx(crossing * jump * 0.3, rel=1e-5)  # std of (J, 0 × 9) = 0.3 J
    assert ev.provenance["pplu40_randalex_std"]["intervals"] == 10 and ev.real_cache_hit is None
    assert uniformity(torch.ones(5, 10), torch.full((5,), 3.0)) == {"mean": 1.0, "std": 0.0, "end": 3.0}
    with pytest.raises(ValueError, match="pplu needs an sqgan Generator"):
        Evaluator(_settings(), ref)(_Net(), 8, 20, ["pplu"])


@pytest.mark.parametrize("arch", ["dcgan", "stylegan2"])
def test_a_ppl_path_starts_and_ends_at_the_sampled_images_and_goes_through_sq(arch):
    from sqgan.config import default_params
    from sqgan.models.factory import build_generator

    sets = ["model.z_dim=16", "model.w_dim=16", "sq.enabled=true", "sq.codebook_size=8", "sq.code_dim=16",
            "model.g_channels=8",
            "model.channel_base=128", "model.channel_max=8", "model.mapping_layers=2", f"model.arch={arch}"]
    G = build_generator(default_params(sets)).eval()
    z = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    x = path_images(G, z[:2], z[1:])
    assert x.shape == (2, 11, 3, 32, 32) and x.dtype == torch.uint8
    with torch.no_grad():
        sampled = ((G(z, noise_mode="const").images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(x[:, 0], sampled[:2]) and torch.equal(x[:, -1], sampled[1:])
    # every point is a quantized w: one sub-vector of 8 codewords, so at most 8 distinct images along both paths
    assert 2 <= len({bytes(im.numpy()) for im in x.flatten(0, 1)}) <= 8


def test_sfid_equals_scipy_fid_on_the_random_cnns_third_map_computed_by_hand():
    import torch.nn.functional as F

    G, ref = _Net(), _reference()
    ev = Evaluator(_settings(), ref)(G, 8, 50, ["sfid", "fid"])
    net = RandomCNNFeatures()

    def by_hand(images):  # the random CNN's layers run here: leaky ReLU after the first three convs
        x = F.interpolate(images.float() / 127.5 - 1.0, size=(64, 64), mode="bilinear", antialias=True)
        for conv in net.convs[:3]:
            x = F.leaky_relu(conv(x), 0.2)
        return x[:, :7].flatten(1).double()

    fake = torch.cat([by_hand(x) for x in generate_uint8(G, 50, 8, 100, 0, torch.device("cpu"))])
    real = by_hand(ref.images)
    assert real.shape == (48, 7 * 8 * 8)
    assert ev.metrics["sfid50_train_randcnn"] == pytest.approx(_scipy_fid(real.numpy(), fake.numpy()), rel=1e-3)
    assert ev.metrics["sfid50_train_randcnn"] != pytest.approx(ev.metrics["fid50_train_randcnn"], rel=1e-2)
    assert "448-d" in ev.provenance["sfid50_train_randcnn"]["spatial_features"]


# ------------------------------------------------------------------------------------ names, provenance
def test_metric_names_hold_n_split_and_network():
    assert metric_key("fid", 50000, "inception", "all") == "fid50k_all_inception"
    assert metric_key("kid", 500, "randcnn", "train", "mean") == "kid500_train_randcnn_mean"
    assert metric_key("is", 2500, "randcnn", stat="std") == "is2500_randcnn_std"
    assert count_tag(10000) == "10k" and count_tag(1500) == "1500"
    assert parse_metric_key("precision200_test_inception-1a2b3c4d").split == "test"
    assert parse_metric_key("loss/d") is None and parse_metric_key("fid_randcnn") is None
    with pytest.raises(ValueError, match="reference split"):
        metric_key("is", 10, "randcnn", "train")
    assert keys_of("pr", 100, "randcnn", "test") == ["precision100_test_randcnn", "recall100_test_randcnn"]
    assert keys_of("nnmodes", 1000, "inception", "train") == ["nnmodes1k_train_inception"]
    assert parse_metric_key("nnmodes1k_train_inception").split == "train"


def test_every_logged_value_carries_its_provenance():
    ev = Evaluator(_settings(), _reference(size=40))(_Net(40), 8, 40, ["fid", "kid", "is", "pr", "lpips"],
                                                      lpips_pairs=6)
    assert set(ev.metrics) == set(ev.provenance)
    assert "lpips6_randalex" in ev.metrics and "fid40_train_randcnn" in ev.metrics
    for key, prov in ev.provenance.items():
        for field in ("implementation", "feature_network", "weights_sha256", "resizer", "resolution", "n_generated",
                      "seeds"):
            assert field in prov, (key, field)
        assert prov["resolution"] == 40 and prov["n_generated"] == 40
        if parse_metric_key(key).split is not None:
            assert prov["reference_split"] == "train" and prov["n_real"] == 48
    assert ev.provenance["kid40_train_randcnn_mean"]["kid_subsets"] == 3


def test_without_inception_weights_auto_is_randcnn_and_inception_fails_fast_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no torch-fidelity cache
    assert build_feature_net("auto", None).name == "randcnn"
    assert feature_net_name("randcnn", None, 7) == "randcnn-s7" == RandomCNNFeatures(seed=7).name
    with pytest.raises(FileNotFoundError, match="metrics.inception_weights"):
        build_feature_net("inception", None)
    with pytest.raises(FileNotFoundError, match="metrics.inception_weights"):
        build_feature_net("inception", str(tmp_path / "missing.pth"))


def _random_inception_state_dict(monkeypatch) -> dict:
    """State dict of torch-fidelity's Inception-v3 class, random-initialised (the real weights can't be fetched)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with monkeypatch.context() as m:
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    return net.state_dict()


def test_inception_loads_a_local_file_or_the_torch_fidelity_cache_and_names_foreign_weights(tmp_path, monkeypatch):
    from sqgan.io import sha256_file
    from sqgan.metrics.features import INCEPTION_FILE

    sd = _random_inception_state_dict(monkeypatch)
    path = tmp_path / "pt_inception.pth"
    torch.save(sd, path)
    net = build_feature_net("inception", str(path))
    assert not sha256_file(path).startswith(INCEPTION_SHA256_PREFIX)
    assert net.name == f"inception-{sha256_file(path)[:8]}" == feature_net_name("auto", str(path))
    key = next(k for k in sd if k.endswith("weight"))
    assert torch.equal(net.net.state_dict()[key], sd[key])  # the weights came from the file
    pool, logits = net(_images(8, 2))
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008) and torch.isfinite(pool).all()
    # sFID's features: mixed_6/conv = Mixed_6d's 1×1 branch, its first 7 channels of 17 × 17, read by a hook of our own
    seen = []
    handle = net.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: seen.append(out))
    pool2, _, space = net(_images(8, 2), spatial=True)
    handle.remove()
    assert seen[0].shape == (2, 192, 17, 17) and space.shape == (2, 7 * 17 * 17)
    assert torch.equal(space, seen[0][:, :7].flatten(1)) and torch.equal(pool2, pool)
    assert len(net(_images(8, 2))) == 2 and not net.net.Mixed_6d.branch1x1._forward_hooks  # the hook is gone
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / INCEPTION_FILE).write_bytes(path.read_bytes())
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    assert build_feature_net("auto", None).name.startswith("inception-")  # found in the cache


def test_lpips_is_zero_on_identical_images_and_loads_backbone_weights(tmp_path):
    import torchvision

    from sqgan.metrics.features import LPIPSNet

    a, b = _images(10, 4), _images(11, 4)
    rand = LPIPSNet("alex")
    assert rand.name == "randalex" and rand.weights_sha256 == LPIPSNet("alex").weights_sha256  # a fixed function
    assert torch.allclose(rand(a, a), torch.zeros(4), atol=1e-6) and (rand(a, b) > 0).all()
    tv = torchvision.models.alexnet(weights=None)
    torch.save(tv.state_dict(), tmp_path / "alexnet.pth")
    real = LPIPSNet("alex", tmp_path / "alexnet.pth")
    assert real.name == "alex"
    assert torch.equal(real.net.net.slice1[0].weight, tv.features[0].weight)
    with pytest.raises(FileNotFoundError, match="metrics.lpips_weights"):
        LPIPSNet("alex", tmp_path / "missing.pth")


# ----------------------------------------------------------------------------------------- cache
def test_a_second_evaluation_extracts_no_real_features(tmp_path):
    G = _Net()
    cache = RealFeatureCache(tmp_path / "cache")
    ev = Evaluator(_settings(batch_size=16), _reference(), cache=cache)
    first = ev(G, 8, 32, ["fid", "kid"])
    assert first.real_cache_hit is False and cache.extractions == 3  # 48 reals in batches of 16
    again = ev(G, 8, 32, ["fid"])
    assert again.real_cache_hit is True and cache.extractions == 3
    fresh = RealFeatureCache(tmp_path / "cache")  # a new process: from disk
    third = Evaluator(_settings(batch_size=16), _reference(), cache=fresh)(G, 8, 32, ["fid", "kid"])
    assert third.real_cache_hit is True and fresh.extractions == 0
    assert third.metrics == first.metrics
    sfid = ev(G, 8, 32, ["sfid"])  # spatial features were not cached yet: one more pass over the reals
    assert sfid.real_cache_hit is False and cache.extractions == 6
    assert ev(G, 8, 32, ["sfid", "fid"]).real_cache_hit is True and cache.extractions == 6
    assert Evaluator(_settings(batch_size=16), _reference(), cache=RealFeatureCache(tmp_path / "cache"))(
        G, 8, 32, ["sfid"]).metrics == sfid.metrics  # … and from disk
    changed = Reference(Path("ref"), "train", 32, _images(9, 48), "1" * 64)  # another manifest
    fourth = Evaluator(_settings(batch_size=16), changed, cache=fresh)(G, 8, 32, ["fid"])
    assert fourth.real_cache_hit is False and fresh.extractions == 3
    other_net = Evaluator(_settings(batch_size=16, randcnn_seed=1), _reference(), cache=fresh)(G, 8, 32, ["fid"])
    assert other_net.real_cache_hit is False and "fid32_train_randcnn-s1" in other_net.metrics


def test_is_and_lpips_need_no_reference():
    def boom():
        raise AssertionError("the reference was loaded")

    ev = Evaluator(_settings(), boom)(_Net(), 8, 20, ["is", "lpips"], lpips_pairs=4)
    assert ev.real_cache_hit is None and set(ev.metrics) == {"is20_randcnn_mean", "is20_randcnn_std",
                                                             "lpips4_randalex"}
    from sqgan.metrics.features import LPIPSNet

    images = next(generate_uint8(_Net(), 8, 8, 100, seed=0, device=torch.device("cpu")))
    by_hand = LPIPSNet("alex")(images[0::2], images[1::2]).double().mean()  # pairs (0, 1), (2, 3), …
    assert ev.metrics["lpips4_randalex"] == pytest.approx(float(by_hand), rel=1e-5) and by_hand > 0


# ----------------------------------------------------------------------------------------- codebook
def test_codebook_usage_statistics():
    assert perplexity(torch.tensor([5.0, 5.0, 5.0, 5.0])).item() == pytest.approx(4.0)
    assert perplexity(torch.tensor([9.0, 0.0, 0.0])).item() == pytest.approx(1.0)
    assert utilisation(torch.tensor([3.0, 0.0, 1.0, 0.0])).item() == pytest.approx(0.5)


def test_mean_pairwise_cosine_equals_a_loop_over_pairs():
    import torch.nn.functional as F

    from sqgan.metrics.diversity import mean_pairwise_cosine

    assert mean_pairwise_cosine(torch.eye(4)).item() == pytest.approx(0.0, abs=1e-7)  # orthogonal
    assert mean_pairwise_cosine(torch.ones(3, 5) * 2).item() == pytest.approx(1.0)  # all the same direction
    x = torch.randn(7, 3, 2, 2, generator=torch.Generator().manual_seed(0))  # flattened per row
    flat = x.flatten(1)
    pairs = [F.cosine_similarity(flat[i], flat[j], dim=0).item() for i in range(7) for j in range(7) if i != j]
    assert mean_pairwise_cosine(x).item() == pytest.approx(sum(pairs) / len(pairs), rel=1e-5)
