"""The plain-torch loop: finite losses, exact resume, checkpoints that load with weights_only=True."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_overrides

from sqgan.config import default_params
from sqgan.train.checkpoint import load_checkpoint
from sqgan.train.loop import Hooks, alpha_at, batch_indices, train


def _params(**extra):
    return default_params(tiny_overrides(**extra))


def test_twenty_steps_have_finite_losses_and_log_fq_usage(demo_dir, tmp_path):
    logged: list[tuple[dict, int]] = []
    artifacts: list[str] = []
    hooks = Hooks(log_metrics=lambda m, s: logged.append((m, s)), log_artifact=lambda p, a: artifacts.append(p.name))
    result = train(_params(), demo_dir, tmp_path / "run", hooks=hooks)
    steps = [s for _, s in logged]
    assert steps[:4] == [5, 10, 15, 20]
    for m, _ in logged[:4]:
        assert all(torch.isfinite(torch.tensor(v)) for v in m.values())
        for layer in (1, 2):
            assert 0 < m[f"fq/layer{layer}/utilisation"] <= 1
            assert 1 <= m[f"fq/layer{layer}/perplexity"] <= 16
    assert "fid40_train_randcnn" in result.metrics and result.metrics["fid40_train_randcnn"] > 0
    assert {"step_000010.png", "step_000020.png", "grid.png", "metrics.json", "step_000020.pt"} <= set(artifacts)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_000010.pt", "step_000020.pt"]


STYLEGAN2_ADA = {"model.arch": "stylegan2", "model.channel_base": 256, "model.channel_max": 16,
                 "model.mapping_layers": 2, "ada.enabled": "true", "ada.p_init": 0.3, "ada.interval": 2,
                 "train.r1_every": 4, "train.pl_weight": 2.0, "train.pl_every": 3, "sq.qcr_every": 2}


@pytest.mark.parametrize("extra", [{}, STYLEGAN2_ADA], ids=["dcgan-fq-sq", "stylegan2-fq-sq-ada-r1-pl"])
def test_resume_at_step_10_is_bit_identical_to_uninterrupted_run(demo_dir, tmp_path, extra):
    p = _params(**extra)
    full = train(p, demo_dir, tmp_path / "full")
    resumed = train(p, demo_dir, tmp_path / "resumed", resume=tmp_path / "full" / "checkpoints" / "step_000010.pt")
    a, b = load_checkpoint(full.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a["step"] == b["step"] == 20
    for part in ("G", "D", "G_ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    assert torch.equal(a["D"]["quantizers.1.ema_count"], b["D"]["quantizers.1.ema_count"])
    assert a["opt_d"]["state"][0]["exp_avg"].equal(b["opt_d"]["state"][0]["exp_avg"])
    assert a["ada"] == b["ada"] and torch.equal(a["pl_mean"], b["pl_mean"])
    # and it did train: step 10 and step 20 differ, the SQ codebook too (and ADA's p moved)
    mid = load_checkpoint(tmp_path / "full" / "checkpoints" / "step_000010.pt")
    assert not torch.equal(mid["G"]["quantizer.codebook"], a["G"]["quantizer.codebook"])
    if extra:
        assert not torch.equal(mid["pl_mean"], a["pl_mean"])
        assert mid["ada"] != a["ada"]


def test_checkpoint_holds_everything_for_resume_and_loads_weights_only(demo_dir, tmp_path):
    train(_params(**{"train.steps": 10}), demo_dir, tmp_path / "r")
    path = tmp_path / "r" / "checkpoints" / "step_000010.pt"
    state = torch.load(path, weights_only=True)
    assert {"G", "D", "G_ema", "opt_g", "opt_d", "step", "rng", "params", "ada", "pl_mean"} <= set(state)
    assert {"quantizers.1.codebook", "quantizers.1.ema_count", "quantizers.1.ema_sum"} <= set(state["D"])
    assert state["G"]["quantizer.codebook"].shape == (16, 4)
    assert state["params"]["fq"]["codebook_size"] == 16


def test_resume_refuses_a_different_architecture(demo_dir, tmp_path):
    train(_params(**{"train.steps": 10}), demo_dir, tmp_path / "r")
    with pytest.raises(ValueError, match="fq.codebook_size: 16 → 32"):
        train(_params(**{"fq.codebook_size": 32}), demo_dir, tmp_path / "r2",
              resume=tmp_path / "r" / "checkpoints" / "step_000010.pt")


def test_batches_cover_each_image_once_per_epoch_across_ranks():
    n, b, world = 10, 3, 2
    seen = []
    for step in range(5):  # 5 steps × 6 = 30 = 3 epochs
        for rank in range(world):
            seen.extend(batch_indices(step, n, b, world, rank, seed=0).tolist())
    for epoch in range(3):
        assert sorted(seen[epoch * n : (epoch + 1) * n]) == list(range(n))
    # step 3, rank 1: positions 3·6 + 3 = 21..23 → epoch 2, offsets 1..3 of the permutation seeded 0·7919 + 2
    expected = torch.randperm(n, generator=torch.Generator().manual_seed(2))[1:4].tolist()
    assert batch_indices(3, n, b, world, 1, seed=0).tolist() == expected
    assert batch_indices(3, n, b, world, 1, seed=1).tolist() != expected  # the seed matters


def test_alpha_warms_up_linearly():
    assert alpha_at(0, 2.0, 100) == 0.0
    assert alpha_at(25, 2.0, 100) == 0.5
    assert alpha_at(500, 2.0, 100) == 2.0
    assert alpha_at(0, 2.0, 0) == 2.0


def test_nonsaturating_loss_without_fq_or_augment_trains(demo_dir, tmp_path, monkeypatch):
    import sqgan.losses.gan as gan

    kinds = []
    real_d, real_g = gan.d_loss, gan.g_loss
    monkeypatch.setattr(gan, "d_loss", lambda r, f, kind: kinds.append(("d", kind)) or real_d(r, f, kind))
    monkeypatch.setattr(gan, "g_loss", lambda f, kind: kinds.append(("g", kind)) or real_g(f, kind))
    p = _params(**{"train.loss": "nonsaturating", "fq.enabled": "false", "train.diffaugment": "[]",
                   "train.steps": 6, "train.log_every": 3})
    result = train(p, demo_dir, tmp_path / "ns")
    assert kinds == [("d", "nonsaturating"), ("g", "nonsaturating")] * 6
    assert not any(k.startswith("fq/layer") for k in result.metrics)
    assert result.metrics["loss/fq"] == 0.0


def test_g_ema_is_the_ramped_exponential_average_of_g(demo_dir, tmp_path):
    from sqgan.train.loop import build_generator, ema_beta

    p = _params(**{"train.steps": 2, "train.checkpoint_every": 1, "train.log_every": 1, "train.sample_every": 1})
    train(p, demo_dir, tmp_path / "r")
    one = load_checkpoint(tmp_path / "r" / "checkpoints" / "step_000001.pt")
    two = load_checkpoint(tmp_path / "r" / "checkpoints" / "step_000002.pt")
    beta = ema_beta(1, p.train.g_ema_decay)  # the 0-based step that made checkpoint 2: min(0.999, 2/11)
    assert beta == 2 / 11
    params = [name for name, _ in build_generator(p).named_parameters()]  # buffers are copied, not averaged
    assert params
    for k in params:
        expected = one["G_ema"][k] + (1 - beta) * (two["G"][k] - one["G_ema"][k])
        assert torch.allclose(two["G_ema"][k], expected, atol=1e-6), k


def test_resume_restores_the_global_rng_states_it_saved(demo_dir, tmp_path, monkeypatch):
    import sqgan.train.loop as loop

    train(_params(**{"train.steps": 10}), demo_dir, tmp_path / "r")
    ckpt = tmp_path / "r" / "checkpoints" / "step_000010.pt"
    saved = load_checkpoint(ckpt)["rng"]["torch"]
    seen = []
    real = loop._set_rng_state

    def spy(state):
        real(state)
        seen.append(torch.get_rng_state())

    monkeypatch.setattr(loop, "_set_rng_state", spy)
    torch.manual_seed(12345)  # whatever the process did before
    train(_params(**{"train.steps": 12}), demo_dir, tmp_path / "r2", resume=ckpt)
    assert len(seen) == 1 and torch.equal(seen[0], saved)


def test_resume_at_exactly_train_steps_runs_no_step_and_finishes(demo_dir, tmp_path):
    train(_params(**{"train.steps": 10}), demo_dir, tmp_path / "r")
    logged = []
    result = train(_params(**{"train.steps": 10}), demo_dir, tmp_path / "again",
                   resume=tmp_path / "r" / "checkpoints" / "step_000010.pt",
                   hooks=Hooks(log_metrics=lambda m, s: logged.append(s)))
    assert result.step == 10 and logged == [10]  # only the final evaluation, at step 10
    assert "fid40_train_randcnn" in result.metrics
    assert "loss/d" in result.metrics and "fq/layer1/utilisation" in result.metrics  # the last window's, kept


def test_train_loss_auto_is_the_backbones_own():
    from sqgan.models.factory import adversarial_loss, r1_gamma

    assert adversarial_loss(_params()) == "hinge"
    assert adversarial_loss(_params(**{"model.arch": "sngan"})) == "hinge"
    sg2 = _params(**{"model.arch": "stylegan2", "model.resolution": 64})
    assert adversarial_loss(sg2) == "nonsaturating"
    assert r1_gamma(sg2) == pytest.approx(0.0002 * 64**2 / 16)  # stylegan2-ada's auto γ at batch 16
    assert r1_gamma(_params()) == 0.0
    assert adversarial_loss(_params(**{"model.arch": "stylegan2", "train.loss": "hinge"})) == "hinge"


def test_a_format_1_checkpoint_is_refused_with_what_to_do(tmp_path):
    old = tmp_path / "step_000010.pt"
    torch.save({"format": 1, "step": 10}, old)
    with pytest.raises(ValueError, match="format 1, from before the model factory.*start a new run"):
        load_checkpoint(old)


def test_the_loop_draws_one_bar_and_says_one_line_per_interim_evaluation(demo_dir, tmp_path):
    """The terminal side of the loop goes through Hooks: one bar (every step, a postfix per log, closed) and one
    line per interim evaluation naming its quality metrics (KID's mean, not its std); `progress=None` draws none."""
    class Bar:
        def __init__(self, total: int, initial: int) -> None:
            self.total, self.n, self.postfixes, self.closed = total, initial, [], False
            bars.append(self)

        def update(self, n: int = 1) -> None:
            self.n += n

        def set_postfix(self, **values: str) -> None:
            self.postfixes.append(values)

        def close(self) -> None:
            self.closed = True

    bars: list[Bar] = []
    lines: list[str] = []
    params = _params(**{"train.steps": 10, "metrics.eval_every": 5, "metrics.eval_num_fake": 20})
    train(params, demo_dir, tmp_path / "run", hooks=Hooks(progress=Bar, say=lines.append))
    assert len(bars) == 1 and (bars[0].total, bars[0].n, bars[0].closed) == (10, 10, True)
    assert len(bars[0].postfixes) == 2 and set(bars[0].postfixes[0]) == {"d", "g"}
    said = [line for line in lines if not line.startswith("warning: ")]  # the collapse watch says its warnings too
    assert len(said) == 1 and said[0].startswith("step 5: fid20_train_randcnn "), lines
    assert "kid20_train_randcnn_mean" in said[0] and "_std" not in said[0]
    ckpt = tmp_path / "run" / "checkpoints" / "step_000010.pt"
    train(params.override({"train.steps": 12}), demo_dir, tmp_path / "run", resume=ckpt,
          hooks=Hooks(progress=None, say=lines.append))  # no bar; the resumed loop needs none
    assert len(bars) == 1
