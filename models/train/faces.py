"""Train the face embedder with FaceNet's triplet loss and online semi-hard mining.

    python -m models.train.faces --data ../shared/data/lfw/images \
        --pairs ../shared/data/lfw/pairsDevTrain.txt --out runs/lfw-face-resnet

Faces are found with the service's own detector and cut with its own crop code (models.faces),
once, and cached. Validation is honest: every identity of the pair list with fewer than
--holdout-max-images images is held out of training, and the report's numbers come from the pairs
whose people were all held out (10-fold accuracy, ROC AUC, TAR at FAR 1e-2 and 1e-3, ROC PNG, the
calibrated threshold). Batches hold P identities x K images; the loss is the triplet loss on
semi-hard negatives, optionally plus a cosine-softmax identity loss (NormFace) that speeds up
training on small data. Every epoch writes a resumable checkpoint and a log line. At the end the
command writes the weights, an ONNX export (checked against PyTorch), the report and the manifest
entry, threshold included.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.faces.align import EyeFinder, crop_aligned
from models.faces.crop import CropSpec
from models.faces.detect import FaceBox, HaarDetector, HaarParams
from models.faces.evaluation import evaluate_pairs, plot_roc
from models.faces.lfw import HALVES, Pair, holdout_split, identity_images, read_pairs, split_by_identity
from models.faces.losses import DEFAULT_MARGIN, MARGIN_LOSSES, margin_softmax_loss, triplet_loss
from models.faces.net import FaceEmbedder
from models.train.common import atomic_save, hardware_description, progress, save_weights, sha256_file, start_run
from models.train.images import install_entry, lr_at

CONTEXT = 1.125  # training crops carry this much extra context for random shifts


def central_face(boxes: list[FaceBox], width: int, height: int) -> FaceBox | None:
    """The detection whose centre is nearest the image centre (LFW centres the labelled person)."""
    if not boxes:
        return None
    cx, cy = width / 2.0, height / 2.0
    return min(boxes, key=lambda b: (b.x + b.w / 2 - cx) ** 2 + (b.y + b.h / 2 - cy) ** 2)


def fallback_box(width: int, height: int) -> FaceBox:
    """A centred box of 45% of the shorter side, used when the detector finds nothing in an LFW image
    (the median Haar box on the 250x250 LFW images is about 110 pixels)."""
    side = round(0.45 * min(width, height))
    return FaceBox((width - side) // 2, (height - side) // 2, side, side, 0.0)


def prepare_crops(files: list[Path], crop: CropSpec, detector: HaarDetector, cache: Path | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detect (and, with crop.align == 'eyes', align) and crop every file once: (N, S, S, 3) uint8 crops with
    CONTEXT around the serving crop, a boolean array telling which crops came from a detection (not the
    fallback box), and one telling which were rotated level on a pair of eyes."""
    side = round(crop.size * CONTEXT)
    key = hashlib.sha256(("\n".join(map(str, files)) + f"|{crop}|{detector.params}|{side}").encode()).hexdigest()[:16]
    cached = cache / f"faces-{key}.npz" if cache else None
    if cached is not None and cached.exists():
        z = np.load(cached)
        return z["crops"], z["detected"], z["aligned"]
    eyes = EyeFinder() if crop.align == "eyes" else None
    crops = np.empty((len(files), side, side, 3), dtype=np.uint8)
    detected = np.zeros(len(files), dtype=bool)
    aligned = np.zeros(len(files), dtype=bool)
    for i, f in enumerate(progress(files, desc="detect+crop", unit="img")):
        with Image.open(f) as im:
            img = im.convert("RGB")
        box = central_face(detector.detect(img), img.width, img.height)
        detected[i] = box is not None
        found = eyes.find(img, box) if eyes is not None and box is not None else None
        aligned[i] = found is not None
        crops[i] = np.asarray(crop_aligned(img, box or fallback_box(img.width, img.height), crop,
                                           found.angle if found else 0.0, context=CONTEXT, size=side))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp.npz")
        np.savez(tmp, crops=crops, detected=detected, aligned=aligned)
        os.replace(tmp, cached)
    return crops, detected, aligned


