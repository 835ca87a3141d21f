"""Open-set face identification (1:N) through the API, on held-out LFW people: closed-set rank-1 / rank-5, FNIR at
FPIR 1% and 10%, and how often strangers are identified as someone at the served identification threshold and at the
1:1 verification threshold, for several gallery sizes; plus the 1:1 metrics (TAR at FAR) on the same photos.

People: the TEST half of the held-out identities (models.faces.lfw.split_by_identity on the people of
pairsDevTrain.txt with fewer than --holdout-max-images images: never trained on, never used by the identification
calibration, which uses the other half). Every person gets an opaque subject id.

- mated: the people with two or more photos. Their first photo with a face (as /faces/embed finds it) is enrolled
  through POST /faces/enroll, the next photo is the mated probe (POST /faces/identify; a probe without a face is a
  failed search, as a client would see it);
- strangers and fillers: the people with one photo, divided by a salted hash of their name. Strangers are never
  enrolled and only searched; fillers are enrolled (first photo) to make galleries larger than the mated people
  alone, and are never searched;
- gallery sizes (nested, enrolled in this order): the first N mated people (hash order) when N is at most their
  number, else every mated person plus the first fillers; 'all' = every mated person and every filler.

At each size every mated probe of the gallery and every stranger is searched once (top_k 5, largest face). The
served threshold is whatever the server reports (`threshold`, `threshold_source`, `fpir`, `gallery_size`); decisions
at other thresholds (the server's FPIR 10% threshold, asked for with one `fpir=0.1` request, and the model's 1:1
verification threshold from GET /models) are read from the returned nearest distances, exactly as the server
decides (distance <= threshold). FNIR at a measured FPIR uses the threshold that lets through floor(FPIR x strangers)
strangers (its resolution is one stranger). The 1:1 metrics use the embeddings POST /faces/embed returns for the same
photos: genuine pairs = each mated person's enrolled photo and probe, impostor pairs = every two photos of different
people.

    .venv/bin/python -m bench.faces_identification                         # starts a server on a free port
    .venv/bin/python -m bench.faces_identification --http http://127.0.0.1:8000   # a running server, empty gallery
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.classify_load import (
    PROJECT_ROOT,
    Server,
    _json_safe,
    ensure_loopback,
    fmt,
    machine_description,
    machine_lines,
)
from models.faces.evaluation import auc, roc_curve, tar_at_far
from models.faces.identification import (
    MatedSearch,
    fnir_at,
    fnir_at_fpir,
    fpir_at,
    rank_rate,
)
from models.faces.lfw import holdout_split, identity_images, read_pairs, split_by_identity

SALT = "faces-identification-bench/v1"
TOP_K = 5


def _key(name: str) -> str:
    return hashlib.sha256(f"{SALT}\0{name}".encode()).hexdigest()


@dataclass
class Person:
    """One test-half identity: its photos, its subject id, its role and the photos chosen for it."""

    name: str
    photos: list[Path]
    subject: str
    role: str = ""  # mated, filler, stranger, unusable
    enrolled: Path | None = None
    probe: Path | None = None
    extra: list[Path] = field(default_factory=list)  # further enrolled photos (--enroll-photos > 1)
    embeddings: dict[Path, np.ndarray | None] = field(default_factory=dict)


def select_people(data: Path, pairs_file: Path, holdout_max_images: int) -> tuple[list[Person], dict[str, Any]]:
    """The test half of the held-out identities, in hash order, with their roles (before any photo is looked at)."""
    images = identity_images(data)
    _, held = holdout_split(images, read_pairs(pairs_file, data), holdout_max_images)
    split = split_by_identity(held)
    names = sorted(split.identities["test"], key=_key)
    people = [Person(n, images.get(n, []), f"p{i:04d}") for i, n in enumerate(names)]
    for p in people:
        if len(p.photos) >= 2:
            p.role = "mated"
        elif len(p.photos) == 1:
            p.role = "stranger" if int(_key("role\0" + p.name)[0], 16) % 2 == 0 else "filler"
        else:
            p.role = "unusable"
    return people, split.summary()


# --------------------------------------------------------------------------------------------- API calls

def _file(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "image/jpeg")


def embed_all(c: httpx.Client, photos: list[Path], batch: int = 8) -> dict[Path, np.ndarray | None]:
    """The largest face's embedding of each photo through POST /faces/embed (None: no face found)."""
    out: dict[Path, np.ndarray | None] = {}
    for i in range(0, len(photos), batch):
        chunk = photos[i:i + batch]
        r = c.post("/faces/embed", files=[("image", _file(p)) for p in chunk], data={"max_faces": "1"})
        r.raise_for_status()
        for p, res in zip(chunk, r.json()["results"], strict=True):
            faces = res["faces"]
            out[p] = np.asarray(faces[0]["embedding"], dtype=np.float64) if faces else None
    return out


