"""Class-conditional training (issue 19): labels from the manifest through the loop, G's class embedding, D's
projection head, per-class grids, balanced evaluation classes, intra-class FID, `sqgan sample --class`, DDP and
resume with labels, and the errors a wrong label setting gets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.multiprocessing as mp
from conftest import ddp_steps_digest, free_port, tiny_overrides

from sqgan.config import ConfigError, default_params
from sqgan.metrics.evaluate import Evaluator, Reference, to_uint8
from sqgan.metrics.intra_fid import intra_class_fid
from sqgan.metrics.labels import eval_labels
from sqgan.models.factory import build_discriminator, build_generator
from sqgan.train.loop import FixedLatents, Hooks, Runtime, load_checkpoint, setup, step_generator, train, train_step

COND = {"model.conditional": "true", "model.num_classes": 2, "metrics.eval_every": 0, "metrics.diversity_every": 0,
        "metrics.names": "[fid, ifid]"}


def _params(**extra):
    return default_params(tiny_overrides(**{**COND, **extra}))


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """The demo's labelled variant (tissue = 0, face = 1) at 32 px, a small one."""
    from sqgan.data.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("data") / "labelled", resolution=32, stride=128, lfw_faces=30,
                      labels=True)


# ------------------------------------------------------------------------------------------------ networks
@pytest.mark.parametrize("arch", ["dcgan", "sngan", "stylegan2"])
def test_g_follows_the_class_and_d_adds_the_projection_of_its_features(arch):
    extra = {"model.arch": arch, "sq.enabled": "false"}  # (SQ snaps z's small class shift at init to the same codes)
    if arch == "stylegan2":
        extra.update({"model.channel_base": 256, "model.channel_max": 16, "model.mapping_layers": 2})
    p = _params(**extra)
    torch.manual_seed(0)
    G, D = build_generator(p), build_discriminator(p).eval()
    G.train()  # batch statistics: DCGAN's init output in eval mode hardly depends on its input (~1e-7 relative)
    z = torch.randn(1, p.model.z_dim).repeat(4, 1)
    x = G(z, torch.tensor([0, 0, 1, 1]), noise_mode="const").images
    assert torch.allclose(x[0], x[1]) and torch.allclose(x[2], x[3])  # same z, same class: same image
    assert (x[0] - x[2]).abs().max() > 0.05 * x.abs().max()  # same z, other class: another image
    # D: logit = trunk's logit + ⟨embed(y), φ(x)⟩, by hand from the trunk's own head
    x = torch.randn(3, 3, 32, 32)
    y = torch.tensor([1, 0, 1])
    h = x
    for block in D.trunk.blocks:
        h = block(h)
    out = D(x, c=y, feed=False, update=False)  # feed=False: FQ passes h on, so the trunk alone gives φ
    logit0, features = D.trunk.head(h)
    e = D.embed.weight  # (spectrally normalised for SNGAN: the parametrised weight is what the head uses)
    assert torch.allclose(out.logits, logit0 + (e[y] * features).sum(1), atol=1e-5)
    assert not torch.allclose(D(x, c=1 - y, feed=False, update=False).logits, out.logits)


