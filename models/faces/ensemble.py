"""An ensemble of face embedders that share one face crop: each member embeds the crop (and, with flip
averaging, its mirror image; the sum renormalised), and the ensemble's embedding is the members' unit vectors
concatenated and divided by sqrt(members). That is again a unit vector, and its squared L2 distance to another
ensemble embedding is the mean of the members' squared distances, so thresholds and FAISS inner-product search
work unchanged.

One input batch feeds every member: the batch is normalised with the ensemble's own mean and std (the
manifest's preprocessing), and each member gets it re-normalised for its own training statistics through a
fixed per-channel affine map (identity when they agree). Flip averaging happens inside, per member, so the
ensemble's manifest says `flip_average: false` (the service must not flip a second time).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.faces.net import FaceEmbedder, build_embedder


class FaceEnsemble(nn.Module):
    """(N, 3, S, S) crops normalised with (mean, std) -> (N, sum of member dims) unit vectors."""

    def __init__(self, members: Sequence[FaceEmbedder], mean: Sequence[float], std: Sequence[float],
                 member_stats: Sequence[tuple[Sequence[float], Sequence[float]]], flip_average: bool = True) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError("a face ensemble needs at least two members")
        if len(member_stats) != len(members):
            raise ValueError("one (mean, std) per member")
        sizes = {m.size for m in members}
        if len(sizes) != 1:
            raise ValueError(f"members take different input sizes {sorted(sizes)}; one crop feeds all")
        self.size = sizes.pop()
        self.members = nn.ModuleList(members)
        self.flip_average = flip_average
        self.dim = sum(m.dim for m in members)
        e_mean, e_std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        scales, shifts = [], []
        for m_mean, m_std in member_stats:
            mm, ms = torch.tensor(m_mean, dtype=torch.float32), torch.tensor(m_std, dtype=torch.float32)
            # x_member = (x01 - mm) / ms with x01 = x * e_std + e_mean
            scales.append(e_std / ms)
            shifts.append((e_mean - mm) / ms)
        # (members, 3): 2-D, so that moving the model to channels_last leaves them alone
        self.register_buffer("scale", torch.stack(scales), persistent=False)
        self.register_buffer("shift", torch.stack(shifts), persistent=False)
        # members trained with the ensemble's own statistics (the usual case) skip the re-normalisation
        self.renormalise = [not (torch.allclose(a, torch.ones(3)) and torch.allclose(b, torch.zeros(3)))
                            for a, b in zip(scales, shifts, strict=True)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.flip_average:
            x = torch.cat([x, x.flip(-1)])  # one forward per member for the crops and their mirrors
        parts = []
        scale, shift = self.get_buffer("scale"), self.get_buffer("shift")
        for i, m in enumerate(self.members):
            xi = x * scale[i].view(1, 3, 1, 1) + shift[i].view(1, 3, 1, 1) if self.renormalise[i] else x
            e = m(xi)
            if self.flip_average:
                e = F.normalize(e[:n] + e[n:], dim=-1)
            parts.append(e)
        return torch.cat(parts, dim=-1) / math.sqrt(len(parts))


def build_face_ensemble(arch: Mapping[str, Any]) -> FaceEnsemble:
    """A FaceEnsemble from its manifest `arch`: members (each {arch, mean, std}), mean, std (the ensemble's input
    normalisation, equal to its manifest preprocessing) and flip_average."""
    known = {"members", "mean", "std", "flip_average"}
    unknown = set(arch) - known
    if unknown:
        raise ValueError(f"unknown face ensemble arch keys {sorted(unknown)}")
    members = arch.get("members")
    if not isinstance(members, list) or len(members) < 2:
        raise ValueError("a face ensemble arch needs a list of at least two members")
    nets, stats = [], []
    for i, m in enumerate(members):
        if not isinstance(m, Mapping) or set(m) != {"arch", "mean", "std"}:
            raise ValueError(f"face ensemble member {i} needs exactly 'arch', 'mean' and 'std'")
        nets.append(build_embedder(dict(m["arch"])))
        stats.append((m["mean"], m["std"]))
    for key in ("mean", "std"):
        if len(arch.get(key) or ()) != 3:
            raise ValueError(f"a face ensemble arch needs its input '{key}' (3 values)")
    return FaceEnsemble(nets, arch["mean"], arch["std"], stats, bool(arch.get("flip_average", True)))
