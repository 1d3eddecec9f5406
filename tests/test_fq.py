"""FeatureQuantizer against DESIGN.md §2.1 on values computed by hand or by brute force."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sqgan.config import default_params
from sqgan.models.factory import build_discriminator
from sqgan.quant import FeatureQuantizer


def _quantizer(codebook: torch.Tensor, decay: float, **kw) -> FeatureQuantizer:
    q = FeatureQuantizer(codebook.shape[1], codebook.shape[0], decay=decay, init="random", **kw)
    with torch.no_grad():
        q.codebook.copy_(codebook)
        q.ema_sum.copy_(codebook)
        q.ema_count.fill_(1.0)
        q.initialised.fill_(True)
    return q


def _as_map(vectors: torch.Tensor) -> torch.Tensor:
    """[N, C] → [N, C, 1, 1] so each vector is one position."""
    return vectors[:, :, None, None].clone()


def test_ema_update_matches_hand_computed_case():
    # λ = 0.7, not 0.5: a swap of λ and 1 − λ must change every number below
    q = _quantizer(torch.tensor([[0.0, 0.0], [10.0, 10.0]]), decay=0.7, eps=1e-5)
    h = torch.tensor([[1.0, 1.0], [2.0, 0.0], [9.0, 9.0]])  # → entries 0, 0, 1
    out = q(_as_map(h))
    assert out.indices.flatten().tolist() == [0, 0, 1]
    # n = [2, 1], Σh = [[3, 1], [9, 9]]
    # N = .7·[1, 1] + .3·[2, 1] = [1.3, 1.0];  m = .7·e + .3·Σh = [[0.9, 0.3], [9.7, 9.7]]
    assert torch.allclose(q.ema_count, torch.tensor([1.3, 1.0]))
    assert torch.allclose(q.ema_sum, torch.tensor([[0.9, 0.3], [9.7, 9.7]]))
    eps, n = 1e-5, 2.3
    smoothed = [(1.3 + eps) / (n + 2 * eps) * n, (1.0 + eps) / (n + 2 * eps) * n]
    expected = torch.tensor([[0.9 / smoothed[0], 0.3 / smoothed[0]], [9.7 / smoothed[1], 9.7 / smoothed[1]]])
    assert torch.allclose(q.codebook, expected, rtol=0, atol=1e-6)
    assert q.codebook[0, 0].item() == pytest.approx(0.9 / 1.3, abs=1e-4)  # ≈ m/N, not m
    # commitment β·mean((h − sg(e))²) with the dictionary the vectors were assigned to
    e_used = torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 10.0]])
    assert out.loss.item() == pytest.approx(0.25 * ((h - e_used) ** 2).mean().item())


def test_commitment_gradient_pulls_each_feature_toward_its_entry():
    # d/dh β·mean((h − sg(e))²) = 2β(h − e)/N: the features move, the EMA dictionary gets no gradient
    q = _quantizer(torch.tensor([[0.0, 0.0], [10.0, 10.0]]), decay=0.7)
    h = torch.tensor([[1.0, 1.0], [2.0, 0.0], [9.0, 9.0]])
    hmap = _as_map(h).requires_grad_(True)
    q(hmap).loss.backward()
    e_used = torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 10.0]])
    expected = 2 * 0.25 * (h - e_used) / h.numel()
    assert torch.allclose(hmap.grad[:, :, 0, 0], expected)


def test_ema_update_with_zero_decay_equals_batch_mean():
    torch.manual_seed(0)
    start = torch.randn(8, 5)
    q = _quantizer(start, decay=0.0)
    h = torch.randn(200, 5) * 2
    out = q(_as_map(h))
    idx = out.indices.flatten()
    for k in range(8):
        chosen = h[idx == k]
        if len(chosen):
            assert torch.allclose(q.codebook[k], chosen.mean(0), atol=1e-4), k
        else:
            assert torch.all(q.codebook[k] == 0)  # nothing assigned: m_k = 0


def test_assignment_equals_brute_force_nearest_search():
    torch.manual_seed(1)
    q = FeatureQuantizer(6, 32, init="random").eval()
    h = torch.randn(3, 6, 5, 4)
    out = q(h)
    flat = h.permute(0, 2, 3, 1).reshape(-1, 6)
    brute = torch.stack([torch.stack([(v - e).pow(2).sum() for e in q.codebook]).argmin() for v in flat])
    assert torch.equal(out.indices.flatten(), brute)
    e = q.codebook[brute].view(3, 5, 4, 6).permute(0, 3, 1, 2)
    assert torch.allclose(out.quantized, e, atol=1e-6)  # forward value is the entry


def test_straight_through_gradient_is_identity():
    torch.manual_seed(2)
    q = FeatureQuantizer(4, 8, init="random")
    h = torch.randn(2, 4, 3, 3, requires_grad=True)
    upstream = torch.randn(2, 4, 3, 3)
    (q(h).quantized * upstream).sum().backward()
    assert torch.equal(h.grad, upstream)


@pytest.mark.parametrize("init", ["batch", "random"])
def test_unused_codes_stay_finite(init):
    torch.manual_seed(3)
    q = FeatureQuantizer(4, 16, decay=0.9, init=init)
    q(torch.randn(8, 4, 2, 2) * 3.0)  # initialise on spread-out features
    used = set()
    for _ in range(300):
        h = torch.randn(8, 4, 2, 2) * 0.01 + 3.0  # a tight cluster: most entries never chosen
        used |= set(q(h).indices.unique().tolist())
    assert len(used) < 16
    assert torch.isfinite(q.codebook).all() and torch.isfinite(q.ema_sum).all()
    assert q.codebook.abs().max() < 1e3


def test_batch_init_starts_dictionary_on_the_features():
    torch.manual_seed(4)
    q = FeatureQuantizer(3, 4, decay=0.99, init="batch")
    h = torch.randn(2, 3, 4, 4) * 0.01 + 5.0
    out = q(h)
    assert out.perplexity > 1.5  # several entries used from the first step
    assert (q.codebook - 5.0).abs().max() < 0.5


def test_feed_mode_passes_quantized_features_and_regularize_passes_h():
    from sqgan.models.base import Discriminator
    from sqgan.models.dcgan import DCGANTrunk

    x = torch.randn(4, 3, 32, 32)
    for mode, changes in (("feed", True), ("regularize", False)):
        torch.manual_seed(5)
        d = Discriminator(DCGANTrunk(32, 8), fq_layers=[1], codebook_size=4, mode=mode, init="random").eval()
        before, before_h = d(x).logits, d(x, feed=False).logits
        with torch.no_grad():
            d.quantizers["1"].codebook.mul_(3.0)
        after, after_h = d(x).logits, d(x, feed=False).logits
        # feed: the next layer sees the entries, so moving them moves the logits; regularize: it sees h
        assert (not torch.allclose(before, after)) == changes, mode
        # feed=False (the warm-up that feeds h first) never depends on the dictionary
        assert torch.equal(before_h, after_h), mode
        assert torch.equal(after_h, after) != changes, mode


def test_the_shipped_discriminator_goes_on_with_h_as_the_official_code():
    """The default (fq.mode regularize, issue 25: feed mode lost modes on the mode benchmark): D built from the
    shipped params scores as the same D without FQ, and only the commitment loss carries FQ."""
    torch.manual_seed(6)
    with_fq = build_discriminator(default_params(["model.arch=dcgan", "model.d_channels=8"]))
    without = build_discriminator(default_params(["model.arch=dcgan", "model.d_channels=8", "fq.enabled=false"]))
    without.load_state_dict(with_fq.state_dict(), strict=False)  # same weights, no dictionaries
    x = torch.randn(6, 3, 32, 32)
    out = with_fq(x)
    assert sorted(out.quant) == ["fq/layer1", "fq/layer2"]
    assert torch.equal(out.logits, without(x).logits)
    assert out.loss > 0
    out.loss.backward()  # α·L_Q reaches the blocks before each quantized layer
    assert with_fq.trunk.blocks[0][0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ distributed
K, C, STEPS = 8, 4, 3


def _data(rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(2, C, 3, 3, generator=g) + 2.0 * rank  # the ranks see different data


def _start_codebook() -> torch.Tensor:
    return torch.randn(K, C, generator=torch.Generator().manual_seed(7)) + 1.0


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    q = _quantizer(_start_codebook(), decay=0.8)
    torch.manual_seed(rank)  # different draws per rank: batch init must still agree
    qb = FeatureQuantizer(C, K, decay=0.8, init="batch")
    for step in range(STEPS):
        q(_data(rank, step))
        qb(_data(rank, step))
    torch.save({"fixed": q.codebook.clone(), "batch": qb.codebook.clone(), "count": q.ema_count.clone()},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_gloo_ranks_hold_identical_dictionary_equal_to_concatenated_batch(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, str(tmp_path / "init"), str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert torch.equal(r0["fixed"], r1["fixed"])
    assert torch.equal(r0["batch"], r1["batch"])
    single = _quantizer(_start_codebook(), decay=0.8)
    for step in range(STEPS):
        single(torch.cat([_data(0, step), _data(1, step)]))
    assert torch.allclose(r0["fixed"], single.codebook, atol=1e-5)
    assert torch.allclose(r0["count"], single.ema_count, atol=1e-6)
    assert not torch.allclose(single.codebook, _quantizer(_start_codebook(), 0.8).codebook)  # it did move


def _ddp_rank(rank: int, port: int, out_dir: str) -> None:
    """One gloo rank: EMA steps on this rank's own features, then the cross-rank dictionary check, then again
    after rank 1's dictionary is nudged."""
    import torch.distributed as dist

    from sqgan.train.loop import Runtime, check_dictionaries_agree

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        net = torch.nn.ModuleDict({"q": FeatureQuantizer(dim=8, codebook_size=4, decay=0.8)})
        g = torch.Generator().manual_seed(100 + rank)  # each rank sees different features
        for _ in range(3):
            net["q"](torch.randn(2, 8, 3, 3, generator=g))
        rt = Runtime(rank=rank, world_size=2)
        check_dictionaries_agree(net, rt, 3)  # the all-reduced EMA keeps them equal
        if rank == 1:
            net["q"].codebook[0, 0] += 1e-6
        try:
            check_dictionaries_agree(net, rt, 4)
            result = "no error"
        except RuntimeError as e:
            result = str(e)
        Path(out_dir, f"rank{rank}.txt").write_text(result)
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_keep_one_dictionary_and_a_diverged_rank_fails_loudly(tmp_path):
    from conftest import free_port

    mp.spawn(_ddp_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        msg = (tmp_path / f"rank{rank}.txt").read_text()
        assert msg.startswith("FQ dictionaries / SQ codebook diverged across DDP ranks at step 4"), msg
        assert "rank 0: " in msg and "rank 1: " in msg


def test_forward_without_update_leaves_the_dictionary_and_still_counts():
    torch.manual_seed(6)
    q = FeatureQuantizer(3, 4, decay=0.5, init="random")
    h = torch.randn(2, 3, 4, 4)
    q(h)  # initialise + one update
    before = [b.clone() for b in (q.codebook, q.ema_count, q.ema_sum)]
    out = q(h * 2.0, update=False)
    assert all(torch.equal(a, b) for a, b in zip(before, (q.codebook, q.ema_count, q.ema_sum), strict=True))
    assert out.counts.sum().item() == 2 * 4 * 4
    q(h * 2.0)  # with update it moves
    assert not torch.equal(before[0], q.codebook)
