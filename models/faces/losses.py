"""FaceNet's triplet loss with online semi-hard negative mining (Schroff et al. 2015, section 3.1-3.2).

For every anchor-positive pair in a batch (all pairs of the same identity), the negative is a
semi-hard one: the closest negative that is still farther from the anchor than the positive,
d(a,n) > d(a,p) (it violates the margin when d(a,n) < d(a,p) + alpha). When every negative is closer
than the positive, the farthest negative is used instead of the hardest: FaceNet reports that the
hardest negatives early in training lead to a collapsed model (this is also TensorFlow Addons'
rule). Distances are squared L2 on unit vectors.
"""

from __future__ import annotations

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
