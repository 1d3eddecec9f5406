"""The codebook prior of SQ-GAN (CVPR 2025, seed 000 A.1–A.2; DESIGN.md §2.2).

Before GAN training, SQ's codebook is pre-trained so that sequences of codes "read like" the training images in
CLIP's joint embedding space:

1. z ~ N(0, I) → w = f_W(z) (frozen mapping network) → the s quantized sub-vectors c̄_{k_1}, …, c̄_{k_s} of w;
2. a learnable MLP lifts each code (code_dim) to the token width of CLIP's text Transformer; the s tokens, plus CLIP's
   pre-trained positional embedding interpolated to length s, pass through the frozen text Transformer (causal
   mask rebuilt for length s), ln_final and the text projection → a text-side feature T ∈ R^E per w;
3. T is matched to CLIP image features F of the training images by entropic OT (Sinkhorn, `quant.sinkhorn`):
   L_OT = ⟨γ, C⟩ with C_ij = 1 − cos(T_i, F_j), uniform marginals;
4. the codebook and the MLP minimise L_sq + L_uf + λ_OT · L_OT (Adam).

The image features come from `sqgan.data.embeddings` (`ClipFeatures` + `extract_features`, cached by image sha256);
`clip_image_features` wires a CLIP (loaded by `sqgan.data.clip.load_clip`, the one loader) into that cache rather
than keeping a second one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sqgan.data.embeddings import ClipFeatures, extract_features
from sqgan.io import atomic_path, read_torch_file
from sqgan.quant.common import QuantizerOutput
from sqgan.quant.sinkhorn import sinkhorn
from sqgan.quant.sq import StyleQuantizer

__all__ = [
    "PRIOR_FORMAT",
    "CodebookPrior",
    "clip_image_features",
    "codebook_losses",
    "interpolate_positional_embedding",
    "load_prior",
    "ot_loss",
    "pretrain_codebook",
    "restore_codebook",
    "save_prior",
]

PRIOR_FORMAT = 1  # version of the file written by `save_prior`


def clip_image_features(
    model: nn.Module,
    preprocess: Any,
    model_name: str,
    pretrained: str,
    root: str | Path,
    paths: Sequence[str],
    shas: Sequence[str],
    cache_dir: str | Path,
    batch_size: int = 64,
) -> torch.Tensor:
    """F [N, E]: l2-normalised CLIP image features of the images `paths`, through the curation cache
    (`sqgan.data.embeddings.extract_features`, keyed by image sha256) under the same key as `ClipFeatures.load`,
    so images already embedded for curation are not embedded again. Moves `model` to the GPU when there is one."""
    ext = ClipFeatures(model, preprocess, f"clip-{model_name}-{Path(str(pretrained)).name}")  # = ClipFeatures.load
    return torch.from_numpy(extract_features(root, paths, shas, ext, cache_dir, batch_size=batch_size))


def interpolate_positional_embedding(pos: torch.Tensor, length: int) -> torch.Tensor:
    """Resample a positional embedding [L, D] to [length, D] by linear interpolation along the sequence with
    align_corners=True semantics: row t of the result is taken at position t·(L−1)/(length−1) of the input, so the
    first and last rows are kept exactly, and length == L returns the input unchanged. length == 1 returns the first
    row (the only position a one-token sequence has). The weights are computed in float64; the result has pos's
    dtype."""
    if pos.dim() != 2:
        raise ValueError(f"interpolate_positional_embedding: pos must be [L, D], got {list(pos.shape)}")
    if length < 1:
        raise ValueError(f"interpolate_positional_embedding: length must be ≥ 1, got {length}")
    n = pos.shape[0]
    if length == 1 or n == 1:
        return pos[:1].expand(length, -1).clone()
    t = torch.linspace(0.0, n - 1, length, dtype=torch.float64, device=pos.device)  # linspace keeps both ends exact
    lo = t.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = (t - lo.to(torch.float64)).to(pos.dtype)[:, None]
    return pos[lo] * (1 - frac) + pos[hi] * frac  # frac = 0 at integer positions: those rows are copied exactly


def _causal_mask(length: int) -> torch.Tensor:
    """Additive causal mask [length, length] (−inf above the diagonal), as open_clip's `build_causal_mask`."""
    return torch.full((length, length), float("-inf")).triu_(1)