def center(batch_u8: torch.Tensor, size: int) -> torch.Tensor:
    """The serving crop: the centre size x size window of NCHW crops made with CONTEXT."""
    off = (batch_u8.shape[-1] - size) // 2
    return batch_u8[..., off:off + size, off:off + size]


def rotate_batch(x: torch.Tensor, max_degrees: float, gen: torch.Generator) -> torch.Tensor:
    """Each image of an NCHW float batch rotated about its centre by a uniform random angle in
    [-max_degrees, max_degrees] (bilinear; corners that come from outside take the border's values)."""
    n = x.shape[0]
    t = (torch.rand(n, generator=gen) * 2.0 - 1.0) * np.radians(max_degrees)
    cos, sin = torch.cos(t), torch.sin(t)
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment(batch_u8: torch.Tensor, size: int, gen: torch.Generator, rotate: float = 0.0) -> torch.Tensor:
    """Random shift (a random size x size window of the context crop), horizontal flip, and brightness /
    contrast jitter, on an NCHW uint8 batch, then (rotate > 0) a random in-plane rotation of up to `rotate`
    degrees; returns float in [0, 1]."""
    n, _, s, _ = batch_u8.shape
    xs = torch.randint(0, s - size + 1, (n,), generator=gen).tolist()
    ys = torch.randint(0, s - size + 1, (n,), generator=gen).tolist()
    flips = (torch.rand(n, generator=gen) < 0.5).tolist()
    out = torch.empty((n, 3, size, size))
    for i in range(n):
        c = batch_u8[i, :, ys[i]:ys[i] + size, xs[i]:xs[i] + size].float()
        out[i] = c.flip(-1) if flips[i] else c
    out /= 255.0
    bright = 1.0 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.4
    contrast = 1.0 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.4
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - mean) * contrast + mean * bright).clamp_(0.0, 1.0)
    return rotate_batch(out, rotate, gen) if rotate > 0 else out


def normalise(x01: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x01 - m) / s


@torch.no_grad()
def embed_all(model: torch.nn.Module, crops_u8: torch.Tensor, size: int, mean: tuple[float, ...],
              std: tuple[float, ...], device: torch.device, flip: bool = True, batch: int = 256) -> torch.Tensor:
    """Unit embeddings of serving crops (the average with the mirror image, renormalised, when flip)."""
    model.eval()
    outs = []
    for i in range(0, len(crops_u8), batch):
        x = normalise(center(crops_u8[i:i + batch], size).float() / 255.0, mean, std).to(device)
        e = model(x)
        if flip:
            e = F.normalize(e + model(x.flip(-1)), dim=-1)
        outs.append(e.float().cpu())
    return torch.cat(outs)


def pair_distances(emb: torch.Tensor, index: dict[Path, int], pairs: list[Pair]) -> tuple[np.ndarray, np.ndarray]:
    """Squared L2 distances and same/different labels of pairs."""
    a = emb[[index[p.a] for p in pairs]]
    b = emb[[index[p.b] for p in pairs]]
    return (a - b).pow(2).sum(-1).numpy(), np.array([p.same for p in pairs])