def test_an_unconditional_run_builds_the_networks_it_always_built_and_refuses_labels():
    """The embeddings are made last: a conditional G/D has the unconditional one's weights plus its embedding, so
    an unconditional run draws exactly what it drew before."""
    torch.manual_seed(0)
    g0, d0 = build_generator(default_params(tiny_overrides())), build_discriminator(default_params(tiny_overrides()))
    torch.manual_seed(0)
    g1, d1 = build_generator(_params()), build_discriminator(_params())
    s0, s1 = g0.state_dict(), g1.state_dict()
    assert set(s1) - set(s0) == {"embed.weight"} and all(torch.equal(s0[k], s1[k]) for k in s0)
    assert set(d1.state_dict()) - set(d0.state_dict()) == {"embed.weight"}
    z = torch.randn(2, 32)
    with pytest.raises(ValueError, match="unconditional"):
        g0(z, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class-conditional"):
        g1(z)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        g1(z, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="class-conditional"):
        d1(torch.randn(2, 3, 32, 32))


# ---------------------------------------------------------------------------------------------------- loop
def test_d_sees_each_real_image_with_its_own_label_and_fakes_with_the_drawn_ones(labelled):
    from sqgan.data.dataset import ManifestDataset

    p = _params(**{"train.batch_size": 8, "train.r1_gamma": 1.0, "train.r1_every": 1})
    state = setup(p, Runtime())
    dataset = ManifestDataset(labelled, 32, split="train")
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    D = state.loss.D

    def spy(x, *a, c=None, **k):
        seen.append((x.detach(), c))
        return D(x, *a, c=c, **k)

    state.loss.D = spy
    state.loss.augment = lambda x, gen: x
    train_step(state, p, dataset, Runtime())
    x, c = seen[0]  # d_main: 8 reals then 8 fakes
    flat = dataset.batch(torch.arange(len(dataset))).flatten(1)
    for img, label in zip(x[:8], c[:8], strict=True):
        i = int((flat - img.flatten()).abs().sum(1).argmin())
        assert int(dataset.labels[i]) == int(label)
    assert set(dataset.labels.tolist()) == {0, 1} and c[8:].min() >= 0 and c[8:].max() <= 1
    assert torch.equal(seen[1][1], c[:8])  # R1 scores the same reals with the same labels
    assert len(set(c[:8].tolist())) == 2 or len(set(dataset.labels.tolist())) == 1


def test_grid_rows_are_classes_and_the_same_z_runs_down_each_column():
    fixed = FixedLatents.make(_params(**{"model.num_classes": 3}), torch.device("cpu"))
    assert fixed.nrow == 8 and fixed.c.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    assert torch.equal(fixed.z[:8], fixed.z[8:16])
    many = FixedLatents.make(_params(**{"model.num_classes": 100}), torch.device("cpu"))
    rows = many.c[::8].tolist()
    assert len(rows) == 16 and rows[0] == 0 and rows[-1] == 99 and rows == sorted(set(rows))
    plain = FixedLatents.make(default_params(tiny_overrides()), torch.device("cpu"))
    assert plain.c is None and len(plain) == 64


def test_a_conditional_run_trains_logs_intra_class_fid_and_resumes_exactly(labelled, tmp_path):
    p = _params(**{"train.steps": 6, "train.checkpoint_every": 3, "train.sample_every": 6,
                   "metrics.diversity_every": 3, "metrics.eval_every": 3, "metrics.eval_num_fake": 20})
    logged: dict[str, float] = {}
    res = train(p, labelled, tmp_path / "a", hooks=Hooks(log_metrics=lambda m, s: logged.update(m), progress=None))
    assert logged["ifid40_train_randcnn"] > 0 and logged["ifid20_train_randcnn"] > 0  # final and interim
    assert -1 <= logged["d/feature_similarity"] <= 1
    # the grid: 2 rows (one per class) of 8
    from PIL import Image

    assert Image.open(tmp_path / "a" / "grid.png").size == (8 * 32 + 9 * 2, 2 * 32 + 3 * 2)
    resumed = train(p, labelled, tmp_path / "b", resume=tmp_path / "a" / "checkpoints" / "step_000003.pt",
                    hooks=Hooks(progress=None))
    a, b = load_checkpoint(res.checkpoint), load_checkpoint(resumed.checkpoint)
    assert all(torch.equal(a["G"][k], b["G"][k]) for k in a["G"]) and "embed.weight" in a["G"]
    assert all(torch.equal(a["D"][k], b["D"][k]) for k in a["D"])


def test_labels_that_do_not_fit_are_refused_before_training(labelled, demo_dir, tmp_path):
    with pytest.raises(ValueError, match="no 'label' column"):
        train(_params(), demo_dir, tmp_path / "x", hooks=Hooks(progress=None))
    with pytest.raises(ValueError, match=r"labels run 0\.\.1 \(2 classes\) but model.num_classes is 1|num_classes"):
        train(_params(**{"model.num_classes": 2}).override({"model.num_classes": 1}), labelled, tmp_path / "y")


def test_wrong_label_counts_are_refused_naming_both_numbers(tmp_path):
    from sqgan.data.dataset import check_class_labels

    with pytest.raises(ValueError, match=r"run 0\.\.11 \(3 classes\) but model.num_classes is 10; set "
                                         r"model.num_classes to 12"):
        check_class_labels(tmp_path, np.array([0, 11, 5]), 10)
    with pytest.raises(ValueError, match="no 'label' column"):
        check_class_labels(tmp_path, None, 10)
    check_class_labels(tmp_path, np.array([0, 9]), 10)
    check_class_labels(tmp_path, None, 0)  # unconditional: nothing to check


def test_params_refuse_what_a_conditional_run_cannot_do():
    for sets, match in [({"model.num_classes": 0}, "num_classes"), ({"model.pack": 2}, "model.pack"),
                        ({"mixdl.enabled": True}, "mixdl"), ({"metrics.truncation": "global"}, "truncation")]:
        with pytest.raises(ConfigError, match=match):
            _params().override(sets)
    with pytest.raises(ConfigError, match="ifid"):
        default_params(tiny_overrides(**{"metrics.names": "[fid, ifid]"}))


# --------------------------------------------------------------------------------------------------- metrics
def _fid_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def test_intra_class_fid_is_the_mean_of_per_class_fids():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(60, 4, generator=g, dtype=torch.float64)
    real_y = torch.arange(60) % 3
    real[real_y == 2] += 3.0
    fake = torch.randn(30, 4, generator=g, dtype=torch.float64)
    fake_y = torch.arange(30) % 3
    mean, per = intra_class_fid(real, real_y, fake, fake_y)
    want = [_fid_by_hand(real[real_y == k].numpy(), fake[fake_y == k].numpy()) for k in range(3)]
    assert [per[k] for k in range(3)] == pytest.approx(want, rel=1e-6)
    assert mean == pytest.approx(sum(want) / 3, rel=1e-6) and per[2] > 5 * per[0]  # class 2 is off by 3 σ
    with pytest.raises(ValueError, match="class 2 has 1 reference"):
        intra_class_fid(real[:5], real_y[:5], fake, fake_y)


class _Planted(torch.nn.Module):
    """A conditional 'generator' that draws image k of `bank[c]` for noise: `follow=False` ignores c (draws from
    both classes' banks alike), so its FID is as good but its intra-class FID is not."""

    def __init__(self, banks: list[torch.Tensor], follow: bool) -> None:
        super().__init__()
        self.banks, self.follow, self.num_classes = banks, follow, len(banks)
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, z, c, noise_mode="const"):
        pick = (z[:, 0].abs() * 1000).long()
        src = c if self.follow else (z[:, 1] > 0).long()
        images = torch.stack([self.banks[int(k)][int(i) % len(self.banks[int(k)])] for k, i in zip(src, pick,
                                                                                                    strict=True)])
        return type("Out", (), {"images": images.float() / 127.5 - 1})()