class CodebookPrior(nn.Module):
    """Text-side features T of code sequences: learnable MLP → CLIP's frozen text Transformer (SQ-GAN A.1–A.2).

    Args:
        clip_model: an open_clip `CLIP` (or `CustomTextCLIP` with a built-in `TextTransformer`). Its text
            Transformer, ln_final and text projection are shared with this module and frozen (requires_grad False,
            kept in eval mode); its vision tower is not held.
        code_dim: dimension of a code / sub-vector.
        num_subvectors: s, the sequence length (context length of the text Transformer here).
        hidden: hidden width of the MLP (default: the text width).

    The pre-trained positional embedding is interpolated from its length to s (`interpolate_positional_embedding`)
    and the causal mask rebuilt for s (bidirectional where the CLIP text tower has no causal mask). Pooling is the
    last token: under the causal mask it is the one that attends to all s codes (CLIP pools its EOT token, the last
    real token of a text, for the same reason).
    """

    def __init__(self, clip_model: nn.Module, code_dim: int, num_subvectors: int, hidden: int | None = None) -> None:
        super().__init__()
        text = getattr(clip_model, "text", None)
        text = text if isinstance(getattr(text, "transformer", None), nn.Module) else clip_model
        needed = ("transformer", "positional_embedding", "ln_final", "text_projection")
        if not all(hasattr(text, a) for a in needed):
            raise ValueError("CodebookPrior needs an open_clip CLIP with a built-in text Transformer (transformer, "
                             "positional_embedding, ln_final, text_projection); HF text towers are not supported")
        if code_dim < 1 or num_subvectors < 1:
            raise ValueError(f"CodebookPrior: code_dim and num_subvectors must be ≥ 1, got {code_dim}, "
                             f"{num_subvectors}")
        token = getattr(text, "token_embedding", None)
        width = int(getattr(text.transformer, "width", 0) or token.embedding_dim)
        self.code_dim, self.num_subvectors, self.width = code_dim, num_subvectors, width
        self.hidden = hidden or width
        self.mlp = nn.Sequential(nn.Linear(code_dim, self.hidden), nn.GELU(), nn.Linear(self.hidden, width))
        self.transformer, self.ln_final = text.transformer, text.ln_final
        self.text_projection = text.text_projection  # nn.Linear, nn.Parameter [width, E] or None
        for part in (self.transformer, self.ln_final):
            part.requires_grad_(False)
        if isinstance(self.text_projection, nn.Parameter | nn.Module):
            self.text_projection.requires_grad_(False)
        pos = text.positional_embedding.detach()
        self.register_buffer("positional_embedding", interpolate_positional_embedding(pos, num_subvectors).clone())
        self.causal = getattr(text, "attn_mask", None) is not None  # keep the tower's own masking (CLIP: causal)
        self.register_buffer("attn_mask", _causal_mask(num_subvectors) if self.causal else None, persistent=False)
        self.train(self.training)

    def extra_repr(self) -> str:
        return f"code_dim={self.code_dim}, num_subvectors={self.num_subvectors}, width={self.width}"

    def train(self, mode: bool = True) -> CodebookPrior:
        """Only the MLP follows `mode`; the frozen CLIP parts stay in eval mode."""
        super().train(mode)
        for part in (self.transformer, self.ln_final):
            part.eval()
        if isinstance(self.text_projection, nn.Module):
            self.text_projection.eval()
        return self

    @property
    def embed_dim(self) -> int:
        """E, the dimension of T (CLIP's joint embedding)."""
        proj = self.text_projection
        if proj is None:
            return self.width
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    def encode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Un-normalised T [B, E] of token embeddings x [B, s, width], as open_clip's `CLIP.encode_text` after its
        token embedding (cast dtype, + positional embedding, transformer(x, attn_mask), ln_final, pool, project),
        pooling the last token."""
        cast = self.transformer.get_cast_dtype()
        x = x.to(cast) + self.positional_embedding.to(cast)
        mask = None if self.attn_mask is None else self.attn_mask.to(x.device)
        x = self.transformer(x, attn_mask=mask)  # open_clip's Transformer takes [B, L, D] (batch_first or not)
        x = self.ln_final(x)[:, -1]  # the last token sees the whole sequence under the causal mask
        proj = self.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def forward(self, sub: torch.Tensor) -> torch.Tensor:
        """T [B, E] (l2-normalised) of the code sequences sub [B, s, code_dim]."""
        if sub.dim() != 3 or sub.shape[1:] != (self.num_subvectors, self.code_dim):
            raise ValueError(f"CodebookPrior expects [B, {self.num_subvectors}, {self.code_dim}], got "
                             f"{list(sub.shape)}")
        return F.normalize(self.encode_tokens(self.mlp(sub)).float(), dim=-1)


def ot_loss(text: torch.Tensor, image: torch.Tensor, epsilon: float, n_iters: int) -> torch.Tensor:
    """L_OT (SQ-GAN A.2): entropic OT cost between T [B, E] and F [N, E] with uniform marginals.

    The cost is C_ij = 1 − cos(T_i, F_j) ∈ [0, 2] (both sides l2-normalised here; it equals ½‖T̂_i − F̂_j‖², so the
    squared-distance cost is the same up to a factor 2 and ε scales with it). Computed in float32 at least.
    """
    if text.dim() != 2 or image.dim() != 2 or text.shape[1] != image.shape[1]:
        raise ValueError(f"ot_loss: T [B, E] and F [N, E] must share E, got {list(text.shape)} and "
                         f"{list(image.shape)}")
    dtype = torch.promote_types(torch.promote_types(text.dtype, image.dtype), torch.float32)
    t = F.normalize(text.to(dtype), dim=-1)
    f = F.normalize(image.to(dtype), dim=-1)
    cost = 1.0 - t @ f.t()
    p = torch.full((t.shape[0],), 1.0 / t.shape[0], dtype=dtype, device=t.device)
    q = torch.full((f.shape[0],), 1.0 / f.shape[0], dtype=dtype, device=t.device)
    return sinkhorn(cost, p, q, epsilon, n_iters)[1]


def codebook_losses(
    quantizer: StyleQuantizer,
    prior: CodebookPrior,
    w: torch.Tensor,
    image: torch.Tensor,
    epsilon: float,
    sinkhorn_iters: int,
) -> tuple[torch.Tensor, torch.Tensor, QuantizerOutput]:
    """(L_sq + L_uf, L_OT, the quantizer's output) for a batch w [B, w_dim] and image features F [N, E].

    The prior reads the codebook rows themselves, c̄[indices] from `quantizer.codes()`, not the straight-through
    value (whose gradient goes to w): so L_OT's gradient reaches `quantizer.codebook`. Forward values are the same.
    """
    out = quantizer(w)
    codes = quantizer.codes()[out.indices]  # [B, s, code_dim], on the sphere, differentiable w.r.t. the codebook
    return out.loss, ot_loss(prior(codes), image, epsilon, sinkhorn_iters), out


def pretrain_codebook(
    quantizer: StyleQuantizer,
    mapping: nn.Module,
    prior: CodebookPrior,
    image_features: torch.Tensor,
    *,
    z_dim: int,
    steps: int,
    batch_size: int,
    lr: float,
    epsilon: float,
    sinkhorn_iters: int,
    seed: int,
    lambda_ot: float = 1.0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    feature_batch_size: int | None = None,
) -> list[dict[str, float]]:
    """Pre-train SQ's codebook with the CLIP prior: minimise L_sq + L_uf + λ_OT · L_OT (SQ-GAN A.2).

    Each step maps `batch_size` seeded z ~ N(0, I) through the frozen `mapping` (no gradient, its parameters are
    left as they are), quantizes w, and matches the prior's T to a random batch of `feature_batch_size` (default
    `batch_size`, at most N) image features drawn without replacement. Adam updates the codebook and the prior's
    MLP only. All randomness (z, feature batches) comes from one CPU torch.Generator seeded with `seed`, so a run
    is the same on any device. Modules are moved to `device`; their train/eval modes are restored at the end.

    Returns:
        per step {"l_ot", "l_sq_uf", "loss", "perplexity", "utilisation"} (utilisation: share of the K codes used
        by the batch).
    """
    if steps < 0 or batch_size < 1:
        raise ValueError(f"pretrain_codebook: steps must be ≥ 0 and batch_size ≥ 1, got {steps}, {batch_size}")
    if image_features.dim() != 2 or image_features.shape[0] < 1:
        raise ValueError(f"pretrain_codebook: image_features must be [N, E] with N ≥ 1, got "
                         f"{list(image_features.shape)}")
    if image_features.shape[1] != prior.embed_dim:
        raise ValueError(f"pretrain_codebook: image features have dim {image_features.shape[1]} but the prior's "
                         f"CLIP embeds to {prior.embed_dim}; extract them with the same CLIP model")
    if prior.num_subvectors != quantizer.num_subvectors or prior.code_dim != quantizer.code_dim:
        raise ValueError(f"pretrain_codebook: the prior reads {prior.num_subvectors} codes of dim {prior.code_dim} "
                         f"but the quantizer makes {quantizer.num_subvectors} of dim {quantizer.code_dim}")
    device = torch.device(device)
    modes = (quantizer.training, mapping.training, prior.training)
    quantizer.to(device).train()
    prior.to(device).train()
    mapping.to(device).eval()
    feats = F.normalize(image_features.detach().to(device=device, dtype=torch.float32), dim=-1)
    n_feat = min(feature_batch_size or batch_size, feats.shape[0])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([quantizer.codebook, *prior.mlp.parameters()], lr=lr)
    history: list[dict[str, float]] = []
    try:
        for _ in tqdm(range(steps), desc="codebook prior", unit="step", disable=not progress, mininterval=1.0):
            z = torch.randn(batch_size, z_dim, generator=gen).to(device)
            pick = torch.randperm(feats.shape[0], generator=gen)[:n_feat].to(device)
            with torch.no_grad():  # the mapping network is frozen
                w = mapping(z)
            l_sq_uf, l_ot, out = codebook_losses(quantizer, prior, w, feats[pick], epsilon, sinkhorn_iters)
            loss = l_sq_uf + lambda_ot * l_ot
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append({
                "l_ot": l_ot.item(), "l_sq_uf": l_sq_uf.item(), "loss": loss.item(),
                "perplexity": out.perplexity.item(), "utilisation": (out.counts > 0).float().mean().item(),
            })
    finally:
        quantizer.train(modes[0])
        mapping.train(modes[1])
        prior.train(modes[2])
    return history


def save_prior(path: str | Path, quantizer: StyleQuantizer, prior: CodebookPrior, meta: dict[str, Any]) -> None:
    """Write the pre-trained codebook and prior MLP atomically to `path` (a torch file):
    {"format": 1, "codebook": [K, code_dim], "mlp": state_dict, "meta": {...}}.

    `meta` must be JSON-able (the file is read back with weights_only=True); code_dim, num_subvectors (s),
    codebook_size (K) and the MLP's hidden width are added to it from the modules."""
    meta = {**meta, "code_dim": quantizer.code_dim, "num_subvectors": quantizer.num_subvectors,
            "codebook_size": quantizer.codebook_size, "hidden": prior.hidden, "width": prior.width}
    try:
        meta = json.loads(json.dumps(meta))  # plain types only, so weights_only loading accepts them
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_prior: meta must be JSON-able ({e})") from None
    payload = {
        "format": PRIOR_FORMAT,
        "codebook": quantizer.codebook.detach().cpu().clone(),
        "mlp": {k: v.detach().cpu().clone() for k, v in prior.mlp.state_dict().items()},
        "meta": meta,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_prior(path: str | Path) -> dict[str, Any]:
    """Read a file written by `save_prior` (weights_only=True). A missing file raises FileNotFoundError, an empty,
    unreadable or foreign one ValueError; both name the path and the fix."""
    path = Path(path)
    fix = "run `sqgan prior` to pre-train the codebook (or set sq.prior: null to train without the prior)"
    payload = read_torch_file(path, "codebook prior", fix)
    if not isinstance(payload, dict) or "format" not in payload:
        raise ValueError(f"{path} is not a codebook prior file (no 'format' entry); {fix}")
    if payload["format"] != PRIOR_FORMAT:
        raise ValueError(f"{path} has codebook prior format {payload['format']!r}, this sqgan reads "
                         f"{PRIOR_FORMAT}; {fix}")
    ok = (isinstance(payload.get("codebook"), torch.Tensor) and payload["codebook"].dim() == 2
          and isinstance(payload.get("mlp"), dict) and isinstance(payload.get("meta"), dict))
    if not ok:
        raise ValueError(f"{path} is not a complete codebook prior file (codebook, mlp, meta); {fix}")
    return payload


def restore_codebook(quantizer: StyleQuantizer, payload: dict[str, Any]) -> None:
    """Copy a loaded prior's codebook into `quantizer` (shapes must match: K and code_dim)."""
    cb = payload["codebook"]
    if tuple(cb.shape) != tuple(quantizer.codebook.shape):
        raise ValueError(f"the codebook prior has a [{cb.shape[0]}, {cb.shape[1]}] codebook but the quantizer "
                         f"expects [{quantizer.codebook_size}, {quantizer.code_dim}] (sq.codebook_size, "
                         f"sq.code_dim); re-run `sqgan prior` with the same settings")
    with torch.no_grad():
        quantizer.codebook.copy_(cb.to(quantizer.codebook))
