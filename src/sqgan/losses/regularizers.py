"""Regularisers of G and D, each a pure function of tensors (the loop's phases decide when they run).

- R1 (Mescheder et al. 2018): γ/2 · E‖∇_x D(x)‖² on reals.
- Path length (StyleGAN2 §3.2): (‖J_wᵀ y‖ − a)², y ~ N(0, I)/√(HW), a the EMA of the lengths.
- QCR (SQ-GAN): ‖D(G(w^q)) − D(G(w'^q))‖², w' = f_W(z + ε), ε ~ N(0, σ²): D must not jump between neighbouring
  codes, so nearby quantized styles get nearby scores.
- Orthogonal regularisation (BigGAN §3.1): ½ Σ_W ‖W Wᵀ ⊙ (1 − I)‖²_F over G's weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """E‖∇_x D(x)‖² per sample (without γ/2); `real_images` must require grad and be D's input."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()


def path_length_penalty(images: torch.Tensor, ws: torch.Tensor, pl_mean: torch.Tensor, generator: torch.Generator,
                        decay: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(penalty, new pl_mean): ((‖J_wᵀ y‖ − a)²).mean() with a ← lerp(a, mean length, decay) (a is a buffer the
    caller keeps, so it is checkpointed)."""
    h, w = images.shape[2], images.shape[3]
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype) / math.sqrt(h * w)
    (grad,) = torch.autograd.grad((images * noise).sum(), ws, create_graph=True)
    lengths = grad.square().sum(2).mean(1).sqrt()
    new_mean = pl_mean.lerp(lengths.detach().mean(), decay)
    return (lengths - new_mean).square().mean(), new_mean


def qcr_penalty(logits: torch.Tensor, perturbed_logits: torch.Tensor) -> torch.Tensor:
    """L_qcr = E (D(G(w^q)) − D(G(w'^q)))²."""
    return (logits - perturbed_logits).square().mean()


def orthogonal_penalty(module: nn.Module, skip: tuple[str, ...] = ("shared",)) -> torch.Tensor:
    """BigGAN's orthogonal regularisation (its `ortho`, as a loss): ½ Σ_W ‖W Wᵀ ⊙ (1 − I)‖²_F over the weights W
    (rows = output units, flattened) of `module` with two or more dimensions, except those under `skip` (the shared
    class embedding); its gradient 2 (W Wᵀ ⊙ (1 − I)) W is what BigGAN-PyTorch adds to each weight's gradient."""
    total = None
    for name, p in module.named_parameters():
        if p.ndim < 2 or not p.requires_grad or any(name.startswith(s + ".") or f".{s}." in name for s in skip):
            continue
        w = p.reshape(p.shape[0], -1)
        gram = w @ w.t()
        term = 0.5 * (gram * (1 - torch.eye(gram.shape[0], device=p.device, dtype=p.dtype))).square().sum()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())