class PKSampler:
    """Batches of P identities x K images (drawn without replacement when an identity has K or more), plus
    `singles` images of distinct one-image identities. Without singles, the identities with one image never
    appear in a batch; with them, each is a class of the identity softmax and a negative for the triplets
    (it has no positive), which multiplies the people the embedder learns to tell apart (LFW: 566 identities
    with two or more training images, 2,337 with one). The singles are visited in shuffled passes."""

    def __init__(self, labels: np.ndarray, p: int, k: int, seed: int, singles: int = 0) -> None:
        groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        self.by_id = [ix for ix in groups if len(ix) >= 2]
        self.single_ix = np.array([ix[0] for ix in groups if len(ix) == 1], dtype=np.int64)
        if len(self.by_id) < p:
            raise SystemExit(f"need at least {p} identities with two or more images, have {len(self.by_id)}")
        if singles < 0 or singles > len(self.single_ix):
            raise SystemExit(f"--singles must be between 0 and the {len(self.single_ix)} one-image identities, "
                             f"got {singles}")
        self.p, self.k, self.singles = p, k, singles
        self.rng = np.random.default_rng(seed)
        self._order = np.empty(0, dtype=np.int64)

    def batch(self) -> np.ndarray:
        ids = self.rng.choice(len(self.by_id), self.p, replace=False)
        out = []
        for i in ids:
            ix = self.by_id[i]
            out.append(self.rng.choice(ix, self.k, replace=len(ix) < self.k))
        if self.singles:
            if len(self._order) < self.singles:  # a new shuffled pass, never repeating an image within a batch
                rest = self._order
                fresh = self.rng.permutation(self.single_ix)
                fresh = np.concatenate([fresh[~np.isin(fresh, rest)], fresh[np.isin(fresh, rest)]])
                self._order = np.concatenate([rest, fresh])
            out.append(self._order[:self.singles])
            self._order = self._order[self.singles:]
        return np.concatenate(out)