def enroll(c: httpx.Client, person: Person) -> None:
    assert person.enrolled is not None
    files = [("image", _file(x)) for x in (person.enrolled, *person.extra)]
    r = c.post("/faces/enroll", data={"subject": person.subject}, files=files)
    if r.status_code != 201:
        raise RuntimeError(f"enrolling {person.name} ({person.enrolled.name}): {r.status_code} {r.text[:300]}")


def identify(c: httpx.Client, photo: Path, **extra: str) -> dict[str, Any] | None:
    """The identify response for a photo's largest face; None when the server finds no face (422)."""
    r = c.post("/faces/identify", data={"top_k": str(TOP_K), "max_faces": "1", **extra},
               files=[("image", _file(photo))])
    if r.status_code == 422 and "no face found" in r.text:
        return None
    r.raise_for_status()
    return dict(r.json())


# --------------------------------------------------------------------------------------------- one gallery size

def _rate(k: int, n: int) -> dict[str, Any]:
    """A count, its denominator, the rate and its 95% Wilson interval."""
    if not n:
        return {"count": k, "of": n, "rate": None, "wilson95": None}
    z, p = 1.959964, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"count": k, "of": n, "rate": p, "wilson95": [max(0.0, centre - half), min(1.0, centre + half)]}


def measure_size(c: httpx.Client, label: str, gallery: list[Person], mated: list[Person], strangers: list[Person],
                 verification_tau: float) -> dict[str, Any]:
    """Search every mated probe of the gallery and every stranger once; the 1:N metrics at this size."""
    t0 = time.perf_counter()
    searches: list[MatedSearch] = []
    served_hits = 0
    served: dict[str, Any] | None = None
    disagreements = 0
    for p in mated:
        assert p.probe is not None
        body = identify(c, p.probe)
        if body is None:
            searches.append(MatedSearch(None, None))
            continue
        served = served or body
        face = body["faces"][0]
        subjects = [h["subject"] for h in face["candidates"]]
        rank = subjects.index(p.subject) + 1 if p.subject in subjects else None
        searches.append(MatedSearch(rank, face["distance"]))
        served_hits += face["subject"] == p.subject
        disagreements += (face["subject"] is not None) != (face["distance"] <= body["threshold"])
    stranger_top1: list[float | None] = []
    stranger_accepts = 0
    for p in strangers:
        body = identify(c, p.photos[0])
        if body is None:
            stranger_top1.append(None)
            continue
        served = served or body
        face = body["faces"][0]
        stranger_top1.append(face["distance"])
        stranger_accepts += face["subject"] is not None
        disagreements += (face["subject"] is not None) != (face["distance"] <= body["threshold"])
    assert served is not None, "no search found a face"
    threshold = float(served["threshold"])
    assert gallery[0].enrolled is not None  # a photo with a face: one request for the server's FPIR 10% threshold
    lenient = identify(c, gallery[0].enrolled, fpir="0.1") or {}
    t10 = float(lenient.get("threshold", float("nan")))
    gallery_stats = c.get("/faces/gallery").json()
    n_mated, found_strangers = len(searches), sum(d is not None for d in stranger_top1)

    def at(t: float) -> dict[str, Any]:
        fa = sum(d is not None and d <= t for d in stranger_top1)
        return {"threshold": t, "fnir": fnir_at(searches, t), "stranger_false_accepts": _rate(fa, found_strangers),
                "fpir": fpir_at(stranger_top1, t)}

    served_at = at(threshold)
    # the server's own decisions agree with distance <= threshold (checked, not assumed)
    served_at["fnir_from_responses"] = 1.0 - served_hits / n_mated if n_mated else None
    served_at["stranger_false_accepts_from_responses"] = _rate(stranger_accepts, found_strangers)
    return {
        "label": label, "gallery_people": len(gallery),
        "gallery": {"subjects": gallery_stats.get("subjects"), "faces": gallery_stats.get("faces")},
        "mated_people_in_gallery": len(mated), "filler_people_in_gallery": len(gallery) - len(mated),
        "mated_searches": n_mated, "mated_probes_without_face": sum(s.top1_distance is None for s in searches),
        "strangers": len(strangers), "strangers_with_face": found_strangers,
        "served": {"threshold": threshold, "threshold_source": served.get("threshold_source"),
                   "fpir": served.get("fpir"), "gallery_size": served.get("gallery_size"),
                   "fpir_expected": served.get("fpir_expected"), "threshold_clamped": served.get("threshold_clamped"),
                   "warning": served.get("warning")},
        "rank1": rank_rate(searches, 1), "rank5": rank_rate(searches, TOP_K),
        "at_served_threshold": served_at,
        "at_served_fpir_0.1_threshold": {**at(t10), "threshold_source": lenient.get("threshold_source"),
                                         "fpir": lenient.get("fpir")},
        "at_verification_threshold": at(verification_tau),
        "fnir_at_measured_fpir": [fnir_at_fpir(searches, stranger_top1, f) for f in (0.01, 0.1)],
        "decision_disagreements": disagreements,
        "seconds": round(time.perf_counter() - t0, 1),
    }


