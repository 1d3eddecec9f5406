"""Adaptive discriminator augmentation (ADA; Karras et al., NeurIPS 2020): the 'bgc' pipeline and the p heuristic.

`ada_augment` is the paper's blit + geometric + colour pipeline ('bgc', §2.3 and appendix B; NVlabs
stylegan2-ada-pytorch `training/augment.py` with every multiplier at 1), for images in [-1, 1] (0 is mid-grey:
contrast, luma flip, hue and saturation act about it, as in ADA). Each op fires per sample with probability p,
in ADA's order and with its default magnitudes:

    xflip       x → −x with probability ½                rotate90   k · 90°, k ~ U{0..3}
    xint        integer shift, U(−0.125, 0.125) · size   scale      2^N(0, 0.2²), isotropic
    rotate      U(−π, π), before and/or after aniso, each with p_rot = 1 − √(1 − p) so P(any rotation) = p
    aniso       2^N(0, 0.2²) on x, its inverse on y      xfrac      N(0, 0.125²) · size, fractional shift
    brightness  + N(0, 0.2²)                             contrast   × 2^N(0, 0.5²)
    lumaflip    Householder reflection of the luma axis with probability ½
    hue         rotation U(−π, π) about the luma axis    saturation × 2^N(0, 1) off the luma axis

The geometric ops are composed into one inverse affine matrix per sample (output pixel → input pixel, as ADA's
G_inv) and applied once with kornia's differentiable `warp_affine` (bilinear, reflect padding as ADA). ADA
instead samples a 2× upsampled image through a sym6 wavelet filter to suppress aliasing; that step is left out
here (plain bilinear is a slight blur at 32², no new parameters). The colour ops are composed into one 4×4
homogeneous colour matrix per sample and applied as one batched matmul, as ADA does.

Randomness: every draw (which samples, which magnitudes) comes from the `generator` passed in, never the global
RNG, so a step's augmentation is a function of the step's seed (exact resume). As in ADA, magnitudes and firing
draws are made for the whole batch whatever p is, so for p > 0 the generator advances by the same amount for
any p (and the same ops, batch size and channel count). p = 0 returns x itself and draws nothing: the generator is
NOT advanced. Samples whose composed matrix is the identity (nothing fired, or a no-op draw such as xflip's
"don't flip") are returned bit-identical via `torch.where`, without a host sync.

`AdaController` is ADA's heuristic (§3, `training/training_loop.py`): r_t = E[sign(D(x_real))] over `interval`
steps, and every interval  p ← clamp(p + sign(r_t − target) · batch·interval / speed_img, 0, 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import kornia
import torch
import torch.distributed as dist

OPS = ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac",
       "brightness", "contrast", "lumaflip", "hue", "saturation")
GEOMETRIC_OPS = OPS[:7]
COLOR_OPS = OPS[7:]

# stylegan2-ada's AugmentPipe defaults
XINT_MAX = 0.125  # range of integer translation, relative to the image size
SCALE_STD = 0.2  # log2 std of isotropic scaling
ROTATE_MAX = 1.0  # range of rotation, 1 = full circle
ANISO_STD = 0.2  # log2 std of anisotropic scaling
XFRAC_STD = 0.125  # std of fractional translation, relative to the image size
BRIGHTNESS_STD = 0.2  # std of the brightness offset
CONTRAST_STD = 0.5  # log2 std of contrast
HUE_MAX = 1.0  # range of hue rotation, 1 = full circle
SATURATION_STD = 1.0  # log2 std of saturation


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _mat3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
          d: torch.Tensor, e: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """[B, 3, 3] homogeneous 2D matrices [[a, b, c], [d, e, f], [0, 0, 1]] from [B] entries."""
    z, o = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, c, d, e, f, z, z, o], dim=-1).view(-1, 3, 3)


def _rotate2d(theta: torch.Tensor) -> torch.Tensor:
    cos, sin = torch.cos(theta), torch.sin(theta)
    return _mat3(cos, -sin, torch.zeros_like(theta), sin, cos, torch.zeros_like(theta))


def _scale2d(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(sx)
    return _mat3(sx, z, z, z, sy, z)


def _translate2d(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    o, z = torch.ones_like(tx), torch.zeros_like(tx)
    return _mat3(o, z, tx, z, o, ty)


def _affine_inverse(m: torch.Tensor) -> torch.Tensor:
    """[B, 2, 3] inverse of affine [B, 3, 3] matrices, in closed form (torch.linalg.inv checks for singular
    input, a host sync on CUDA; these are never singular: scales are 2^N > 0)."""
    a, b, c, d = m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1]
    tx, ty = m[:, 0, 2], m[:, 1, 2]
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    return torch.stack([ia, ib, -(ia * tx + ib * ty), ic, id_, -(ic * tx + id_ * ty)], dim=-1).view(-1, 2, 3)


def _luma_rotation(theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, 4, 4] rotation by theta about the unit axis v (Rodrigues; ADA's rotate3d)."""
    vx, vy, vz = v[0], v[1], v[2]
    s, c = torch.sin(theta), torch.cos(theta)
    cc = 1 - c
    z, o = torch.zeros_like(theta), torch.ones_like(theta)
    rows = [vx * vx * cc + c, vx * vy * cc - vz * s, vx * vz * cc + vy * s, z,
            vy * vx * cc + vz * s, vy * vy * cc + c, vy * vz * cc - vx * s, z,
            vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c, z,
            z, z, z, o]
    return torch.stack(rows, dim=-1).view(-1, 4, 4)