class UniformSampler:
    """Batches that visit every training image once per pass (shuffled), identities with one image included:
    the sampler for a margin softmax, where every identity is a class."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < batch_size:
            raise SystemExit(f"need at least {batch_size} training images, have {n}")
        self.n, self.batch_size = n, batch_size
        self.rng = np.random.default_rng(seed)
        self._order = np.empty(0, dtype=np.int64)

    def batch(self) -> np.ndarray:
        if len(self._order) < self.batch_size:
            self._order = np.concatenate([self._order, self.rng.permutation(self.n)])
        out, self._order = self._order[:self.batch_size], self._order[self.batch_size:]
        return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="LFW-style root: one folder of images per identity")
    p.add_argument("--pairs", type=Path, required=True, help="LFW pair list used for validation")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", default="lfw-face-resnet")
    p.add_argument("--holdout-max-images", type=int, default=5,
                   help="hold out of training every pair-list identity with fewer images than this")
    p.add_argument("--size", type=int, default=64, help="embedder input side")
    p.add_argument("--margin", type=float, default=0.1, help="crop margin around the detector box (fraction)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--widths", default="32,64,96,128")
    p.add_argument("--blocks", default="1,2,2,1")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--steps-per-epoch", type=int, default=0, help="0: training images / batch size")
    p.add_argument("--p", type=int, default=32, help="identities per batch")
    p.add_argument("--k", type=int, default=4, help="images per identity in a batch")
    p.add_argument("--singles", type=int, default=0,
                   help="pk sampler: add this many one-image identities to every batch (0 = none, as before)")
    p.add_argument("--alpha", type=float, default=0.2, help="triplet margin on squared L2 distances")
    p.add_argument("--softmax-weight", type=float, default=1.0,
                   help="weight of the cosine-softmax identity loss (0 = pure triplet)")
    p.add_argument("--softmax-scale", type=float, default=16.0)
    p.add_argument("--loss", choices=MARGIN_LOSSES, default="normface",
                   help="the identity loss: normface (no margin), cosface (cos - m) or arcface (cos(theta + m))")
    p.add_argument("--softmax-margin", type=float, default=None,
                   help="margin m of cosface/arcface (default 0.35 / 0.5)")
    p.add_argument("--triplet-weight", type=float, default=1.0, help="weight of the triplet loss (0 = off)")
    p.add_argument("--sampler", choices=("pk", "uniform"), default="pk",
                   help="pk: P identities x K images (for the triplet loss); uniform: every training image once a pass")
    p.add_argument("--align", choices=("none", "eyes"), default="none",
                   help="eyes: rotate each face so the eye line is level (eye cascade), in training and serving")
    p.add_argument("--rotate", type=float, default=0.0, help="random rotation augmentation, degrees (0 = off)")
    p.add_argument("--val-half", choices=("all", *HALVES), default="all",
                   help="validate on the held-out pairs of one identity half only (models.faces.lfw."
                        "split_by_identity); 'calibration' keeps the test half unseen until the served evaluation")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--warmup", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path(".cache/datasets"))
    p.add_argument("--limit-identities", type=int, default=0, help="use at most N training identities (smoke runs)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    p.add_argument("--install", type=Path, default=None, help="copy weights + merge the manifest entry into this dir")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.time()
    device = start_run(args.threads, args.device, args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    crop = CropSpec(size=args.size, margin=args.margin, align=args.align)
    detector = HaarDetector(HaarParams())
    if args.softmax_margin is None:
        args.softmax_margin = DEFAULT_MARGIN[args.loss]

    images = identity_images(args.data)
    all_pairs = read_pairs(args.pairs, args.data)
    held, val_pairs = holdout_split(images, all_pairs, args.holdout_max_images)
    if args.val_half != "all":
        val_pairs = split_by_identity(val_pairs).pairs[args.val_half]
    train_ids = [p for p in images if p not in held]
    if args.limit_identities:
        multi = [p for p in train_ids if len(images[p]) >= 2][: args.limit_identities]
        train_ids = multi
    train_files = [f for p in train_ids for f in images[p]]
    train_labels = np.array([i for i, p in enumerate(train_ids) for _ in images[p]])
    val_files = sorted({f for pr in val_pairs for f in (pr.a, pr.b)})
    all_pair_files = sorted({f for pr in all_pairs for f in (pr.a, pr.b)})
    print(f"{len(train_ids)} training identities ({len(train_files)} images); {len(held)} held out; "
          f"{len(val_pairs)} of {len(all_pairs)} pairs entirely held out", file=sys.stderr)

    every = sorted(set(train_files) | set(all_pair_files))
    pos = {f: i for i, f in enumerate(every)}
    crops_u8, detected, aligned = prepare_crops(every, crop, detector, args.cache)  # one detection pass for all
    x_every = torch.from_numpy(crops_u8).permute(0, 3, 1, 2)
    x_train = x_every[[pos[f] for f in train_files]].contiguous()
    x_val = x_every[[pos[f] for f in val_files]].contiguous()
    train_det = detected[[pos[f] for f in train_files]]
    train_aligned = aligned[[pos[f] for f in train_files]]
    val_det = detected[[pos[f] for f in val_files]]
    val_index = {f: i for i, f in enumerate(val_files)}
    centred = center(x_train, args.size).float() / 255.0
    mean = tuple(float(v) for v in centred.mean(dim=(0, 2, 3)))
    std = tuple(float(v) for v in centred.std(dim=(0, 2, 3)))
    del centred

    widths = tuple(int(v) for v in args.widths.split(","))
    blocks = tuple(int(v) for v in args.blocks.split(","))
    arch = {"size": args.size, "dim": args.dim, "widths": list(widths), "blocks": list(blocks)}
    model = FaceEmbedder(args.size, args.dim, widths, blocks).to(device)
    n_classes = int(train_labels.max()) + 1
    classifier = torch.nn.Parameter(torch.randn(n_classes, args.dim, device=device) * 0.01)
    params = [{"params": [p for p in model.parameters() if p.dim() > 1] + [classifier],
               "weight_decay": args.weight_decay},
              {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0}]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=True)
    batch_size = args.p * args.k
    steps = args.steps_per_epoch or max(1, len(train_files) // batch_size)
    total = steps * args.epochs
    if args.singles and args.sampler != "pk":
        raise SystemExit("--singles works with --sampler pk only")
    sampler: PKSampler | UniformSampler = (PKSampler(train_labels, args.p, args.k, args.seed, args.singles)
                                           if args.sampler == "pk"
                                           else UniformSampler(len(train_labels), batch_size, args.seed))
    start_epoch, history, train_seconds = 0, [], 0.0
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        classifier.data.copy_(ck["classifier"])
        opt.load_state_dict(ck["optimizer"])
        sampler.rng.bit_generator.state = ck["sampler"]
        if isinstance(sampler, UniformSampler) or args.singles:
            sampler._order = np.asarray(ck.get("sampler_order", []), dtype=np.int64)
        start_epoch, history, train_seconds = ck["epoch"], ck["history"], ck["train_seconds"]
        print(f"resumed from {ckpt_path} at epoch {start_epoch}", file=sys.stderr)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.name}: {n_params:,} parameters, {steps} steps/epoch of {args.p}x{args.k}"
          f"{f' + {args.singles} singles' if args.singles else ''} on {device}",
          file=sys.stderr)

    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        model.train()
        gen = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        sums = {"loss": 0.0, "triplet": 0.0, "softmax": 0.0, "active": 0.0}
        bar = progress(range(steps), desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch")
        for b in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch * steps + b, total, args.lr, args.warmup)
            idx = torch.from_numpy(sampler.batch())
            xb = normalise(augment(x_train[idx], args.size, gen, args.rotate), mean, std).to(device)
            yb = torch.from_numpy(train_labels[idx.numpy()]).to(device)
            emb = model(xb)
            t_loss, stats = triplet_loss(emb, yb, args.alpha) if args.triplet_weight > 0 else (
                torch.zeros((), device=device), {"active": 0.0})
            loss = args.triplet_weight * t_loss
            s_loss = torch.zeros((), device=device)
            if args.softmax_weight > 0:
                s_loss = margin_softmax_loss(emb, classifier, yb, kind=args.loss, scale=args.softmax_scale,
                                             margin=args.softmax_margin)
                loss = loss + args.softmax_weight * s_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums["loss"] += float(loss.detach())
            sums["triplet"] += float(t_loss.detach())
            sums["softmax"] += float(s_loss.detach())
            sums["active"] += stats["active"]
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{sums['loss'] / (b + 1):.3f}", active=f"{sums['active'] / (b + 1):.2f}")
        emb_val = embed_all(model, x_val, args.size, mean, std, device)
        dist, same = pair_distances(emb_val, val_index, val_pairs)
        rep = evaluate_pairs(dist, same)
        train_seconds += time.time() - t0
        rec = {"epoch": epoch + 1, **{k: v / steps for k, v in sums.items()},
               "val_kfold_accuracy": rep.kfold["mean"], "val_auc": rep.auc, "val_threshold": rep.threshold,
               "lr_end": opt.param_groups[0]["lr"], "seconds": time.time() - t0}
        history.append(rec)
        with open(out / "log.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), file=sys.stderr)
        atomic_save({"model": model.state_dict(), "classifier": classifier.detach(), "optimizer": opt.state_dict(),
                     "sampler": sampler.rng.bit_generator.state,
                     "sampler_order": getattr(sampler, "_order", None), "epoch": epoch + 1, "history": history,
                     "train_seconds": train_seconds}, ckpt_path)

    return finish(args, model, arch, crop, mean, std, device, history, train_seconds, t_start, n_params,
                  train=(train_ids, train_files, train_det, train_aligned),
                  val=(val_files, val_pairs, val_det, x_val, val_index),
                  all_pairs=all_pairs, x_pairs=(x_every, pos))


def loss_description(args: argparse.Namespace) -> str:
    """The training loss in words, e.g. '1 x cosface (s 30, m 0.35)'."""
    parts = []
    if args.triplet_weight > 0:
        parts.append(f"{args.triplet_weight:g} x triplet, semi-hard")
    if args.softmax_weight > 0:
        parts.append(f"{args.softmax_weight:g} x {args.loss} (s {args.softmax_scale:g}, m {args.softmax_margin:g})")
    return " + ".join(parts)


def export_onnx(model: FaceEmbedder, path: Path, size: int) -> None:
    """Export the embedder (unit embeddings out) to ONNX with a dynamic batch axis."""
    import warnings

    model = model.cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path), dynamo=False, input_names=["input"],
                          output_names=["embedding"], dynamic_axes={"input": {0: "n"}, "embedding": {0: "n"}},
                          opset_version=17)


def onnx_parity(model: FaceEmbedder, path: Path, x: torch.Tensor) -> dict[str, float]:
    """Cosine similarity between PyTorch and onnxruntime embeddings of the same inputs."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model.cpu().eval()(x)
    got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    cos = F.cosine_similarity(ref, got, dim=-1)
    return {"inputs": len(x), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}


