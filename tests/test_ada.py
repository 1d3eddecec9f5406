"""ADA: the augmentation's identities, determinism and gradients; the p controller on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from sqgan.data import ada
from sqgan.data.ada import OPS, AdaController, ada_augment


def _images(b: int = 8, c: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _changed(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (y != x).flatten(1).any(dim=1)


def test_p_zero_is_the_identity_and_draws_nothing():
    x = _images()
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    y = ada_augment(x, 0.0, g)
    assert y is x and torch.equal(g.get_state(), state)


def test_p_one_changes_every_sample_and_keeps_shape_and_dtype():
    x = _images(16)
    y = ada_augment(x, 1.0, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    assert _changed(y, x).all()


def test_small_p_leaves_untouched_samples_bit_identical():
    x = _images(64)
    changed = _changed(ada_augment(x, 0.05, torch.Generator().manual_seed(0)), x)
    assert 0 < changed.sum() < 64  # P(no op fires) = 0.95^11 · √0.95² ≈ 0.54 per sample


def test_output_is_a_function_of_the_generator():
    x = _images()
    a = ada_augment(x, 0.5, torch.Generator().manual_seed(1))
    b = ada_augment(x, 0.5, torch.Generator().manual_seed(1))
    c = ada_augment(x, 0.5, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(0)
    d = ada_augment(x, 0.5, torch.Generator().manual_seed(1))
    torch.manual_seed(1)  # the global RNG plays no part
    assert torch.equal(d, ada_augment(x, 0.5, torch.Generator().manual_seed(1)))


def test_generator_advances_the_same_for_any_positive_p():
    x = _images()
    states = []
    for p in (0.1, 0.9):
        g = torch.Generator().manual_seed(0)
        ada_augment(x, p, g)
        states.append(g.get_state())
    assert torch.equal(*states)


@pytest.mark.parametrize("p", [0.3, 1.0])
def test_gradient_flows_to_x(p):
    x = _images().requires_grad_()
    y = ada_augment(x, p, torch.Generator().manual_seed(0))
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and (x.grad.flatten(1).abs().sum(1) > 0).all()


def test_xflip_at_p_one_flips_about_half_the_samples():
    x = _images(16)
    y = ada_augment(x, 1.0, torch.Generator().manual_seed(0), ops=("xflip",))
    flipped = [not torch.equal(y[i], x[i]) for i in range(16)]
    assert 0 < sum(flipped) < 16  # ADA flips with probability ½ once the op fires
    for i in range(16):
        if flipped[i]:  # equal up to the float32 rounding of the bilinear grid (≈1e-5)
            torch.testing.assert_close(y[i], torch.flip(x[i], [-1]), atol=1e-4, rtol=0)


def test_rotate90_gives_quarter_turns():
    x = _images(16)
    y = ada_augment(x, 1.0, torch.Generator().manual_seed(0), ops=("rotate90",))
    for i in range(16):
        err = [(y[i] - torch.rot90(x[i], k, [1, 2])).abs().max().item() for k in range(4)]
        assert min(err) < 1e-4


def test_brightness_and_contrast_are_per_sample_offsets_and_gains():
    x = _images()
    y = ada_augment(x, 1.0, torch.Generator().manual_seed(0), ops=("brightness",))
    d = (y - x).flatten(1)
    torch.testing.assert_close(d, d[:, :1].expand_as(d))
    y = ada_augment(x, 1.0, torch.Generator().manual_seed(0), ops=("contrast",))
    r = (y / x).flatten(1)
    torch.testing.assert_close(r, r[:, :1].expand_as(r))


@pytest.mark.parametrize("op", OPS)
def test_each_op_alone_changes_some_sample(op):
    x = _images(16)
    y = ada_augment(x, 1.0, torch.Generator().manual_seed(0), ops=(op,))
    assert y.shape == x.shape and torch.isfinite(y).all() and _changed(y, x).any()


def test_greyscale_images():
    x = _images(c=1)
    y = ada_augment(x, 1.0, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and _changed(y, x).all()


def test_bad_arguments_are_named():
    x = _images()
    with pytest.raises(ValueError, match="unknown ops.*'cutout'"):
        ada_augment(x, 0.5, torch.Generator(), ops=("xflip", "cutout"))
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\], got 1.5"):
        ada_augment(x, 1.5, torch.Generator())


# --- controller -------------------------------------------------------------------------------------------------


def _step(c: AdaController, logits: torch.Tensor) -> bool:
    c.accumulate(logits)
    return c.update()


def test_all_positive_reals_raise_p_by_one_adjustment_per_interval():
    c = AdaController(batch_size=8, interval=4, speed_img=320)  # Δ = 8·4/320 = 0.1
    assert c.adjustment == 8 * 4 / 320 and c.p == 0.0 and math.isnan(c.rt)
    expected = 0.0
    for step in range(1, 61):
        adjusted = _step(c, torch.ones(8))
        assert adjusted == (step % 4 == 0)
        if adjusted:
            expected = min(expected + 0.1, 1.0)
            assert c.rt == 1.0
        assert c.p == expected
    assert c.p == 1.0  # clamped after 10 intervals


def test_all_negative_reals_lower_p_and_clamp_at_zero():
    c = AdaController(batch_size=8, interval=2, speed_img=100, p=0.3)  # Δ = 0.16
    ps = []
    for _ in range(3):
        _step(c, -torch.ones(8))
        _step(c, -torch.ones(8))
        ps.append(c.p)
    assert ps == [0.3 - 0.16, 0.0, 0.0] and c.rt == -1.0


def test_rt_is_the_mean_sign_over_the_interval():
    c = AdaController(batch_size=4, target=0.5, interval=2, speed_img=80, p=0.5)
    _step(c, torch.tensor([1.0, 2.0, -3.0, 0.0]))  # signs 1 + 1 − 1 + 0
    assert _step(c, torch.tensor([5.0, 0.1, 0.2, 0.3]))  # 4
    assert c.rt == 5 / 8 and c.p == 0.5 + 0.1
    _step(c, torch.tensor([1.0, 1.0, -1.0, 1.0]))
    _step(c, torch.tensor([1.0, 1.0, -1.0, 1.0]))
    assert c.rt == 0.5 and c.p == 0.5 + 0.1  # r_t = target: sign 0, p stays


def test_interval_without_logits_leaves_p():
    c = AdaController(batch_size=4, interval=1, speed_img=40, p=0.5)
    assert not c.update() and c.p == 0.5 and math.isnan(c.rt)


def test_state_dict_round_trip_mid_interval_continues_identically(tmp_path):
    logits = [torch.randn(8, generator=torch.Generator().manual_seed(i)) + 0.4 for i in range(40)]
    a = AdaController(batch_size=8, target=0.2, interval=4, speed_img=200)
    for z in logits[:10]:  # 2½ intervals
        _step(a, z)
    torch.save({"ada": a.state_dict()}, tmp_path / "ckpt.pt")
    b = AdaController(batch_size=8, target=0.2, interval=4, speed_img=200)
    b.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["ada"])
    assert (b.p, b.rt) == (a.p, a.rt) and a.rt == a.rt  # rt set (not NaN) after 2 intervals
    for z in logits[10:]:
        assert _step(a, z) == _step(b, z)
        assert (a.p, a.rt) == (b.p, b.rt)
    assert a.p > 0


def test_fresh_state_dict_round_trips_rt_nan(tmp_path):
    torch.save(AdaController(batch_size=2).state_dict(), tmp_path / "s.pt")
    c = AdaController(batch_size=2, p=0.7)
    c.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert c.p == 0.0 and math.isnan(c.rt)


def test_distributed_all_reduces_the_accumulators(monkeypatch):
    """Two ranks with the same logits: the reduced sums are twice one rank's, so r_t is unchanged but the
    count says both ranks' logits went in (the controller would see them under a real process group)."""
    calls = []

    def fake_all_reduce(t, op=None):
        calls.append(t.clone())
        t.mul_(2)

    monkeypatch.setattr(ada, "_distributed", lambda: True)
    monkeypatch.setattr(ada.dist, "all_reduce", fake_all_reduce)
    c = AdaController(batch_size=8, interval=1, speed_img=80)
    c.accumulate(torch.tensor([1.0, 1.0, -1.0, 1.0]))
    assert calls and calls[0].tolist() == [2, 4]
    assert int(c.state_dict()["count"]) == 8
    assert c.update() and c.rt == 0.5 and c.p == 0.0


def _rank_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        c = AdaController(batch_size=8, target=0.1, interval=2, speed_img=160, p=0.5)  # Δ = 0.1
        for _ in range(4):  # rank 0 alone has r_t = 0.5 (> target), rank 1 alone −0.5: only the sum decides
            c.accumulate(torch.tensor([1.0, 1.0, -1.0, 1.0]) if rank == 0 else torch.tensor([-1.0, -1.0, -1.0, 1.0]))
            c.update()
        torch.save({"p": c.p, "rt": c.rt, "state": c.state_dict()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_p_under_torch_distributed(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(2, f"file://{tmp_path}/store", str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # per interval: Σ signs (2 − 2) · 2 steps over 16 logits → r_t = 0 < target → p falls twice, on both ranks;
    # rank 0 on its own (r_t = 0.5) would have raised it
    assert r0["rt"] == r1["rt"] == 0.0
    assert r0["p"] == r1["p"] == pytest.approx(0.3)
    assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(r1["state"][k])) for k, v in r0["state"].items())
