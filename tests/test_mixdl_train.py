"""MixDL inside the training loop: which steps are MixDL steps, what each phase adds up to, the heads trained and saved,
exact resume, DDP ranks kept equal although the MixDL phases bypass DDP, a sweep over its weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import ddp_steps_digest, free_port, tiny_overrides

from sqgan.config import ConfigError, default_params
from sqgan.train.loop import (
    Hooks,
    Runtime,
    check_resume,
    load_checkpoint,
    reported_metrics,
    setup,
    step_generator,
    train,
)

STYLEGAN2 = {"model.arch": "stylegan2", "model.channel_base": 256, "model.channel_max": 16,
             "model.mapping_layers": 2, "fq.layers": "[1]"}
MIXDL = {"mixdl.enabled": "true", "train.batch_size": 4, "metrics.eval_every": 0, "metrics.diversity_every": 0,
         "metrics.names": "[fid]"}


def _params(**extra):
    return default_params(tiny_overrides(**{**MIXDL, **extra}))


@pytest.fixture(scope="module")
def ten_shot(demo_dir, tmp_path_factory):
    """The 10-shot subset of the demo set, as `sqgan data subset` makes it."""
    from sqgan.data.subset import make_subset

    return make_subset(demo_dir, tmp_path_factory.mktemp("subset") / "subset", n=10, seed=0)


def test_every_second_step_is_a_mixdl_step_with_its_own_terms(ten_shot, tmp_path):
    logged: dict[int, dict[str, float]] = {}
    p = _params(**STYLEGAN2, **{"train.steps": 4, "train.log_every": 1})
    train(p, ten_shot, tmp_path / "run", hooks=Hooks(log_metrics=lambda m, s: logged.setdefault(s, m)))
    mixdl_keys = {"mixdl/d", "mixdl/d_kl", "mixdl/d_patch", "mixdl/g", "mixdl/g_kl", "mixdl/g_patch"}
    for done in (1, 3):  # steps 0 and 2 ran: plain steps, the full-image adversarial loss
        assert "loss/d_adv" in logged[done] and "loss/g_adv" in logged[done]
        assert not any(k.startswith("mixdl/") for k in logged[done])
    for done in (2, 4):  # steps 1 and 3: MixDL steps
        assert mixdl_keys <= set(logged[done]) and "loss/d_adv" not in logged[done]
        assert all(torch.isfinite(torch.tensor(v)) for v in logged[done].values())
        assert logged[done]["mixdl/g_kl"] > 0 and logged[done]["mixdl/d_kl"] > 0
        assert 0 < logged[done]["fq/layer1/utilisation"] <= 1 and 0 < logged[done]["sq/utilisation"] <= 1
    seen = set().union(*logged.values())
    assert seen - {"time/steps_per_s"} <= reported_metrics(p) and mixdl_keys <= reported_metrics(p)
    # every = 1: every step is a MixDL step, and the plain-step names are not promised to a sweep
    assert "loss/d_adv" not in reported_metrics(_params(**{"mixdl.every": 1}))


@pytest.mark.parametrize("extra", [STYLEGAN2, {}], ids=["stylegan2", "dcgan"])
def test_each_mixdl_phase_is_the_sum_of_its_weighted_terms(demo_dir, extra):
    p = _params(**extra, **{"mixdl.lambda_g": 250.0, "fq.alpha": 0.5, "sq.lambda_sq": 0.3})
    state = setup(p, Runtime())
    gen = step_generator(0, 1, 0, torch.device("cpu"))
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    d = state.loss.d_main(real, gen, 1)
    s = d.stats
    assert torch.allclose(s["loss/d"], s["mixdl/d_patch"] + s["mixdl/d"] + 0.5 * s["loss/fq"])
    assert torch.allclose(s["mixdl/d"], p.mixdl.lambda_d * s["mixdl/d_kl"])
    assert d.sync and set(d.quant) == {"fq/layer1", "fq/layer2"} - ({"fq/layer2"} if extra else set())
    g = state.loss.g_main(gen, 1).stats
    assert torch.allclose(g["loss/g"], g["mixdl/g_patch"] + g["mixdl/g"] + 0.3 * g["loss/sq"])
    assert torch.allclose(g["mixdl/g"], 250.0 * g["mixdl/g_kl"])  # batchmean: λ_G · the mean KL
    plain = state.loss.g_main(gen, 0).stats  # step 0 is a plain step
    assert "loss/g_adv" in plain and "mixdl/g" not in plain


def test_the_g_distance_term_moves_g(demo_dir):
    """λ_G reaches G's update: one MixDL step from the same state with λ_G = 0 and 1000 gives different weights."""
    weights = []
    for lam in (0.0, 1000.0):
        p = _params(**STYLEGAN2, **{"mixdl.lambda_g": lam})
        state = setup(p, Runtime())
        phase = state.loss.g_main(step_generator(0, 1, 0, torch.device("cpu")), 1)
        state.opt_g.zero_grad()
        phase.loss.backward()
        state.opt_g.step()
        weights.append(torch.cat([q.detach().flatten() for q in state.G.synthesis.parameters()]))
    assert not torch.equal(*weights)