def _geometry(b: int, h: int, w: int, p: float, ops: frozenset[str], g: torch.Generator,
              device: torch.device) -> torch.Tensor:
    """Per-sample inverse transform G_inv [B, 3, 3] (output → input, pixel units about the image centre)."""
    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, device=device)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device)

    def fire(*shape: int, prob: float = p) -> torch.Tensor:
        return rand(*shape) < prob

    one, zero = torch.ones(b, device=device), torch.zeros(b, device=device)
    G = torch.eye(3, device=device).expand(b, 3, 3)
    if "xflip" in ops:
        i = torch.floor(rand(b) * 2)
        i = torch.where(fire(b), i, zero)
        G = G @ _scale2d(1 - 2 * i, one)  # its own inverse
    if "rotate90" in ops:
        k = torch.floor(rand(b) * 4)
        k = torch.where(fire(b), k, zero)
        # exact cos/sin of k·90° (cos(π/2) is not 0 in float), so the warp is a clean pixel permutation; built on
        # the device (a host-made table would be a host→device copy, which can stall the stream)
        cos = (k == 0).float() - (k == 2).float()
        sin = (k == 1).float() - (k == 3).float()
        G = G @ _mat3(cos, -sin, zero, sin, cos, zero)  # rotate2d_inv(−θ) = rotate2d(θ)
    if "xint" in ops:
        t = (rand(b, 2) * 2 - 1) * XINT_MAX
        t = torch.where(fire(b, 1), t, torch.zeros_like(t))
        G = G @ _translate2d(-torch.round(t[:, 0] * w), -torch.round(t[:, 1] * h))
    if "scale" in ops:
        s = torch.exp2(randn(b) * SCALE_STD)
        s = torch.where(fire(b), s, one)
        G = G @ _scale2d(1 / s, 1 / s)
    p_rot = 1 - math.sqrt(max(1.0 - p, 0.0))  # pre OR post rotation with probability p
    if "rotate" in ops:
        theta = (rand(b) * 2 - 1) * math.pi * ROTATE_MAX
        theta = torch.where(fire(b, prob=p_rot), theta, zero)
        G = G @ _rotate2d(theta)  # before anisotropic scaling
    if "aniso" in ops:
        s = torch.exp2(randn(b) * ANISO_STD)
        s = torch.where(fire(b), s, one)
        G = G @ _scale2d(1 / s, s)
    if "rotate" in ops:
        theta = (rand(b) * 2 - 1) * math.pi * ROTATE_MAX
        theta = torch.where(fire(b, prob=p_rot), theta, zero)
        G = G @ _rotate2d(theta)  # after anisotropic scaling
    if "xfrac" in ops:
        t = randn(b, 2) * XFRAC_STD
        t = torch.where(fire(b, 1), t, torch.zeros_like(t))
        G = G @ _translate2d(-t[:, 0] * w, -t[:, 1] * h)
    return G