# --------------------------------------------------------------------------------------------- 1:1 on the same people

def verification_metrics(people: list[Person], tau: float) -> dict[str, Any]:
    """TAR at FAR 1% and 0.1% and the decisions at tau, on the photos the identification used."""
    rows: list[tuple[str, np.ndarray]] = []
    genuine = []
    for p in people:
        used = [x for x in (p.enrolled, p.probe) if x is not None] if p.role == "mated" else (
            [p.enrolled] if p.role == "filler" and p.enrolled else p.photos[:1] if p.role == "stranger" else [])
        for x in used:
            e = p.embeddings.get(x)
            if e is not None:
                rows.append((p.name, e))
        if p.role == "mated" and p.enrolled is not None and p.probe is not None:
            a, b = p.embeddings.get(p.enrolled), p.embeddings.get(p.probe)
            genuine.append(float(((a - b) ** 2).sum()) if a is not None and b is not None else float("nan"))
    labels = np.array([r[0] for r in rows])
    e = np.stack([r[1] for r in rows])
    d = np.clip(2.0 - 2.0 * (e @ e.T), 0.0, 4.0)
    iu = np.triu_indices(len(e), 1)
    impostor = d[iu][(labels[:, None] != labels[None, :])[iu]]
    g = np.array(genuine)
    g_found = g[~np.isnan(g)]
    dist = np.concatenate([g_found, impostor])
    same = np.concatenate([np.ones(len(g_found), bool), np.zeros(len(impostor), bool)])
    far, tar, _ = roc_curve(dist, same)
    return {"genuine_pairs": len(g), "genuine_pairs_with_both_faces": len(g_found), "impostor_pairs": len(impostor),
            "photos": len(rows), "tar_at_far": [tar_at_far(dist, same, f) for f in (1e-2, 1e-3)],
            "tar_at_far_all_genuine_pairs": {"far_target": 1e-2, "note": "a genuine pair with a missed face counts as "
                                             "a false reject",
                                             "tar": tar_at_far(dist, same, 1e-2)["tar"] * len(g_found) / len(g)
                                             if len(g) else None},
            "roc_auc": auc(far, tar),
            "at_verification_threshold": {"threshold": tau, "tar": float((g_found <= tau).sum() / len(g)) if len(g)
                                          else None, "far": float((impostor <= tau).mean())}}


