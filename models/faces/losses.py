"""FaceNet's triplet loss with online semi-hard negative mining (Schroff et al. 2015, section 3.1-3.2).

For every anchor-positive pair in a batch (all pairs of the same identity), the negative is a
semi-hard one: the closest negative that is still farther from the anchor than the positive,
d(a,n) > d(a,p) (it violates the margin when d(a,n) < d(a,p) + alpha). When every negative is closer
than the positive, the farthest negative is used instead of the hardest: FaceNet reports that the
hardest negatives early in training lead to a collapsed model (this is also TensorFlow Addons'
rule). Distances are squared L2 on unit vectors.
"""

from __future__ import annotations

import math

import torch


def pairwise_sq_dist(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances between the rows of a and b (clamped at 0)."""
    b = a if b is None else b
    d = (a * a).sum(-1, keepdim=True) - 2.0 * a @ b.T + (b * b).sum(-1).unsqueeze(0)
    return d.clamp_min(0.0)


def semi_hard_triplets(emb: torch.Tensor, labels: torch.Tensor, margin: float) -> tuple[torch.Tensor, ...]:
    """(anchor, positive, negative) index tensors: every anchor-positive pair with its semi-hard negative
    (the closest negative with d(a,n) > d(a,p)); anchors without one take the farthest negative.
    `margin` is unused by the choice itself; it is kept for the call signature of the loss."""
    with torch.no_grad():
        d = pairwise_sq_dist(emb.detach().float())
        same = labels.unsqueeze(0) == labels.unsqueeze(1)
        n = len(labels)
        eye = torch.eye(n, dtype=torch.bool, device=emb.device)
        a_idx, p_idx = torch.nonzero(same & ~eye, as_tuple=True)
        if len(a_idx) == 0:
            empty = torch.empty(0, dtype=torch.long, device=emb.device)
            return empty, empty, empty
        d_ap = d[a_idx, p_idx].unsqueeze(1)  # (T, 1)
        d_an = d[a_idx]  # (T, n)
        neg = ~same[a_idx]  # (T, n)
        inf = torch.tensor(float("inf"), device=emb.device)
        beyond = neg & (d_an > d_ap)
        closest_beyond = torch.where(beyond, d_an, inf).argmin(1)
        farthest = torch.where(neg, d_an, -inf).argmax(1)
        choice = torch.where(beyond.any(1), closest_beyond, farthest)
        has_neg = neg.any(1)
        return a_idx[has_neg], p_idx[has_neg], choice[has_neg]


def triplet_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Mean of max(0, |a-p|^2 - |a-n|^2 + margin) over the mined triplets, and mining statistics."""
    a, p, n = semi_hard_triplets(emb, labels, margin)
    if len(a) == 0:
        return emb.sum() * 0.0, {"triplets": 0, "active": 0.0}
    d_ap = (emb[a] - emb[p]).pow(2).sum(-1)
    d_an = (emb[a] - emb[n]).pow(2).sum(-1)
    losses = (d_ap - d_an + margin).clamp_min(0.0)
    return losses.mean(), {"triplets": len(a), "active": float((losses > 0).float().mean())}


# ------------------------------------------------------------------------------- margin-based softmax losses
# NormFace (Wang et al. 2017): logits are s * cos(theta_j) between the unit embedding and unit class weights.
# CosFace (Wang et al. 2018) subtracts a margin m from the target class's cosine: s * (cos(theta_y) - m).
# ArcFace (Deng et al. 2019) adds m to the target angle: s * cos(theta_y + m). Past theta_y = pi - m, where
# cos(theta + m) stops decreasing in theta, ArcFace's paper switches to the CosFace-like penalty
# cos(theta_y) - m sin(m) so that the target logit stays monotonic (their "easy margin" off).
MARGIN_LOSSES = ("normface", "cosface", "arcface")
DEFAULT_MARGIN = {"normface": 0.0, "cosface": 0.35, "arcface": 0.5}


def margin_logits(emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, kind: str, scale: float,
                  margin: float) -> torch.Tensor:
    """Scaled cosine logits (N, C) of unit embeddings against class weights, with the target class's margin."""
    if kind not in MARGIN_LOSSES:
        raise ValueError(f"unknown margin loss {kind!r} (known: {', '.join(MARGIN_LOSSES)})")
    cos = torch.nn.functional.normalize(emb, dim=-1) @ torch.nn.functional.normalize(weight, dim=-1).T
    cos = cos.clamp(-1.0, 1.0)
    if kind == "normface" or margin == 0.0:
        return scale * cos
    rows = torch.arange(len(labels), device=emb.device)
    target = cos[rows, labels]
    if kind == "cosface":
        new_target = target - margin
    else:
        theta = torch.acos(target.clamp(-1.0 + 1e-7, 1.0 - 1e-7))
        new_target = torch.where(theta + margin <= math.pi, torch.cos(theta + margin),
                                 target - margin * math.sin(margin))
    out = cos.clone()
    out[rows, labels] = new_target.to(out.dtype)
    return scale * out


def margin_softmax_loss(emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, kind: str,
                        scale: float, margin: float) -> torch.Tensor:
    """Cross-entropy over `margin_logits`."""
    return torch.nn.functional.cross_entropy(margin_logits(emb, weight, labels, kind=kind, scale=scale,
                                                           margin=margin), labels)