def test_heads_train_are_checkpointed_and_resume_is_bit_identical(ten_shot, tmp_path):
    p = _params(**STYLEGAN2, **{"train.steps": 8, "train.checkpoint_every": 4})
    full = train(p, ten_shot, tmp_path / "full")
    resumed = train(p, ten_shot, tmp_path / "resumed", resume=tmp_path / "full" / "checkpoints" / "step_000004.pt")
    a, b = load_checkpoint(full.checkpoint), load_checkpoint(resumed.checkpoint)
    mid = load_checkpoint(tmp_path / "full" / "checkpoints" / "step_000004.pt")
    assert set(a["mixdl_heads"]) >= {"proj.linear.weight", "patch.convs.0.weight"}  # one 4×4 map at 32 px
    for part in ("G", "D", "G_ema", "mixdl_heads"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    assert not torch.equal(mid["mixdl_heads"]["proj.linear.weight"], a["mixdl_heads"]["proj.linear.weight"])
    n_d = len(list(setup(p, Runtime()).D.parameters()))
    assert len(a["opt_d"]["param_groups"][0]["params"]) == n_d + len(a["mixdl_heads"])  # heads in D's optimiser


def test_resume_refuses_a_mixdl_switch_and_takes_a_checkpoint_older_than_the_section(demo_dir, tmp_path):
    p = default_params(tiny_overrides(**{"train.steps": 2, "train.checkpoint_every": 2, "metrics.eval_every": 0}))
    result = train(p, demo_dir, tmp_path / "run")
    state = load_checkpoint(result.checkpoint)
    with pytest.raises(ValueError, match=r"mixdl.enabled: False → True"):
        check_resume(state, _params(**{"train.steps": 4}), result.checkpoint)
    del state["params"]["mixdl"]  # written before MixDL existed: the section's defaults (off) were in force
    assert check_resume(state, p.override({"train.steps": 4}), result.checkpoint) == 2


def test_params_refuse_what_mixdl_cannot_do():
    with pytest.raises(ConfigError, match=r"train.batch_size ≥ 2"):
        default_params(["mixdl.enabled=true", "train.batch_size=1"])
    with pytest.raises(ConfigError, match=r"mixdl.patch_sides: .*got \[32\]"):
        default_params(["mixdl.patch_sides=[32]"])
    with pytest.raises(ConfigError, match=r"mixdl.coefficients must be one of 'dirichlet', 'gaussian', 'uniform'"):
        default_params(["mixdl.coefficients=beta"])


def test_a_sweep_takes_mixdl_axes_and_refuses_a_bad_value():
    from sqgan.shells.tune import check_sweep

    base = ["tune.space={mixdl: {lambda_g: {grid: [100.0, 1000.0]}, coefficients: {grid: [dirichlet, gaussian]}}}",
            "mixdl.enabled=true"]
    check_sweep(default_params(base))
    bad = base[:1] + ["tune.space.mixdl.lambda_d={grid: [1.0, -1.0]}", "mixdl.enabled=true"]
    with pytest.raises(ConfigError, match=r"tune.space.mixdl.lambda_d.*-1.0"):
        check_sweep(default_params(bad))


def _ddp_rank(rank: int, port: int, data: str, out: str, extra: dict) -> None:
    """Four steps (two of them MixDL steps) on this rank's own batches, then a hash of G's, D's and the heads'
    parameters."""
    ddp_steps_digest(rank, port, data, out, _params(**STYLEGAN2, **extra), steps=4)


@pytest.mark.parametrize("extra", [{}, {"mixdl.enabled": False, "train.pl_weight": 2.0, "train.pl_every": 2}],
                         ids=["mixdl", "plain-r1-pl"])
def test_ddp_ranks_stay_equal_through_mixdl_steps(demo_dir, tmp_path, extra):
    """The MixDL phases call G and D themselves, not through DDP: the loop averages their gradients over the ranks,
    so G, D and the heads stay equal although each rank sees other images and draws other mixes. (plain-r1-pl: lazy
    R1 and path length under DDP, which waited forever for D's last bias and SQ's codebook before they were put in
    the graph with weight 0.)"""
    mp.spawn(_ddp_rank, args=(free_port(), str(demo_dir), str(tmp_path), extra), nprocs=2, join=True)
    assert (tmp_path / "rank0.txt").read_text() == (tmp_path / "rank1.txt").read_text()


def test_g_mixdl_step_judges_the_mixes_and_trains_the_sq_codebook(demo_dir, monkeypatch):
    """On a G MixDL step the patch head judges the M mixup images (not the B anchors), and λ_sq·L_SQ of the anchors'
    styles reaches SQ's codebook (its only gradient: the codebook reaches the images only through the STE)."""
    import sqgan.losses.mixdl as X

    p = _params(**STYLEGAN2, **{"mixdl.num_mix": 2})  # M = 2 mixes of B = 4 anchors
    state = setup(p, Runtime())
    state.loss.augment = lambda x, gen: x  # judge exactly what G drew
    seen: dict = {}
    term_fn, patch_fn = X.g_mixdl_term, X.patch_logits

    def term(*a, **k):
        seen["term"] = term_fn(*a, **k)
        return seen["term"]

    def patches(D, head, images, *a, **k):
        seen["judged"] = images
        return patch_fn(D, head, images, *a, **k)

    monkeypatch.setattr(X, "g_mixdl_term", term)
    monkeypatch.setattr(X, "patch_logits", patches)
    phase = state.loss.g_main(step_generator(0, 1, 0, torch.device("cpu")), 1)
    drawn = seen["term"].images  # anchors then mixes
    assert drawn.shape[0] == 4 + 2 and torch.equal(seen["judged"], drawn[4:])
    assert phase.stats["loss/sq"] != 0
    state.opt_g.zero_grad()
    phase.loss.backward()
    grad = state.G.quantizer.codebook.grad
    assert grad is not None and grad.abs().sum() > 0


def _all_reduce_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from sqgan.train.loop import all_reduce_grads

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        m = torch.nn.Linear(2, 1)
        m.weight.grad = torch.full_like(m.weight, float(rank + 1))  # rank 0: 1, rank 1: 2
        if rank == 1:  # rank 0 has no bias gradient: it takes part with zeros
            m.bias.grad = torch.full_like(m.bias, 4.0)
        all_reduce_grads((m,), 2)
        torch.save({"w": m.weight.grad, "b": m.bias.grad}, Path(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_all_reduce_grads_averages_the_ranks_gradients(tmp_path):
    """As DDP: the mean over the ranks, not the sum (a sum keeps the ranks equal too, at twice the step)."""
    mp.spawn(_all_reduce_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        g = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(g["w"], torch.full((1, 2), 1.5)) and torch.equal(g["b"], torch.full((1,), 2.0))