def test_ifid_in_the_evaluator_tells_a_generator_that_ignores_its_class(labelled):
    from sqgan.data.dataset import ManifestDataset

    ds = ManifestDataset(labelled, 32, split="train")
    banks = [ds.images[ds.labels == k] for k in (0, 1)]
    settings = default_params(tiny_overrides()).metrics
    ref = Reference.load(labelled, "train", 32)
    assert torch.equal(ref.labels, ds.labels)
    ev = Evaluator(settings, ref)
    follows = ev(_Planted(banks, True), 32, 80, ["fid", "ifid"])
    ignores = ev(_Planted(banks, False), 32, 80, ["fid", "ifid"])
    f, i = "fid80_train_randcnn", "ifid80_train_randcnn"
    assert ignores.metrics[i] > 1.5 * follows.metrics[i]
    # the class mix-up costs intra-class FID more than FID
    assert ignores.metrics[i] / follows.metrics[i] > ignores.metrics[f] / follows.metrics[f]
    assert follows.provenance[i]["classes"]["num_classes"] == 2
    with pytest.raises(ValueError, match="unconditional"):
        ev(build_generator(default_params(tiny_overrides())), 32, 40, ["ifid"])
    # PPL uniformity keeps each path in one class (path p in class p mod K): both ends of every path in its class
    from sqgan.metrics import ppl_uniformity as U

    seen = []
    path_images = U.path_images
    U.path_images = lambda G, z0, z1, intervals=U.INTERVALS, c=None: seen.append(c) or path_images(G, z0, z1, c=c)
    try:
        cond = build_generator(_params()).eval()
        ev(cond, 32, 40, ["pplu"])
    finally:
        U.path_images = path_images
    assert torch.cat(seen).tolist() == [0, 1, 0, 1]  # 40 images → 4 paths


def test_evaluation_classes_are_balanced_and_do_not_depend_on_the_batch():
    assert eval_labels(3, 0, 7).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert eval_labels(3, 4, 3).tolist() == [1, 2, 0]  # image i in class i mod K wherever the batch starts
    assert eval_labels(3, 0, 2, label=2).tolist() == [2, 2] and eval_labels(0, 0, 5) is None
    with pytest.raises(ValueError, match="0..9"):
        eval_labels(10, 0, 1, label=12)
    with pytest.raises(ValueError, match="unconditional"):
        eval_labels(0, 0, 1, label=0)


