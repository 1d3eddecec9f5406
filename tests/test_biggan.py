"""BigGAN (issue 19): its widths as BigGAN-PyTorch's G_arch/D_arch, conditional BN, hierarchical z, self-attention,
the projection D with FQ at every block, orthogonal regularisation, several D steps per G step, and a short
conditional run that trains, evaluates and resumes exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_overrides

from sqgan.config import ConfigError, d_blocks, default_params
from sqgan.losses.regularizers import orthogonal_penalty
from sqgan.models.biggan import BigGANSynthesis, BigGANTrunk, ConditionalBatchNorm, SelfAttention
from sqgan.models.factory import build_discriminator, build_generator
from sqgan.train.loop import Hooks, Runtime, load_checkpoint, setup, train, train_step

BIGGAN = {"model.arch": "biggan", "model.g_channels": 4, "model.d_channels": 4, "sq.enabled": "false",
          "fq.layers": "[0, 1, 2, 3]", "metrics.eval_every": 0, "metrics.diversity_every": 0}
COND = {"model.conditional": "true", "model.num_classes": 3, "metrics.names": "[fid, ifid]"}


def _params(**extra):
    return default_params(tiny_overrides(**{**BIGGAN, **extra}))


def test_widths_are_biggan_pytorchs_at_each_resolution():
    """G_arch/D_arch of BigGAN-PyTorch (ch = 64): G in/out channels per block, D out channels and downsampling."""
    want_g = {32: [256] * 3, 64: [1024, 512, 256, 128], 128: [1024, 512, 256, 128, 64]}
    want_d = {32: ([256] * 4, [16, 8, 8, 8]), 64: ([64, 128, 256, 512, 1024], [32, 16, 8, 4, 4]),
              128: ([64, 128, 256, 512, 1024, 1024], [64, 32, 16, 8, 4, 4])}
    for r in (32, 64, 128):
        g = BigGANSynthesis(120 if r == 128 else 120, r, 64, num_classes=0)  # 120: 4, 5 and 6 chunks all divide it
        assert [b.conv2.weight.shape[0] for b in g.blocks] == want_g[r]
        assert g.linear.weight.shape[0] == 16 * (256 if r == 32 else 1024)
        d = BigGANTrunk(r, 64)
        assert d.widths == want_d[r][0] and len(d.blocks) == d_blocks("biggan", r) and d.feature_dim == d.widths[-1]
        x = torch.zeros(1, 3, r, r)
        sides = []
        for block in d.blocks:
            x = block(x)
            sides.append(x.shape[-1])
        assert sides == want_d[r][1]


def test_forward_backward_with_fq_at_every_block_reaches_every_parameter():
    for extra in ({**COND}, {"model.resolution": 64, "model.z_dim": 40, "model.attention": 16, "sq.enabled": "true",
                             "model.w_dim": 40, "sq.code_dim": 4}):
        p = _params(**extra)
        torch.manual_seed(0)
        G, D = build_generator(p), build_discriminator(p)
        c = torch.tensor([0, 1, 2, 0]) if p.model.conditional else None
        out = G(torch.randn(4, p.model.z_dim), c)
        d = D(out.images, c=c)
        assert len(d.quant) == 4 and d.logits.shape == (4,)
        (d.logits.mean() + d.loss + out.loss).backward()
        missing = [n for m in (G, D) for n, q in m.named_parameters() if q.grad is None]
        assert not missing, missing


def test_conditional_bn_follows_the_class_by_hand():
    torch.manual_seed(0)
    cbn = ConditionalBatchNorm(6, 5).eval()  # running statistics: BN is (x − 0)/√(1 + eps)
    x, y = torch.randn(2, 6, 4, 4), torch.randn(2, 5)
    gain, bias = cbn.gain.weight, cbn.bias.weight  # the spectrally normalised weights the forward uses
    want = x / (1 + 1e-5) ** 0.5 * (1 + y @ gain.t())[:, :, None, None] + (y @ bias.t())[:, :, None, None]
    assert torch.allclose(cbn(x, y), want, atol=1e-5)
    # in G: the shared embedding reaches every block's BN — same z, two classes → two images; same class → one
    g = BigGANSynthesis(32, 32, 4, num_classes=2, shared_dim=8).eval()
    with torch.no_grad():
        g.shared.weight.normal_()  # N(0, 0.02) at init would make the classes differ by little
    ws = torch.randn(1, 1, 32).repeat(3, 1, 1)
    img = g(ws, c=torch.tensor([0, 0, 1]))
    assert torch.equal(img[0], img[1]) and (img[0] - img[2]).abs().max() > 1e-3


def test_hierarchical_z_gives_chunk_0_to_the_linear_and_chunk_k_to_block_k(monkeypatch):
    g = BigGANSynthesis(32, 32, 4, num_classes=2, shared_dim=8).eval()
    seen: dict[str, torch.Tensor] = {}
    g.linear.register_forward_hook(lambda m, i, o: seen.__setitem__("linear", i[0]))
    for k, block in enumerate(g.blocks):
        block.bn1.gain.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(f"block{k}", i[0]))
    ws = torch.randn(2, 1, 32)
    c = torch.tensor([1, 0])
    g(ws, c=c)
    assert torch.equal(seen["linear"], ws[:, 0, :8])
    for k in range(3):
        assert torch.equal(seen[f"block{k}"], torch.cat([g.shared(c), ws[:, 0, 8 * (k + 1) : 8 * (k + 2)]], 1))


def test_self_attention_by_hand():
    torch.manual_seed(0)
    att = SelfAttention(16).eval()  # (eval: spectral norm does not power-iterate, so the weights read below stay)
    x = torch.randn(2, 16, 4, 4)
    assert torch.equal(att(x), x)  # γ = 0 at init: the identity
    with torch.no_grad():
        att.gamma.fill_(0.7)
    th = torch.einsum("oc,bchw->bohw", att.theta.weight[:, :, 0, 0], x).flatten(2)  # [2, 2, 16]
    ph = F.max_pool2d(torch.einsum("oc,bchw->bohw", att.phi.weight[:, :, 0, 0], x), 2).flatten(2)  # [2, 2, 4]
    g = F.max_pool2d(torch.einsum("oc,bchw->bohw", att.g.weight[:, :, 0, 0], x), 2).flatten(2)  # [2, 8, 4]
    a = torch.softmax(torch.einsum("bcp,bcq->bpq", th, ph), dim=-1)  # each position over the pooled ones
    o = torch.einsum("bcq,bpq->bcp", g, a).view(2, 8, 4, 4)
    want = x + 0.7 * torch.einsum("oc,bchw->bohw", att.o.weight[:, :, 0, 0], o)
    assert torch.allclose(att(x), want, atol=1e-5)


def test_orthogonal_penalty_has_biggans_gradient():
    lin = torch.nn.Linear(5, 4, bias=True)
    emb = torch.nn.Module()
    emb.shared = torch.nn.Embedding(3, 4)
    emb.lin = lin
    orthogonal_penalty(emb).backward()
    w = lin.weight.detach()
    want = 2 * ((w @ w.t()) * (1 - torch.eye(4))) @ w  # BigGAN-PyTorch's utils.ortho
    assert torch.allclose(lin.weight.grad, want, atol=1e-6)
    assert lin.bias.grad is None and emb.shared.weight.grad is None  # 1-d and the shared embedding: left alone


def test_several_d_steps_per_g_step_each_on_its_own_reals(monkeypatch):
    from sqgan.losses import gan

    p = _params(**{"train.d_steps": 3, "train.batch_size": 4, "train.ortho_reg": 1e-4})
    state = setup(p, Runtime())

    class Data:
        images = torch.rand(20, 3, 32, 32) * 2 - 1
        labels = None

        def __len__(self):
            return 20

        def batch(self, idx):
            return self.images[idx]

    reals: list[torch.Tensor] = []
    d_main = gan.GANLoss.d_main

    def spy(self, real, *a, **k):
        reals.append(real)
        return d_main(self, real, *a, **k)

    monkeypatch.setattr(gan.GANLoss, "d_main", spy)
    before = [q.detach().clone() for q in state.D.parameters()]
    phases = train_step(state, p, Data(), Runtime())
    assert len(reals) == 3 and state.opt_d.state_dict()["state"][0]["step"] == 3
    assert state.opt_g.state_dict()["state"][0]["step"] == 1
    flat = [r.flatten(1) for r in reals]
    assert all(not torch.equal(flat[i], flat[j]) for i in range(3) for j in range(i))  # three different batches
    assert sum(1 for ph in phases if "loss/d_adv" in ph.stats) == 3
    assert any("loss/ortho" in ph.stats and ph.stats["loss/ortho"] > 0 for ph in phases)
    assert any(not torch.equal(a, b) for a, b in zip(before, state.D.parameters(), strict=True))


def test_a_conditional_biggan_run_trains_evaluates_and_resumes_exactly(tmp_path):
    from sqgan.data.demo import build_demo

    data = build_demo(tmp_path / "data", resolution=32, stride=128, lfw_faces=20, labels=True)
    p = _params(**{**COND, "model.num_classes": 2, "train.steps": 4, "train.checkpoint_every": 2,
                   "train.d_steps": 2, "train.batch_size": 8})
    logged: dict[str, float] = {}
    res = train(p, data, tmp_path / "a", hooks=Hooks(log_metrics=lambda m, s: logged.update(m), progress=None))
    assert logged["ifid40_train_randcnn"] > 0 and logged["fq/layer3/utilisation"] > 0
    resumed = train(p, data, tmp_path / "b", resume=tmp_path / "a" / "checkpoints" / "step_000002.pt",
                    hooks=Hooks(progress=None))
    a, b = load_checkpoint(res.checkpoint), load_checkpoint(resumed.checkpoint)
    assert all(torch.equal(a[n][k], b[n][k]) for n in ("G", "D", "G_ema") for k in a[n])


def test_params_refuse_what_biggan_cannot_build():
    with pytest.raises(ConfigError, match="multiple of 5"):
        _params(**{"model.resolution": 64})  # z_dim 32 into 5 chunks
    with pytest.raises(ConfigError, match="8, 16, … 32 px"):
        _params(**{"model.attention": 12})
    with pytest.raises(ConfigError, match="BigGAN's"):
        default_params(tiny_overrides(**{"model.attention": 16}))
    with pytest.raises(ConfigError, match="fq.layers"):
        _params(**{"fq.layers": "[4]"})