def finish(args: argparse.Namespace, model: FaceEmbedder, arch: dict[str, Any], crop: CropSpec,
           mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, history: list[dict[str, Any]],
           train_seconds: float, t_start: float, n_params: int, *, train: tuple, val: tuple,
           all_pairs: list[Pair], x_pairs: tuple[torch.Tensor, dict[Path, int]]) -> dict[str, Any]:
    """Weights, ONNX export, report (JSON, Markdown, ROC PNG) and the manifest entry."""
    out: Path = args.out
    train_ids, train_files, train_det, train_aligned = train
    val_files, val_pairs, val_det, x_val, val_index = val
    emb_val = embed_all(model, x_val, args.size, mean, std, device)
    dist, same = pair_distances(emb_val, val_index, val_pairs)
    rep = evaluate_pairs(dist, same)
    plot_roc(dist, same, out / "roc.png", f"{args.name}: {len(val_pairs)} held-out pairs of {args.pairs.name}")
    # the whole list, for comparison only: some of its identities were trained on
    x_every, all_index = x_pairs
    emb_all = embed_all(model, x_every, args.size, mean, std, device)
    d_all, s_all = pair_distances(emb_all, all_index, all_pairs)
    rep_all = evaluate_pairs(d_all, s_all)
    same_d, diff_d = dist[same], dist[~same]

    weights_file = out / f"{args.name}.pt"
    digest = save_weights(model, weights_file)
    onnx_info: dict[str, Any] = {}
    if not args.no_onnx:
        onnx_file = out / f"{args.name}.onnx"
        export_onnx(model, onnx_file, args.size)
        x = normalise(center(x_val[:64], args.size).float() / 255.0, mean, std)
        onnx_info = {"file": onnx_file.name, "sha256": sha256_file(onnx_file), **onnx_parity(model, onnx_file, x)}
        model.to(device)

    report = {
        "model": args.name, "validation": rep.to_dict(), "all_pairs_for_comparison": rep_all.to_dict(),
        "distance_stats": {"same_mean": float(same_d.mean()), "same_std": float(same_d.std()),
                           "different_mean": float(diff_d.mean()), "different_std": float(diff_d.std())},
        "train_identities": len(train_ids), "train_images": len(train_files),
        "train_detected_fraction": float(train_det.mean()), "train_aligned_fraction": float(train_aligned.mean()),
        "val_images": len(val_files), "val_half": args.val_half,
        "val_detected_fraction": float(val_det.mean()), "held_out_pairs": len(val_pairs),
        "epochs": len(history), "train_seconds": round(train_seconds, 1), "parameters": n_params,
        "wall_seconds_this_run": round(time.time() - t_start, 1), "hardware": hardware_description(device),
        "torch": torch.__version__, "python": platform.python_version(), "onnx": onnx_info, "history": history,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    k = rep.kfold
    md = [f"# {args.name} training report", "",
          f"- validation: {len(val_pairs)} pairs of {args.pairs.name} ({rep.same} same, {rep.pairs - rep.same} "
          f"different) whose people were all held out of training",
          f"- 10-fold accuracy: **{k['mean']:.4f} ± {k['std']:.4f}**; ROC AUC {rep.auc:.4f}",
          f"- calibrated threshold (squared L2, best accuracy on the validation pairs): {rep.threshold:.4f} "
          f"(accuracy {rep.accuracy_at_threshold:.4f})",
          *[f"- TAR at FAR {t['far_target']:g}: {t['tar']:.4f} (threshold {t['threshold']:.4f})"
            for t in rep.tar_at_far],
          f"- all {rep_all.pairs} pairs, for comparison only (includes identities trained on): 10-fold "
          f"{rep_all.kfold['mean']:.4f}, AUC {rep_all.auc:.4f}",
          f"- training: {len(train_ids)} identities, {len(train_files)} images, {len(history)} epochs, "
          f"{train_seconds / 60:.1f} min on {report['hardware']}",
          f"- Haar detections: {train_det.mean():.1%} of training images, {val_det.mean():.1%} of validation "
          f"images (the rest used the centred fallback box)"]
    if onnx_info:
        md.append(f"- ONNX export: min cosine to PyTorch {onnx_info['min_cosine']:.6f} "
                  f"over {onnx_info['inputs']} faces")
    (out / "report.md").write_text("\n".join(md) + "\n")

    entry = {
        "name": args.name, "task": "face-embedding", "family": "face-resnet", "arch": arch,
        "file": weights_file.name, "sha256": digest, "source": "project",
        "preprocessing": {"resize": args.size, "crop": args.size, "mean": list(mean), "std": list(std)},
        "face_crop": {"size": crop.size, "margin": crop.margin, **({"align": crop.align} if crop.align != "none"
                                                                   else {})},
        "embedding": {"dim": args.dim, "normalised": True, "flip_average": True},
        "threshold": round(rep.threshold, 4),
        "training": {"data": str(args.data), "identities": len(train_ids), "images": len(train_files),
                     "held_out": f"identities of {args.pairs.name} with fewer than {args.holdout_max_images} images",
                     "recipe": {"epochs": args.epochs, "steps_per_epoch": len(history) and
                                (args.steps_per_epoch or max(1, len(train_files) // (args.p * args.k))),
                                "batch": (f"{args.p} identities x {args.k} images"
                                          + (f" + {args.singles} one-image identities" if args.singles else "")
                                          if args.sampler == "pk" else
                                          f"{args.p * args.k} images, every training image once a pass"),
                                "loss": loss_description(args),
                                "align": args.align, "rotate_degrees": args.rotate, "validated_on": args.val_half,
                                "alpha": args.alpha, "softmax_weight": args.softmax_weight,
                                "softmax_scale": args.softmax_scale, "optimizer": "SGD nesterov", "lr": args.lr,
                                "warmup": args.warmup, "schedule": "linear warm-up + cosine",
                                "weight_decay": args.weight_decay,
                                "augmentation": "random shift within 12.5% context, h-flip, brightness/contrast"
                                                + (f", rotation up to {args.rotate:g} degrees" if args.rotate else ""),
                                "seed": args.seed}},
        "metrics": {"val_pairs": len(val_pairs), "val_kfold_accuracy": round(k["mean"], 4),
                    "val_kfold_std": round(k["std"], 4), "val_roc_auc": round(rep.auc, 4),
                    **{f"tar_at_far_{t['far_target']:g}": round(t["tar"], 4) for t in rep.tar_at_far}},
    }
    if onnx_info:
        entry["onnx"] = {"file": onnx_info["file"], "sha256": onnx_info["sha256"],
                         "min_cosine_to_pytorch": round(onnx_info["min_cosine"], 6)}
    (out / "manifest_entry.json").write_text(json.dumps(entry, indent=2))
    if args.install:
        install(out, args.install)
    print((out / "report.md").read_text())
    return report


def install(run_dir: Path, weights_dir: Path) -> None:
    """Copy a finished run's weights (and its ONNX export, as `<name>-onnx`) into a weights dir and merge their
    manifest entries, keeping hand-written fields (card, licence) of earlier entries."""
    entry = json.loads((run_dir / "manifest_entry.json").read_text())
    install_entry(entry, run_dir / entry["file"], weights_dir)
    onnx = entry.get("onnx")
    if onnx:
        onnx_entry = {k: v for k, v in entry.items() if k not in ("arch", "onnx")}
        onnx_entry |= {"name": f"{entry['name']}-onnx", "family": "onnx", "file": onnx["file"],
                       "sha256": onnx["sha256"], "exported_from": {"name": entry["name"], "sha256": entry["sha256"],
                                                                   "min_cosine": onnx["min_cosine_to_pytorch"]}}
        install_entry(onnx_entry, run_dir / onnx["file"], weights_dir)


if __name__ == "__main__":
    main()