# --------------------------------------------------------------------------------------------- the run

def parse_sizes(text: str) -> list[int | str]:
    out: list[int | str] = []
    for part in text.split(","):
        part = part.strip()
        out.append("all" if part == "all" else int(part))
    return out


def run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    people, split = select_people(args.data, args.pairs, args.holdout_max_images)
    mated = [p for p in people if p.role == "mated"]
    fillers = [p for p in people if p.role == "filler"]
    strangers = [p for p in people if p.role == "stranger"]
    with httpx.Client(base_url=url, timeout=120, trust_env=False) as c:
        if c.get("/faces/subjects", params={"limit": 1}).json().get("total"):
            raise SystemExit(f"{url}: the gallery is not empty; this benchmark needs an empty one")
        model = c.get("/models").json()
        face = next((m for m in model["models"] if m.get("task") == "face-embedding" and m.get("status") == "ready"),
                    None)
        if face is None:
            raise SystemExit(f"{url}: no face model is ready")
        tau = float(face["info"]["threshold"])
        t0 = time.perf_counter()
        photos = [x for p in mated + fillers for x in p.photos]
        emb = embed_all(c, photos)
        for p in mated + fillers:
            p.embeddings = {x: emb[x] for x in p.photos}
            with_face = [x for x in p.photos if emb[x] is not None]
            if not with_face:
                p.role = "unusable"
                continue
            p.enrolled = with_face[0]
            if p.role == "mated":
                after = p.photos[p.photos.index(p.enrolled) + 1:]
                if after:
                    p.probe = after[0]  # the next photo, found face or not (a missed face is a failed search)
                    # more photos of the person in the gallery: the same probe, other photos with a face
                    p.extra = [x for x in with_face if x not in (p.enrolled, p.probe)][:args.enroll_photos - 1]
                else:
                    p.role = "unusable"  # only the last photo has a face: nothing left to search with
        for p in strangers:
            p.embeddings = embed_all(c, p.photos[:1])
        embed_seconds = time.perf_counter() - t0
        mated = [p for p in mated if p.role == "mated"]
        fillers = [p for p in fillers if p.role == "filler"]
        results = []
        enrolled: list[Person] = []
        for size in args.sizes:
            if size == "all":
                gallery, label = mated + fillers, "all"
            elif size <= len(mated):
                gallery, label = mated[:size], str(size)
            elif size <= len(mated) + len(fillers):
                gallery, label = mated + fillers[: size - len(mated)], str(size)
            else:
                print(f"# size {size}: only {len(mated) + len(fillers)} people can be enrolled; skipped",
                      file=sys.stderr)
                continue
            t1 = time.perf_counter()
            for p in gallery[len(enrolled):]:
                enroll(c, p)
            enrolled = list(gallery)
            print(f"# gallery {label}: {len(gallery)} people enrolled in {time.perf_counter() - t1:.1f} s",
                  file=sys.stderr)
            in_gallery = [p for p in gallery if p.role == "mated"]
            r = measure_size(c, label, gallery, in_gallery, strangers, tau)
            print(f"# gallery {label}: rank-1 {r['rank1']:.3f}, served threshold {r['served']['threshold']} "
                  f"({r['served']['threshold_source']}), stranger false accepts "
                  f"{r['at_served_threshold']['stranger_false_accepts']['rate']:.3f} "
                  f"(at tau {r['at_verification_threshold']['stranger_false_accepts']['rate']:.3f}) "
                  f"in {r['seconds']} s", file=sys.stderr)
            results.append(r)
        one_to_one = verification_metrics([p for p in people if p.role in ("mated", "filler", "stranger")], tau)
    return {
        "what": "open-set identification through the API on the test half of the held-out LFW identities",
        "url": url, "model": face["name"], "model_sha256": face.get("sha256"),
        "verification_threshold": tau,
        "model_identification": {k: v for k, v in (face["info"].get("identification") or {}).items()
                                 if k in ("impostor_pairs", "identities", "images", "source", "method")},
        "data": {"images": str(args.data), "pairs": str(args.pairs), "holdout_max_images": args.holdout_max_images,
                 "enroll_photos": args.enroll_photos,
                 "mated_enrolled_photos": sum(1 + len(p.extra) for p in mated),
                 "identity_split": split, "role_rule": f"one-photo people: stranger when the first hex digit of "
                                                       f"sha256('{SALT}' NUL 'role' NUL name) is even, else filler",
                 "test_half_people": len(people), "mated_people": len(mated), "filler_people": len(fillers),
                 "stranger_people": len(strangers),
                 "unusable_people": sum(p.role == "unusable" for p in people),
                 "strangers_without_face": sum(p.embeddings.get(p.photos[0]) is None for p in strangers)},
        "sizes": results, "one_to_one": one_to_one, "embed_seconds": round(embed_seconds, 1),
    }


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def _ci(rate: dict[str, Any]) -> str:
    lo_hi = rate.get("wilson95")
    return "-" if not lo_hi else f"{100 * lo_hi[0]:.1f}-{100 * lo_hi[1]:.1f}%"


