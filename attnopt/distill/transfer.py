"""Stage 1, attention transfer: each site's variant parameters learn to imitate softmax.

For every rewritten site with trainable tensors (Hedgehog feature maps, the hybrid
mixing gate), the teacher's attention inputs and exact outputs are recorded at the
op boundary (:class:`~attnopt.distill.teacher.TeacherMode`) and the site's own op is
trained on them to reproduce the output: the loss of a site is its output MSE
relative to the teacher output's mean square (per sequence) (so every layer weighs the same
whatever its scale), plus, optionally for linear sites with Hedgehog maps,
Hedgehog's cross-entropy between the softmax attention weights and the linear ones.
Each site's loss depends only on its own parameters, so the summed loss's backward
is one small backward per site; the model's weights are never touched.
"""

from __future__ import annotations

import torch
from torch import nn

from attnopt.distill.teacher import SiteCapture, TeacherMode
from attnopt.kernels.dense.reference import visible_keys
from attnopt.kernels.linear.feature_maps import apply_feature_map

__all__ = ["SiteStudent", "hedgehog_attention_ce", "relative_mse"]


def relative_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean((out − target)²) / mean(target²)`` per sequence (dim 0), averaged, in fp32.

    Per sequence, so that the mean over equal slices of a batch (one per process) is
    the mean over the batch: data-parallel training gets the single-process gradient.
    """
    t = target.float().flatten(1)
    err = (out.float().flatten(1) - t).square().mean(1)
    return (err / t.square().mean(1).clamp_min(1e-12)).mean()


def _is_linear_hedgehog(cap: SiteCapture) -> bool:
    # linear_attention(q, k, v, kv_mask, bias, scale, causal, feature_map, chunk, decay, eps,
    #                  q_weight, q_bias, k_weight, k_bias)
    return (
        cap.op.name().endswith("linear_attention")
        and cap.args[7] == "hedgehog"
        and cap.args[9] is None
    )


def hedgehog_attention_ce(cap: SiteCapture) -> torch.Tensor:
    """Hedgehog's loss: cross-entropy of the linear attention weights
    ``φ(q_i)·φ(k_j) / Σ_j φ(q_i)·φ(k_j)`` against the softmax weights, mean over the
    query rows that see a key. Materialises ``[B, H, N, M]``: for modest lengths."""
    q, k, _v, kv_mask, _bias, scale, causal = cap.args[:7]
    qw, qb, kw, kb = cap.args[11:15]
    B, H, N, _ = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    visible = visible_keys(N, M, causal=causal, kv_mask=kv_mask, device=q.device)
    if visible is None:
        visible = torch.ones(N, M, dtype=torch.bool, device=q.device)
    visible = visible.expand(B, H, N, M)
    qf, kf = q.float(), k.float()
    with torch.no_grad():
        k_rep = kf.repeat_interleave(H // Hkv, dim=1)
        scores = (qf @ k_rep.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
        teacher = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # [B, H, N, M]
    phi_q = apply_feature_map(qf, "hedgehog", weight=qw, bias=qb)  # [B, H, N, F]
    phi_k = apply_feature_map(kf, "hedgehog", weight=kw, bias=kb)  # [B, Hkv, M, F]
    a = (phi_q @ phi_k.repeat_interleave(H // Hkv, dim=1).transpose(-1, -2)) * visible
    student = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
    rows = visible.any(-1)
    ce = -(teacher * torch.log(student.clamp_min(1e-12))).sum(-1)
    return ce[rows].mean()


class SiteStudent(nn.Module):
    """The trained sites' parameter modules as one module whose forward is the loss.

    ``forward(captures)`` returns the sum over sites of the mean, over that site's
    recorded calls, of :func:`relative_mse` (``+ attention_ce ×`` Hedgehog's
    cross-entropy for linear Hedgehog sites). One module so that
    ``DistributedDataParallel`` can average the gradients of every site at once.
    """

    def __init__(self, sites: dict[str, nn.Module], attention_ce: float = 0.0) -> None:
        super().__init__()
        self.sites = nn.ModuleDict(sites)
        self.attention_ce = attention_ce

    def site_loss(self, caps: list[SiteCapture]) -> torch.Tensor:
        total = 0.0
        for cap in caps:
            loss = relative_mse(cap.student(), cap.target)
            if self.attention_ce and _is_linear_hedgehog(cap):
                loss = loss + self.attention_ce * hedgehog_attention_ce(cap)
            total = total + loss
        return total / len(caps)

    def forward(self, captures: dict[str, list[SiteCapture]]) -> torch.Tensor:
        missing = [k for k in self.sites if k not in captures]
        if missing:
            raise RuntimeError(
                f"attention transfer: sites {missing} were not called by the model's forward "
                f"on the training data; cannot train them"
            )
        return sum(self.site_loss(captures[k]) for k in self.sites)


def teacher_captures(
    optimized: nn.Module, ids: torch.Tensor, owners: dict[int, str]
) -> dict[str, list[SiteCapture]]:
    """Run ``optimized`` as the teacher on token ids ``[B, N]``; the trained sites' calls."""
    with torch.no_grad(), TeacherMode(owners) as mode:
        optimized(input_ids=ids, attention_mask=torch.ones_like(ids))
    return mode.captures