def _color(b: int, c: int, p: float, ops: frozenset[str], g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Per-sample colour matrix C [B, 4, 4] (homogeneous RGB: colour_out = C @ colour_in)."""
    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, device=device)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device)

    def fire(*shape: int) -> torch.Tensor:
        return rand(*shape) < p

    eye = torch.eye(4, device=device)
    C = eye.expand(b, 4, 4)
    v = (torch.arange(4, device=device) < 3).float() / math.sqrt(3)  # luma axis (1, 1, 1, 0)/√3
    vv = torch.outer(v, v)
    if "brightness" in ops:
        d = randn(b) * BRIGHTNESS_STD
        d = torch.where(fire(b), d, torch.zeros_like(d))
        T = eye.repeat(b, 1, 1)
        T[:, :3, 3] = d[:, None]
        C = T @ C
    if "contrast" in ops:
        s = torch.exp2(randn(b) * CONTRAST_STD)
        s = torch.where(fire(b), s, torch.ones_like(s))
        C = torch.diag_embed(torch.stack([s, s, s, torch.ones_like(s)], dim=-1)) @ C
    if "lumaflip" in ops:
        i = torch.floor(rand(b, 1, 1) * 2)
        i = torch.where(fire(b, 1, 1), i, torch.zeros_like(i))
        C = (eye - 2 * vv * i) @ C  # Householder reflection
    if "hue" in ops and c > 1:
        theta = (rand(b) * 2 - 1) * math.pi * HUE_MAX
        theta = torch.where(fire(b), theta, torch.zeros_like(theta))
        C = _luma_rotation(theta, v) @ C
    if "saturation" in ops and c > 1:
        s = torch.exp2(randn(b, 1, 1) * SATURATION_STD)
        s = torch.where(fire(b, 1, 1), s, torch.ones_like(s))
        C = (vv + (eye - vv) * s) @ C
    return C


def ada_augment(x: torch.Tensor, p: float, generator: torch.Generator, ops: Sequence[str] = OPS) -> torch.Tensor:
    """ADA's augmentation of x [B, C, H, W] (C = 1 or 3, values in [-1, 1]), each op firing per sample with
    probability p; differentiable w.r.t. x. Same generator state → same output. See the module docstring."""
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"ada_augment: p must be in [0, 1], got {p}")
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"ada_augment: unknown ops {unknown}; allowed: {list(OPS)}")
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"ada_augment expects [B, 1 or 3, H, W], got {list(x.shape)}")
    if p == 0.0:
        return x  # nothing fires: no draws, the generator is not advanced
    chosen = frozenset(ops)
    b, c, h, w = x.shape
    device = x.device
    mat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32

    if chosen & set(GEOMETRIC_OPS):
        G_inv = _geometry(b, h, w, p, chosen, generator, device)
        moved = (G_inv != torch.eye(3, device=device)).flatten(1).any(dim=1)
        # about the centre ((w−1)/2, (h−1)/2) → pixel coordinates (pixel centres at 0..w−1, align_corners=True)
        cx, cy = torch.full((b,), (w - 1) / 2, device=device), torch.full((b,), (h - 1) / 2, device=device)
        G_inv = _translate2d(cx, cy) @ G_inv @ _translate2d(-cx, -cy)
        # kornia takes the forward (input → output) matrix and inverts it itself
        M = _affine_inverse(G_inv).to(mat_dtype)
        warped = kornia.geometry.transform.warp_affine(x, M, (h, w), mode="bilinear", padding_mode="reflection",
                                                       align_corners=True)
        x = torch.where(moved[:, None, None, None], warped, x)

    if chosen & set(COLOR_OPS):
        C = _color(b, c, p, chosen, generator, device)
        changed = (C != torch.eye(4, device=device)).flatten(1).any(dim=1)
        C = C.to(x.dtype)
        flat = x.reshape(b, c, h * w)
        if c == 3:
            out = C[:, :3, :3] @ flat + C[:, :3, 3:]
        else:  # greyscale: average the RGB rows, as ADA
            C1 = C[:, :3, :].mean(dim=1, keepdim=True)
            out = flat * C1[:, :, :3].sum(dim=2, keepdim=True) + C1[:, :, 3:]
        x = torch.where(changed[:, None, None, None], out.reshape(b, c, h, w), x)
    return x


class AdaController:
    """ADA's p heuristic (Karras et al. 2020, §3): every `interval` steps, r_t = E[sign(D(x_real))] over the
    interval, and p ← clamp(p + sign(r_t − target) · batch_size·interval / speed_img, 0, 1).

    Per step: `accumulate(real_logits)` (once or more), then `update()` once; `update()` adjusts p on every
    `interval`-th call and returns True then. ADA only clamps p at 0 (above 1 every op simply always fires);
    here p is also clamped at 1 so it is a probability.

    Args:
        batch_size: images per step over all ranks (ADA's batch_size), for the speed.
        target: r_t the heuristic steers to (ADA: 0.6).
        interval: steps between adjustments (ADA: 4).
        speed_img: images over which p can move by 1 (ADA: ada_kimg = 500 → 500k images).
        p: starting probability.

    Under torch.distributed each `accumulate` all-reduces (sums) its sign sum and count, so the accumulators,
    r_t and p are the same on every rank, equal to one process fed all ranks' logits. That costs one tiny
    collective per call (every rank must call it equally often) but makes rank 0's `state_dict()` the global
    state at any step, so a run checkpointed by rank 0 mid-interval resumes exactly. Accumulation stays on the
    logits' device (int64, exact); `update()` reads it back once per interval.
    """

    def __init__(self, batch_size: int, target: float = 0.6, interval: int = 4, speed_img: float = 500_000,
                 p: float = 0.0) -> None:
        if batch_size < 1 or interval < 1 or speed_img <= 0:
            raise ValueError(f"AdaController: batch_size and interval must be ≥ 1 and speed_img > 0, got "
                             f"{batch_size}, {interval}, {speed_img}")
        if not -1.0 <= target <= 1.0:
            raise ValueError(f"AdaController: target is a mean sign, in [-1, 1]; got {target}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"AdaController: p must be in [0, 1], got {p}")
        self.batch_size, self.target, self.interval, self.speed_img = batch_size, target, interval, speed_img
        self._p = float(p)
        self._rt = math.nan
        self._step = 0
        self._sign_sum = torch.zeros((), dtype=torch.int64)
        self._count = torch.zeros((), dtype=torch.int64)

    @property
    def p(self) -> float:
        return self._p

    @property
    def rt(self) -> float:
        """r_t of the last completed interval; NaN before the first (a float always, so it can be logged)."""
        return self._rt

    @property
    def adjustment(self) -> float:
        """|Δp| per interval: batch_size · interval / speed_img."""
        return self.batch_size * self.interval / self.speed_img

    @torch.no_grad()
    def accumulate(self, real_logits: torch.Tensor) -> None:
        """Add this batch's Σ sign(D(x_real)) and count (all ranks summed under torch.distributed)."""
        signs = real_logits.detach().flatten()
        # torch.full, not torch.tensor: no host→device copy, so no stall per step on CUDA
        stats = torch.stack([(signs > 0).sum() - (signs < 0).sum(),
                             torch.full((), signs.numel(), dtype=torch.int64, device=signs.device)])
        if _distributed():
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        self._sign_sum = self._sign_sum.to(stats.device) + stats[0]
        self._count = self._count.to(stats.device) + stats[1]

    def update(self) -> bool:
        """Count a step; at each interval's end set r_t, adjust p, clear the accumulators and return True.
        An interval without any accumulated logits leaves p and r_t as they are (and returns False)."""
        self._step += 1
        if self._step % self.interval != 0:
            return False
        total, count = int(self._sign_sum), int(self._count)
        self._sign_sum, self._count = torch.zeros_like(self._sign_sum), torch.zeros_like(self._count)
        if count == 0:
            return False
        self._rt = total / count
        direction = (self._rt > self.target) - (self._rt < self.target)  # sign(r_t − target)
        self._p = min(max(self._p + direction * self.adjustment, 0.0), 1.0)
        return True

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """p, r_t (NaN before the first interval), the accumulators and the step, as CPU tensors and an int
        (loadable with `torch.load(weights_only=True)`; float64 holds p exactly)."""
        return {
            "p": torch.tensor(self._p, dtype=torch.float64),
            "rt": torch.tensor(self._rt, dtype=torch.float64),
            "sign_sum": self._sign_sum.detach().cpu().clone(),
            "count": self._count.detach().cpu().clone(),
            "step": self._step,
        }

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        self._p = float(state["p"])
        self._rt = float(state["rt"])
        self._sign_sum = torch.as_tensor(state["sign_sum"], dtype=torch.int64).clone()
        self._count = torch.as_tensor(state["count"], dtype=torch.int64).clone()
        self._step = int(state["step"])
