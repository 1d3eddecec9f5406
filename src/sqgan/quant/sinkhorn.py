"""Entropic optimal transport by Sinkhorn iterations in the log domain (Cuturi, NeurIPS 2013; Peyré & Cuturi,
"Computational Optimal Transport", 2019, §4.4 "log-domain computations"; DESIGN.md §2.2).

For a cost C ∈ R^{n×m}, marginals p ∈ Δ_n, q ∈ Δ_m and a regularisation ε > 0, the entropic plan is

    γ = diag(u) K diag(v),   K = exp(−C/ε),   u = p ⊘ Kv,   v = q ⊘ Kᵀu,   v⁰ = 1              (Cuturi 2013, alg. 1)

With the dual potentials f = ε log u, g = ε log v the same updates read (Peyré & Cuturi eq. 4.43)

    f = ε log p − ε LSE_j((g_j − C_ij)/ε),   g = ε log q − ε LSE_i((f_i − C_ij)/ε),   g⁰ = 0,
    γ_ij = exp((f_i + g_j − C_ij)/ε),

where LSE is log-sum-exp. No exp(−C/ε) is ever formed, so a small ε (1e-3 with costs O(1)), for which K underflows
to 0 and the multiplicative updates divide by 0, stays finite. The returned cost is ⟨γ, C⟩ (what `ot.sinkhorn2`
returns by default), differentiable w.r.t. C by autograd through the iterations.
"""

from __future__ import annotations

import torch

__all__ = ["sinkhorn"]


def sinkhorn(
    cost: torch.Tensor, p: torch.Tensor, q: torch.Tensor, epsilon: float, n_iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropic OT plan and transport cost by `n_iters` log-domain Sinkhorn iterations.

    Args:
        cost: C [n, m] (float32 or float64; the result has its dtype).
        p: source marginal [n], positive, summing to 1.
        q: target marginal [m], positive, summing to 1.
        epsilon: ε > 0, the entropic regularisation (POT's `reg`).
        n_iters: number of (u, v) update pairs; each ends with the v-update, so the plan's column sums equal q
            exactly and its row sums approach p as the iterations converge.

    Returns:
        (γ [n, m], ⟨γ, C⟩ scalar).
    """
    if cost.dim() != 2:
        raise ValueError(f"sinkhorn: cost must be [n, m], got {list(cost.shape)}")
    n, m = cost.shape
    if p.shape != (n,) or q.shape != (m,):
        raise ValueError(f"sinkhorn: p must be [{n}] and q [{m}], got {list(p.shape)} and {list(q.shape)}")
    if not epsilon > 0:
        raise ValueError(f"sinkhorn: epsilon must be > 0, got {epsilon}")
    if n_iters < 1:
        raise ValueError(f"sinkhorn: n_iters must be ≥ 1, got {n_iters}")
    dtype = cost.dtype if cost.is_floating_point() else torch.get_default_dtype()
    cost = cost.to(dtype)
    tiny = torch.finfo(dtype).tiny
    log_p = p.to(dtype).clamp_min(tiny).log()  # a zero weight becomes a ~0 one instead of −inf (no NaN gradients)
    log_q = q.to(dtype).clamp_min(tiny).log()
    scaled = -cost / epsilon  # −C/ε = log K, never exponentiated on its own
    g = torch.zeros(m, dtype=dtype, device=cost.device)  # g⁰ = ε log v⁰ = 0
    for _ in range(n_iters):
        f = epsilon * (log_p - torch.logsumexp(scaled + g[None, :] / epsilon, dim=1))  # u = p ⊘ Kv
        g = epsilon * (log_q - torch.logsumexp(scaled + f[:, None] / epsilon, dim=0))  # v = q ⊘ Kᵀu
    plan = torch.exp(scaled + (f[:, None] + g[None, :]) / epsilon)  # γ = diag(u) K diag(v)
    return plan, (plan * cost).sum()