def enrolled_words(d: dict[str, Any]) -> str:
    k = d.get("enroll_photos", 1)
    if k <= 1:
        return "one enrolled, the next one searched"
    return (f"up to {k} photos enrolled, {d['mated_enrolled_photos']} in all; the searched photo is the one after "
            "the first, as with one enrolled photo")


def report_lines(payload: dict[str, Any]) -> list[str]:
    d = payload["data"]
    tau = payload["verification_threshold"]
    lines = [f"# Face identification (1:N) through the API: {payload['model']}", "",
             f"Test half of the held-out LFW identities (never trained on, never used by the identification "
             f"calibration): {d['mated_people']} people with two or more photos ({enrolled_words(d)}), "
             f"{d['filler_people']} one-photo people enrolled as fillers, {d['stranger_people']} one-photo strangers "
             f"never enrolled ({d['strangers_without_face']} without a detected face, left out of the rates). "
             "FNIR counts a probe without a detected face as a miss.", "",
             "| gallery (subjects) | mated searches | rank-1 | rank-5 | served threshold (source, FPIR target) | "
             "strangers identified at it | FNIR at it | strangers identified at tau "
             f"{tau} | FNIR at tau | FNIR at FPIR 1% (measured) | FNIR at FPIR 10% (measured) |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in payload["sizes"]:
        s, at, v = r["served"], r["at_served_threshold"], r["at_verification_threshold"]
        f1, f10 = r["fnir_at_measured_fpir"]
        fa, fav = at["stranger_false_accepts"], v["stranger_false_accepts"]
        clamp = ", clamped" if s.get("threshold_clamped") else ""
        lines.append(
            f"| {r['gallery']['subjects']} | {r['mated_searches']} | {_pct(r['rank1'])} | {_pct(r['rank5'])} | "
            f"{s['threshold']:.4f} ({s['threshold_source']}, {s['fpir']}{clamp}) | "
            f"{_pct(fa['rate'])} ({fa['count']}/{fa['of']}; 95% {_ci(fa)}) | {_pct(at['fnir'])} | "
            f"{_pct(fav['rate'])} ({fav['count']}/{fav['of']}) | {_pct(v['fnir'])} | "
            f"{_pct(f1['fnir'])} (t {f1['threshold']:.3f}) | {_pct(f10['fnir'])} (t {f10['threshold']:.3f}) |")
    lines += ["", "At the server's FPIR 10% threshold (`fpir=0.1` per request):", "",
              "| gallery | threshold | strangers identified | FNIR |", "|---|---:|---:|---:|"]
    for r in payload["sizes"]:
        t = r["at_served_fpir_0.1_threshold"]
        fa = t["stranger_false_accepts"]
        lines.append(f"| {r['gallery']['subjects']} | {fmt(t['threshold'], 4)} | {_pct(fa['rate'])} "
                     f"({fa['count']}/{fa['of']}; 95% {_ci(fa)}) | {_pct(t['fnir'])} |")
    o = payload["one_to_one"]
    t2, t3 = o["tar_at_far"]
    lines += ["", f"1:1 verification on the same photos ({o['genuine_pairs_with_both_faces']} genuine pairs of "
                  f"{o['genuine_pairs']}, {o['impostor_pairs']:,} impostor pairs): TAR {_pct(t2['tar'])} at FAR "
                  f"{_pct(t2['far'], 2)} (target 1%; {_pct(o['tar_at_far_all_genuine_pairs']['tar'])} counting "
                  f"genuine pairs with a missed face as rejects), TAR {_pct(t3['tar'])} at FAR {_pct(t3['far'], 3)} "
                  f"(target 0.1%), ROC AUC {o['roc_auc']:.3f}; at tau {tau}: TAR "
                  f"{_pct(o['at_verification_threshold']['tar'])}, FAR {_pct(o['at_verification_threshold']['far'])}.",
              "", f"FNIR at a measured FPIR uses the threshold letting through floor(FPIR x strangers) of the "
                  f"{payload['sizes'][0]['strangers_with_face'] if payload['sizes'] else 0} strangers: FPIR 1% "
                  "resolves to a few strangers, so read it as coarse.", ""]
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = PROJECT_ROOT.parent / "shared" / "data" / "lfw"
    p.add_argument("--data", type=Path, default=root / "images")
    p.add_argument("--pairs", type=Path, default=root / "pairsDevTrain.txt")
    p.add_argument("--holdout-max-images", type=int, default=5)
    p.add_argument("--enroll-photos", type=int, default=1,
                   help="photos enrolled per mated person (at most; the probe is the same photo whatever this is)")
    p.add_argument("--sizes", type=parse_sizes, default=parse_sizes("100,400,all"))
    p.add_argument("--model", default="lfw-face-resnet", help="the face model of the server this script starts")
    p.add_argument("--http", default=None, help="a running loopback server with an empty gallery instead")
    p.add_argument("--tmp-dir", default=None)
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "bench" / "faces-identification.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    t0 = time.perf_counter()
    if args.http:
        ensure_loopback(args.http)
        payload = run(args.http, args)
    else:
        root = Path(tempfile.mkdtemp(prefix="faces-ident-", dir=args.tmp_dir))
        try:
            env = {"CNN_DATA_DIR": str(root), "CNN_CLASSIFIERS": "", "CNN_TEXT_MODELS": "",
                   "CNN_FACE_MODELS": args.model, "CNN_STYLE_ENABLED": "false", "CNN_LOG_LEVEL": "warning"}
            with Server(env, python=sys.executable, log_path=root / "server.log", startup_timeout=600) as server:
                payload = run(server.url, args)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    payload = {**payload, "settings": settings, "seconds": round(time.perf_counter() - t0, 1),
               "machine": machine_description("cpu")}
    lines = [*report_lines(payload), *machine_lines(payload["machine"])]
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_json_safe(payload), indent=2, default=str) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"# wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