# ---------------------------------------------------------------------------------------------------- sample
def test_sample_class_draws_that_class_and_refuses_one_out_of_range(labelled, tmp_path, monkeypatch):
    from PIL import Image

    import sqgan.commands.sample as S
    from sqgan.sampling.cluster import seeded_latents

    p = _params(**{"train.steps": 2, "train.checkpoint_every": 2})
    res = train(p, labelled, tmp_path / "run", hooks=Hooks(progress=None))
    seen: list[torch.Tensor] = []
    forward = S.TruncatedGenerator.forward

    def spy(self, z, c=None, **k):
        seen.append(c)
        return forward(self, z, c, **k)

    monkeypatch.setattr(S.TruncatedGenerator, "forward", spy)
    sp = p.override({"sample.truncation": "none", "sample.num": 5, "sample.batch_size": 3})
    S.run_sample(sp.override({"sample.label": 1}), checkpoint=res.checkpoint, out=tmp_path / "s1")
    S.run_sample(sp, checkpoint=res.checkpoint, out=tmp_path / "s0")
    assert [c.tolist() for c in seen] == [[1, 1, 1], [1, 1], [0, 1, 0], [1, 0]]  # unset: image i in class i mod 2
    G = build_generator(p)
    G.load_state_dict(load_checkpoint(res.checkpoint)["G_ema"])
    G.eval()
    want = to_uint8(G(seeded_latents(5, 32, 0), torch.full((5,), 1), noise_mode="const").images)
    got = torch.from_numpy(np.array(Image.open(tmp_path / "s1" / "images" / "000004.png"))).permute(2, 0, 1)
    assert torch.equal(got, want[4])
    with pytest.raises(ValueError, match=r"2 classes, 0\.\.1"):
        S.run_sample(sp.override({"sample.label": 12}), checkpoint=res.checkpoint, out=tmp_path / "s2")
    with pytest.raises(ValueError, match="truncation"):
        S.run_sample(sp.override({"sample.truncation": "global"}), checkpoint=res.checkpoint, out=tmp_path / "s3")
    assert not (tmp_path / "s2").exists() and not (tmp_path / "s3").exists()


# ------------------------------------------------------------------------------------------------------- DDP
def _ddp_rank(rank: int, port: int, data: str, out: str) -> None:
    ddp_steps_digest(rank, port, data, out, _params(**{"train.batch_size": 4, "train.workers": 2}), steps=3)


def test_ddp_ranks_stay_equal_with_labels(labelled, tmp_path):
    """Each rank reads its own images and their labels; the class embeddings' gradients are averaged by DDP."""
    mp.spawn(_ddp_rank, args=(free_port(), str(labelled), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0.txt").read_text() == (tmp_path / "rank1.txt").read_text()


def test_step_generator_draws_fake_classes_after_everything_else():
    """An unconditional step draws exactly what it drew before: the fakes' classes are the last draw of a batch."""
    p = _params()
    state = setup(p, Runtime())
    gen = step_generator(0, 0, 0, torch.device("cpu"))
    _, c = state.loss._generate(4, gen)
    gen2 = step_generator(0, 0, 0, torch.device("cpu"))
    torch.randn(4, p.model.z_dim, generator=gen2)
    assert torch.equal(c, torch.randint(2, (4,), generator=gen2))


# ------------------------------------------------------------------------------------------------------- Ray
@pytest.mark.ray
def test_a_conditional_run_under_ray_logs_intra_class_fid_and_a_grid_per_class(ray_session, labelled, demo_dir,
                                                                               tmp_path):
    """What `sqgan train --set model.conditional=true --set model.num_classes=2` runs on the labelled demo."""
    from mlflow.tracking import MlflowClient

    from sqgan.shells.ray_train import run_training

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = _params(**{"mlflow.tracking_uri": uri, "mlflow.artifact_root": str(tmp_path / "artifacts"),
                   "mlflow.experiment": "cond", "ray.storage_path": str(tmp_path / "ray"), "train.steps": 4,
                   "train.checkpoint_every": 4, "train.sample_every": 4, "train.log_every": 2})
    run = run_training(p, labelled, tmp_path / "run", project_dir=Path(__file__).resolve().parents[1])
    client = MlflowClient(tracking_uri=uri)
    r = client.get_run(run.run_id)
    assert r.info.status == "FINISHED" and r.data.params["model.conditional"] == "True"
    assert r.data.metrics["ifid40_train_randcnn"] > 0 and r.data.metrics["fid40_train_randcnn"] > 0
    assert "sqgan.metric.ifid40_train_randcnn" in r.data.tags
    from PIL import Image

    grid = Path(client.download_artifacts(run.run_id, "samples/grid.png", str(tmp_path)))
    assert Image.open(grid).size == (8 * 32 + 9 * 2, 2 * 32 + 3 * 2)  # one row per class
    with pytest.raises(ValueError, match="no 'label' column"):  # before Ray starts
        from sqgan.shells.ray_train import preflight

        preflight(p, demo_dir, tmp_path / "run2", None, tmp_path, False)
