"""FID/KID against independent computations (scipy, a brute-force loop), and honest metric names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from sqgan.metrics.codebook import perplexity, utilisation
from sqgan.metrics.fid import RandomCNNFeatures, build_feature_net, fid_kid


def _images(seed: int, n: int, shift: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 200, (n, 3, 32, 32), generator=g)
    return (base + shift).clamp(0, 255).to(torch.uint8)


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _brute_kid(a: np.ndarray, b: np.ndarray) -> float:
    d = a.shape[1]
    k = lambda x, y: (x @ y / d + 1) ** 3  # noqa: E731  (polynomial kernel of the KID paper)
    m = len(a)
    kxx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / (m * m)
    return float(kxx + kyy - 2 * kxy)


def test_fid_and_kid_match_scipy_and_brute_force_on_the_same_features():
    net = RandomCNNFeatures(seed=0)
    real, fake = _images(0, 120), _images(1, 120, shift=40)
    metrics, prov = fid_kid([real[:70], real[70:]], [fake], net, "randcnn", kid_subset_size=120, kid_subsets=1)
    fr, ff = net(real).double().numpy(), net(fake).double().numpy()
    assert metrics["fid_randcnn"] == pytest.approx(_scipy_fid(fr, ff), rel=1e-3)
    assert metrics["kid_randcnn_mean"] == pytest.approx(_brute_kid(fr, ff), rel=1e-3, abs=1e-6)
    assert prov["n_real"] == 120 and "random CNN" in prov["feature_extractor"]


def test_fid_does_not_depend_on_batching():
    net = RandomCNNFeatures(seed=0)
    real, fake = _images(2, 60), _images(3, 60, shift=20)
    a, _ = fid_kid([real], [fake], net, "randcnn", kid_subsets=2)
    b, _ = fid_kid(list(real.split(7)), list(fake.split(13)), net, "randcnn", kid_subsets=2)
    assert a["fid_randcnn"] == pytest.approx(b["fid_randcnn"], rel=1e-5)


def test_fid_is_near_zero_for_the_same_set_and_grows_with_shift():
    net = RandomCNNFeatures(seed=0)
    real = _images(4, 80)
    same, _ = fid_kid([real], [real], net, "randcnn", kid_subsets=2)
    far, _ = fid_kid([real], [_images(5, 80, shift=60)], net, "randcnn", kid_subsets=2)
    assert same["fid_randcnn"] < 1e-3 < far["fid_randcnn"]


def test_without_inception_weights_the_metric_is_named_randcnn_never_plain_fid():
    net, name = build_feature_net(None, 0)
    assert name == "randcnn"
    metrics, _ = fid_kid([_images(6, 10)], [_images(7, 10)], net, name, kid_subsets=1)
    assert "fid" not in metrics and "fid_randcnn" in metrics


def _random_inception_state_dict(monkeypatch) -> dict:
    """State dict of torch-fidelity's Inception-v3 class, random-initialised (the real weights can't be fetched)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with monkeypatch.context() as m:
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    return net.state_dict()


def test_inception_path_loads_a_local_weights_file(tmp_path, monkeypatch):
    path = tmp_path / "pt_inception.pth"
    sd = _random_inception_state_dict(monkeypatch)
    torch.save(sd, path)
    net, name = build_feature_net(str(path), 0)
    assert name == "inception"
    loaded = net.net.state_dict()
    key = next(k for k in sd if k.endswith("weight"))
    assert torch.equal(loaded[key], sd[key])  # the weights came from the file
    feats = net(_images(8, 2))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    metrics, prov = fid_kid([_images(9, 4)], [_images(10, 4)], net, name, kid_subsets=1)
    assert set(metrics) == {"fid_inception", "kid_inception_mean", "kid_inception_std"}
    assert "inception-v3-compat" in prov["feature_extractor"]
    with pytest.raises(FileNotFoundError, match="metrics.inception_weights"):
        build_feature_net(str(tmp_path / "missing.pth"), 0)


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
