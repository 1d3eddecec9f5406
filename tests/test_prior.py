"""Log-domain Sinkhorn against POT, and the SQ-GAN codebook prior (DESIGN.md §2.2) on a tiny random open_clip CLIP."""

from __future__ import annotations

import statistics
import time

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sqgan.data.clip import ClipWeightsUnavailable, load_clip
from sqgan.quant.codebook_prior import (
    CodebookPrior,
    clip_image_features,
    codebook_losses,
    interpolate_positional_embedding,
    load_prior,
    ot_loss,
    pretrain_codebook,
    restore_codebook,
    save_prior,
)
from sqgan.quant.sinkhorn import sinkhorn
from sqgan.quant.sq import StyleQuantizer

EMBED = 16  # CLIP joint embedding dimension of the tiny model


def _tiny_clip(context_length: int = 16) -> nn.Module:
    import open_clip

    torch.manual_seed(0)
    return open_clip.CLIP(embed_dim=EMBED, vision_cfg={"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                                        "head_width": 16},
                          text_cfg={"context_length": context_length, "vocab_size": 100, "width": 32, "heads": 2,
                                    "layers": 1})


def _problem(n: int, m: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(n, m, generator=g, dtype=dtype)
    p = torch.rand(n, generator=g, dtype=dtype) + 0.1  # non-uniform, positive
    q = torch.rand(m, generator=g, dtype=dtype) + 0.1
    return cost, p / p.sum(), q / q.sum()


def _clustered_features(n: int = 128, k: int = 4, seed: int = 1) -> torch.Tensor:
    """n l2-normalised image features around k random directions (noise 0.05): a target the prior can match."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, EMBED, generator=g), dim=-1)
    return F.normalize(centres.repeat(n // k, 1) + 0.05 * torch.randn(n, EMBED, generator=g), dim=-1)


def _setup(seed: int = 0) -> tuple[StyleQuantizer, nn.Module, CodebookPrior]:
    torch.manual_seed(seed)
    quantizer = StyleQuantizer(w_dim=16, code_dim=4, codebook_size=16)
    mapping = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 16))
    return quantizer, mapping, CodebookPrior(_tiny_clip(), code_dim=4, num_subvectors=quantizer.num_subvectors)


# --- Sinkhorn -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m", "epsilon"), [(5, 7, 0.1), (20, 10, 0.05), (33, 41, 0.02)])
def test_sinkhorn_marginals_and_cost_match_pot(n, m, epsilon):
    cost, p, q = _problem(n, m, seed=n)
    plan, value = sinkhorn(cost, p, q, epsilon, n_iters=1000)
    assert plan.dtype == torch.float64 and value.dim() == 0
    assert torch.allclose(plan.sum(1), p, atol=1e-5) and torch.allclose(plan.sum(0), q, atol=1e-5)
    ref = ot.sinkhorn2(p.numpy(), q.numpy(), cost.numpy(), reg=epsilon, numItermax=10_000, stopThr=1e-12)
    assert float(value) == pytest.approx(float(ref), rel=1e-4)
    assert float(value) == pytest.approx(float((plan * cost).sum()), rel=1e-12)  # the value is ⟨γ, C⟩


def test_sinkhorn_float32_keeps_its_dtype_and_agrees_with_float64():
    cost, p, q = _problem(12, 9, seed=3)
    plan32, value32 = sinkhorn(cost.float(), p.float(), q.float(), 0.05, 300)
    _, value64 = sinkhorn(cost, p, q, 0.05, 300)
    assert plan32.dtype == torch.float32 and value32.dtype == torch.float32
    assert float(value32) == pytest.approx(float(value64), rel=1e-5)


def test_sinkhorn_is_stable_where_the_kernel_underflows():
    cost, p, q = _problem(40, 30, seed=5, dtype=torch.float32)
    epsilon = 1e-3
    assert (torch.exp(-cost / epsilon) == 0).any()  # the multiplicative form would divide by 0 here
    plan, value = sinkhorn(cost, p, q, epsilon, n_iters=2000)
    assert torch.isfinite(plan).all() and torch.isfinite(value)
    assert torch.allclose(plan.sum(0), q, atol=1e-5) and torch.allclose(plan.sum(1), p, atol=1e-4)
    exact = ot.emd2(p.double().numpy(), q.double().numpy(), cost.double().numpy())
    assert float(value) == pytest.approx(exact, abs=5e-3)  # ε → 0: the entropic cost tends to the exact OT cost


def test_sinkhorn_is_differentiable_in_the_cost():
    cost, p, q = _problem(4, 3, seed=7)
    cost.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: sinkhorn(c, p, q, 0.1, 30)[1], (cost,))


def test_sinkhorn_rejects_bad_shapes_and_epsilon():
    cost, p, q = _problem(4, 3, seed=0)
    with pytest.raises(ValueError, match="p must be"):
        sinkhorn(cost, q, p, 0.1, 10)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(cost, p, q, 0.0, 10)


# --- positional embedding -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [2, 4, 7, 16, 40])
def test_positional_interpolation_keeps_both_ends(length):
    pos = torch.randn(16, 8, generator=torch.Generator().manual_seed(length))
    out = interpolate_positional_embedding(pos, length)
    assert out.shape == (length, 8)
    assert torch.equal(out[0], pos[0]) and torch.equal(out[-1], pos[-1])
    if length == 16:
        assert torch.equal(out, pos)
    ref = F.interpolate(pos.t()[None], size=length, mode="linear", align_corners=True)[0].t()
    # align_corners=True semantics; the two float32 formulas differ by rounding (≤ 3.4e-6 over 300 draws at 40)
    assert torch.allclose(out, ref, atol=1e-5)


def test_positional_interpolation_of_length_one_is_the_first_row():
    pos = torch.randn(5, 3)
    assert torch.equal(interpolate_positional_embedding(pos, 1), pos[:1])


# --- the prior ----------------------------------------------------------------------------------------------------


def test_prior_output_is_normalised_and_order_dependent():
    quantizer, _, prior = _setup()
    sub = quantizer.codes()[torch.randint(16, (3, 4))]
    t = prior(sub)
    assert t.shape == (3, EMBED) and prior.embed_dim == EMBED
    assert torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(prior(sub.flip(1)), t, atol=1e-4)  # the order of the codes matters
    with torch.no_grad():
        prior.positional_embedding.zero_()
    assert not torch.allclose(prior(sub), t, atol=1e-4)  # and the positional embedding is used
    longer = CodebookPrior(_tiny_clip(), code_dim=4, num_subvectors=40)  # s > context 16
    assert longer(F.normalize(torch.randn(2, 40, 4), dim=-1)).shape == (2, EMBED)


def test_prior_freezes_clip_and_trains_only_the_mlp():
    clip = _tiny_clip()
    prior = CodebookPrior(clip, code_dim=4, num_subvectors=4, hidden=24)
    trainable = {n for n, p in prior.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("mlp.") for n in trainable)
    assert prior.mlp[0].out_features == 24 and prior.mlp[-1].out_features == 32  # code_dim → hidden → text width
    assert prior.positional_embedding.shape == (4, 32) and prior.attn_mask.shape == (4, 4)
    assert torch.equal(prior.positional_embedding[0], clip.positional_embedding[0].detach())
    assert torch.equal(prior.positional_embedding[-1], clip.positional_embedding[-1].detach())
    prior.train()
    assert prior.mlp.training and not prior.transformer.training
    prior(F.normalize(torch.randn(2, 4, 4), dim=-1)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prior.mlp.parameters())
    assert all(p.grad is None for n, p in prior.named_parameters() if not n.startswith("mlp."))


def test_prior_runs_the_text_transformer_as_clip_encode_text():
    """At s = context length, the prior's tower on CLIP's token embeddings is CLIP's text encoder (pooling the last
    token = CLIP's argmax/EOT pooling when the highest token id comes last)."""
    clip = _tiny_clip()
    prior = CodebookPrior(clip, code_dim=4, num_subvectors=16)
    tokens = torch.randint(1, 99, (3, 16))
    tokens[:, -1] = 99  # the "EOT" token: the highest id, last
    with torch.no_grad():
        ours = prior.encode_tokens(clip.token_embedding(tokens))
        ref = clip.encode_text(tokens)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_ot_loss_is_sinkhorn_on_one_minus_cosine_with_uniform_weights():
    f = _clustered_features(32)
    t = F.normalize(torch.randn(8, EMBED), dim=-1)
    cost = (1.0 - t @ f.t()).double().numpy()
    ref = ot.sinkhorn2(np.full(8, 1 / 8), np.full(32, 1 / 32), cost, reg=0.05, numItermax=10_000, stopThr=1e-12)
    assert float(ot_loss(3.0 * t, f, 0.05, 500)) == pytest.approx(float(ref), rel=1e-4)  # T is normalised inside
    assert float(ot_loss(f, f, 0.01, 200)) < 0.05  # matching sets cost ~0


def test_l_ot_gradient_reaches_the_codebook():
    quantizer, mapping, prior = _setup()
    with torch.no_grad():
        w = mapping(torch.randn(8, 8))
    _, l_ot, out = codebook_losses(quantizer, prior, w, _clustered_features(32), 0.05, 50)
    (grad,) = torch.autograd.grad(l_ot, quantizer.codebook)
    used = torch.unique(out.indices)
    assert grad[used].abs().sum(-1).gt(0).all()  # every code in the batch gets an L_OT gradient
    unused = torch.ones(16, dtype=torch.bool)
    unused[used] = False
    assert grad[unused].abs().sum() == 0


def test_pretrain_lowers_l_ot_and_moves_the_codebook():
    quantizer, mapping, prior = _setup()
    start = quantizer.codebook.detach().clone()
    mapping_state = {k: v.clone() for k, v in mapping.state_dict().items()}
    hist = pretrain_codebook(quantizer, mapping, prior, _clustered_features(), z_dim=8, steps=60, batch_size=32,
                             lr=1e-2, epsilon=0.05, sinkhorn_iters=50, seed=0, progress=False)
    assert len(hist) == 60 and set(hist[0]) >= {"l_ot", "l_sq_uf", "loss"}
    first = statistics.mean(h["l_ot"] for h in hist[:5])
    last = statistics.mean(h["l_ot"] for h in hist[-5:])
    assert last < 0.6 * first, (first, last)  # measured: 0.76 → 0.32
    assert all(h["loss"] == pytest.approx(h["l_sq_uf"] + h["l_ot"], rel=1e-5, abs=1e-6) for h in hist)
    assert not torch.equal(quantizer.codebook.detach(), start)
    assert all(torch.equal(v, mapping.state_dict()[k]) for k, v in mapping_state.items())  # mapping is frozen


def test_pretrain_l_ot_term_changes_the_codebook_and_is_seeded():
    runs = []
    for lam in (1.0, 1.0, 0.0):
        quantizer, mapping, prior = _setup()
        hist = pretrain_codebook(quantizer, mapping, prior, _clustered_features(), z_dim=8, steps=3, batch_size=16,
                                 lr=1e-2, epsilon=0.05, sinkhorn_iters=30, seed=5, lambda_ot=lam, progress=False)
        runs.append((quantizer.codebook.detach().clone(), hist))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]  # same seed, same run
    assert not torch.allclose(runs[0][0], runs[2][0])  # L_OT's gradient reaches the codebook through pretrain


def test_pretrain_refuses_features_of_another_clip():
    quantizer, mapping, prior = _setup()
    with pytest.raises(ValueError, match="same CLIP"):
        pretrain_codebook(quantizer, mapping, prior, torch.randn(8, 5), z_dim=8, steps=1, batch_size=4, lr=1e-2,
                          epsilon=0.05, sinkhorn_iters=5, seed=0, progress=False)


# --- loading CLIP -------------------------------------------------------------------------------------------------


def test_load_clip_fails_fast_on_a_missing_file():
    import open_clip  # noqa: F401 - imported beforehand: the import itself is not what is timed

    t = time.monotonic()
    with pytest.raises(ClipWeightsUnavailable, match=r"prior\.clip_pretrained") as err:
        load_clip("ViT-B-32", "/nonexistent/file.bin", "cpu")
    assert time.monotonic() - t < 5
    assert "open_clip_pytorch_model.bin" in str(err.value)


def test_load_clip_fails_fast_on_a_hub_tag_offline(monkeypatch):
    from open_clip.pretrained import get_pretrained_cfg

    from sqgan.data.clip import _tag_is_cached

    if _tag_is_cached(get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")):
        pytest.skip("the ViT-B-32 weights are cached here: the tag would load")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.monotonic()
    with pytest.raises(ClipWeightsUnavailable, match=r"prior\.clip_pretrained.*offline"):
        load_clip("ViT-B-32", "laion2b_s34b_b79k", "cpu")
    assert time.monotonic() - t < 5


def test_load_clip_refuses_no_weights_and_unknown_tags():
    with pytest.raises(ClipWeightsUnavailable, match=r"prior\.clip_pretrained is not set"):
        load_clip("ViT-B-32", None)
    with pytest.raises(ClipWeightsUnavailable, match="neither an existing file nor an open_clip tag"):
        load_clip("ViT-B-32", "no_such_tag")


def test_load_clip_reads_a_local_weights_file(tmp_path, monkeypatch):
    import open_clip

    cfg = {"embed_dim": EMBED, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                              "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "sqgan-tiny-test", cfg)  # a built-in-like name, undone
    ref = _tiny_clip()
    weights = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(ref.state_dict(), weights)  # random weights standing in for a download
    model, preprocess = load_clip("sqgan-tiny-test", str(weights), "cpu")
    assert not model.training and callable(preprocess)
    assert torch.equal(model.positional_embedding, ref.positional_embedding)
    with pytest.raises(ClipWeightsUnavailable, match=r"could not load .*prior\.clip_pretrained"):
        load_clip("ViT-B-32", str(weights), "cpu")  # weights of another architecture


def test_clip_image_features_go_through_the_shared_cache(tmp_path):
    import open_clip

    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        paths.append(f"{i}.png")
    shas = [f"{i:064x}" for i in range(3)]
    clip = _tiny_clip()
    preprocess = open_clip.image_transform(32, is_train=False)
    feats = clip_image_features(clip, preprocess, "tiny", "w.bin", tmp_path, paths, shas, tmp_path / "cache")
    assert feats.shape == (3, EMBED) and torch.allclose(feats.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert len(list((tmp_path / "cache" / "clip-tiny-w.bin").rglob("*.npy"))) == 3  # ClipFeatures.load's key


# --- saving the prior ---------------------------------------------------------------------------------------------


def test_save_and_load_round_trip_restores_the_codebook(tmp_path):
    quantizer, _, prior = _setup()
    path = tmp_path / "prior" / "codebook_prior.pt"
    save_prior(path, quantizer, prior, {"clip_model": "tiny", "clip_pretrained": None, "steps": 3, "l_ot": 0.5})
    payload = load_prior(path)
    assert payload["format"] == 1 and payload["meta"]["num_subvectors"] == 4 and payload["meta"]["l_ot"] == 0.5
    other, _, other_prior = _setup(seed=1)
    assert not torch.equal(other.codebook, quantizer.codebook)
    restore_codebook(other, payload)
    other_prior.mlp.load_state_dict(payload["mlp"])
    assert torch.equal(other.codebook, quantizer.codebook)
    assert all(torch.equal(a, b) for a, b in zip(other_prior.mlp.parameters(), prior.mlp.parameters(), strict=True))
    assert [p.name for p in path.parent.iterdir()] == ["codebook_prior.pt"]  # no temp file left behind
    with pytest.raises(ValueError, match="sq.codebook_size"):
        restore_codebook(StyleQuantizer(w_dim=16, code_dim=4, codebook_size=8), payload)


def test_save_refuses_meta_that_is_not_json(tmp_path):
    quantizer, _, prior = _setup()
    with pytest.raises(ValueError, match="JSON"):
        save_prior(tmp_path / "p.pt", quantizer, prior, {"bad": object()})
    assert not (tmp_path / "p.pt").exists()


class _Foreign:
    pass


@pytest.mark.parametrize("kind", ["missing", "empty", "text", "foreign_dict", "pickled_object", "future_format"])
def test_load_prior_refuses_what_save_prior_did_not_write(tmp_path, kind):
    path = tmp_path / "prior.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not a torch file")
    elif kind == "foreign_dict":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    elif kind == "pickled_object":
        torch.save({"format": 1, "x": _Foreign()}, path)
    elif kind == "future_format":
        torch.save({"format": 99, "codebook": torch.zeros(2, 2), "mlp": {}, "meta": {}}, path)
    error = FileNotFoundError if kind == "missing" else ValueError
    with pytest.raises(error, match=r"prior\.pt.*sqgan prior.*sq\.prior: null"):
        load_prior(path)
