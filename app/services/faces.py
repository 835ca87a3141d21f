"""Faces: decode -> detect -> crop -> micro-batched embedding -> verify / enrol / identify on the gallery.

FaceNet's rule decides: two faces are the same person when the squared L2 distance of their unit
embeddings is at most the model's calibrated threshold (or a per-request one). Embeddings carry the
name and sha256 of the model that made them, and the gallery never compares embeddings of
different models.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.errors import Conflict, InvalidParameters, NotFound, ServiceUnavailable
from app.runtime.images import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_SIDE
from app.runtime.registry import LoadedFaceEmbedder
from app.services import results as r
from app.services.classification import ImageLimits, Upload
from app.services.pool import ModelPool, map_in_threads
from app.stores.interfaces import (
    GalleryProtocol,
    InvalidSubject,
    ModelMismatch,
    NewFace,
    UnknownFace,
    UnknownSubject,
    validate_subject,
)
from models.faces.align import EyeFinderPool, Eyes, face_input
from models.faces.crop import CropSpec
from models.faces.detect import FaceBox, HaarDetector, HaarParams, WholeImageDetector
from models.faces.quality import FaceQuality, measure
from models.preprocess import image_to_tensor

log = logging.getLogger("app.faces")

DETECTORS = ("haar", "none")
QUALITY_MODES = ("report", "strict")


@dataclass
class Face:
    """One detected face of an upload, ready for the embedder."""

    box: FaceBox
    tensor: torch.Tensor
    eyes: Eyes | None
    quality: FaceQuality | None  # measured for enrolments only


@dataclass
class ImageFaces:
    """The faces found in one upload (largest first) and how many the detector saw in all."""

    filename: str
    faces: list[Face]
    detected: int


class DetectorPool:
    """One Haar cascade per thread (OpenCV's CascadeClassifier is not safe to share across threads).

    A detector that cannot be built (an OpenCV without cascades or without CascadeClassifier) is recorded in
    `errors` at start-up: requests for it get a 503 with the reason, the other detectors keep serving."""

    def __init__(self, params: HaarParams) -> None:
        self.params = params
        self._local = threading.local()
        self.errors: dict[str, str] = {}
        try:
            HaarDetector(params)  # find out at start-up, not on the first request, when the cascade is missing
        except Exception as exc:
            self.errors["haar"] = f"{type(exc).__name__}: {exc}"
        # eye alignment (models whose crop says align=eyes); without the eye cascade faces are embedded unaligned
        self.eyes = EyeFinderPool()
        if self.eyes.error:
            log.warning("eye alignment unavailable (%s): models that align on the eyes get unaligned crops",
                        self.eyes.error)

    def detect(self, name: str, img: Image.Image) -> list[FaceBox]:
        if name == "none":
            return WholeImageDetector().detect(img)
        if name in self.errors:
            raise ServiceUnavailable(f"face detector {name!r} is unavailable on this server ({self.errors[name]}); "
                                     "send cropped faces with detector=none", extra={"detector": name})
        det: HaarDetector | None = getattr(self._local, "haar", None)
        if det is None:
            det = HaarDetector(self.params)
            self._local.haar = det
        return det.detect(img)


def face_crop_spec(loaded: LoadedFaceEmbedder, detector: str) -> CropSpec:
    """The embedder's crop of a detected face (the model's margin and alignment); a cropped face (detector=none)
    is taken as sent: no margin, no alignment."""
    if detector == "none":
        return CropSpec(size=loaded.crop_size, margin=0.0)
    return CropSpec(size=loaded.crop_size, margin=loaded.crop_margin, align=loaded.crop_align)


def face_for_embedding(img: Image.Image, box: FaceBox, loaded: LoadedFaceEmbedder, detectors: DetectorPool,
                       detector: str, quality: bool = False) -> Face:
    """Blocking: one face box of a decoded image as the embedder's input (crop, eye alignment, preprocessing) and,
    for an enrolment, its quality."""
    crop, eyes = face_input(img, box, face_crop_spec(loaded, detector), detectors.eyes)
    return Face(box, image_to_tensor(crop, loaded.preprocessing), eyes, measure(box, crop) if quality else None)


def find_faces(img: Image.Image, filename: str, loaded: LoadedFaceEmbedder, detectors: DetectorPool, detector: str,
               max_faces: int, quality: bool = False) -> ImageFaces:
    """Blocking: detect, keep the largest max_faces faces and make their embedder inputs. The service and the
    evaluation commands (`app.cli evaluate-faces`, `calibrate-identification`) both find faces here."""
    boxes = detectors.detect(detector, img)  # largest first (the Detector contract)
    faces = [face_for_embedding(img, b, loaded, detectors, detector, quality) for b in boxes[:max_faces]]
    return ImageFaces(filename, faces, len(boxes))


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(max(0.0, float(((a - b) ** 2).sum())))


class FacesService:
    """The face application: embed, verify, enrol, identify and the gallery of subjects."""

    def __init__(self, pool: ModelPool[LoadedFaceEmbedder], gallery: GalleryProtocol | None, detectors: DetectorPool, *,
                 default_detector: str, max_faces: int, threshold_override: float | None, max_image_bytes: int,
                 max_image_pixels: int, max_images: int, max_image_side: int = DEFAULT_MAX_SIDE,
                 max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO, identify_fpir: float = 0.01,
                 enroll_min_side: int = 40, enroll_min_sharpness: float = 100.0) -> None:
        self.pool = pool
        self.gallery = gallery
        self.detectors = detectors
        self.default_detector = default_detector
        self.max_faces = max_faces
        self.threshold_override = threshold_override
        self.identify_fpir = identify_fpir
        self.enroll_min_side = enroll_min_side
        self.enroll_min_sharpness = enroll_min_sharpness
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.max_image_side = max_image_side
        self.max_aspect_ratio = max_aspect_ratio
        # the limits uploads are decoded within, made once (the max_* values above stay plain attributes: routers
        # read max_image_bytes, and Ray Serve's ingress twins copy plain attributes)
        self.limits = ImageLimits(max_image_bytes, max_image_pixels, max_image_side, max_aspect_ratio)
        self.max_images = max_images


    # ----- helpers --------------------------------------------------------------------------------------
    def _gallery(self) -> tuple[GalleryProtocol, str, LoadedFaceEmbedder]:
        if self.gallery is None:
            raise NotFound("no face model is loaded, so there is no gallery; see GET /models")
        name, loaded = self.pool.resolve(self.gallery.model.name)
        return self.gallery, name, loaded

    def _detector(self, detector: str | None) -> str:
        d = detector or self.default_detector
        if d not in DETECTORS:
            raise InvalidParameters(f"detector must be one of {', '.join(DETECTORS)}, not {d!r}")
        return d

    def _threshold(self, loaded: LoadedFaceEmbedder, requested: float | None) -> tuple[float, str]:
        if requested is not None:
            if not 0.0 < requested < 4.0:
                raise InvalidParameters("threshold is a squared L2 distance between unit vectors: 0 < threshold < 4")
            return requested, "request"
        if self.threshold_override is not None:
            return self.threshold_override, "server"
        return loaded.threshold, "model"

    def _identify_threshold(self, loaded: LoadedFaceEmbedder, gallery_size: int, requested: float | None,
                            fpir: float | None) -> tuple[dict[str, Any], list[str]]:
        """The 1:N threshold and how it was chosen, with warnings: a request's threshold, else a request's FPIR,
        else the server's fixed threshold (CNN_FACE_THRESHOLD), else the server's FPIR (CNN_FACE_IDENTIFY_FPIR)
        through the model's impostor table for this gallery size, else (no table) the 1:1 verification threshold."""
        if requested is not None and fpir is not None:
            raise InvalidParameters("send threshold or fpir, not both")
        if fpir is not None and not 0.0 < fpir < 1.0:
            raise InvalidParameters("fpir is a probability: 0 < fpir < 1")
        table = loaded.identification
        warnings: list[str] = []
        target: float | None = None
        clamped: str | None = None
        if requested is not None or (fpir is None and self.threshold_override is not None):
            tau, source = self._threshold(loaded, requested)
        elif table is not None:
            target = fpir if fpir is not None else self.identify_fpir
            th = table.threshold_for(target, gallery_size)
            tau, source, clamped = th.threshold, "identification-fpir", th.clamped
            if th.clamped == "strictest":
                warnings.append(f"a gallery of {gallery_size} faces needs a per-comparison FAR of {th.far:.2g} for "
                                f"FPIR {target:g}, below the smallest the model's calibration supports "
                                f"({table.far_min:.2g}): the threshold is clamped to the strictest calibrated value "
                                f"and strangers are identified with a probability of about {th.fpir_expected:.3g}")
            elif th.clamped == "most-lenient":
                warnings.append(f"FPIR {target:g} at a gallery of {gallery_size} faces needs a per-comparison FAR of "
                                f"{th.far:.2g}, above the largest the model's calibration holds ({table.far_max:.2g}): "
                                "the threshold is clamped to the most lenient calibrated value")
        elif fpir is not None:
            raise InvalidParameters(f"model {loaded.spec.name!r} has no identification calibration (an impostor "
                                    "distance table in its manifest entry), so no threshold can be set from an fpir; "
                                    "send a threshold instead", extra={"model": loaded.spec.name})
        else:
            tau, source = loaded.threshold, "verification"
            warnings.append(f"model {loaded.spec.name!r} has no identification calibration: the 1:1 verification "
                            "threshold is used, and with many enrolled subjects strangers may be identified as one "
                            "of them; send an explicit threshold, or calibrate the model (python -m app.cli "
                            "calibrate-identification)")
        expected = table.fpir_at(tau, gallery_size) if table is not None and gallery_size > 0 else None
        return {"threshold": round(tau, 6), "threshold_source": source, "fpir": target, "gallery_size": gallery_size,
                "fpir_expected": round(expected, 6) if expected is not None else None,
                "threshold_clamped": clamped}, warnings

    def _find(self, upload: Upload, loaded: LoadedFaceEmbedder, detector: str, max_faces: int,
              quality: bool = False) -> ImageFaces:
        """Blocking: decode, detect, keep the largest max_faces faces and make their embedder inputs (and, for an
        enrolment, measure their quality)."""
        img = self.limits.decode(upload)
        return find_faces(img, upload.filename, loaded, self.detectors, detector, max_faces, quality)

    async def _embed_uploads(
        self, uploads: list[Upload], model: str | None, detector: str | None, max_faces: int, quality: bool = False
    ) -> tuple[str, LoadedFaceEmbedder, list[ImageFaces], list[list[np.ndarray]]]:
        name, loaded = self.pool.resolve(model)
        det = self._detector(detector)
        found = await map_in_threads(lambda u: self._find(u, loaded, det, max_faces, quality), uploads)
        tensors = [f.tensor for img in found for f in img.faces]
        flat = await self.pool.run(name, tensors, loaded) if tensors else []
        out: list[list[np.ndarray]] = []
        i = 0
        for img in found:
            out.append([flat[j].numpy() for j in range(i, i + len(img.faces))])
            i += len(img.faces)
        return name, loaded, found, out

    @staticmethod
    def _model_info(name: str, loaded: LoadedFaceEmbedder) -> dict[str, Any]:
        return {"model": name, "model_sha256": loaded.sha256, "weights": loaded.weights_tag}

    @staticmethod
    def _face_json(face: Face) -> dict[str, Any]:
        b = face.box
        return {"box": {"x": b.x, "y": b.y, "w": b.w, "h": b.h}, "score": round(b.score, 4)}

    @staticmethod
    def _box(face: Face) -> r.Box:
        b = face.box
        return r.Box(x=b.x, y=b.y, w=b.w, h=b.h)

    @classmethod
    def _verified(cls, img: ImageFaces, face: Face) -> r.VerifiedFace:
        return r.VerifiedFace(box=cls._box(face), score=round(face.box.score, 4), faces_detected=img.detected)

    @staticmethod
    def _require_face(img: ImageFaces, field: str) -> Face:
        if not img.faces:
            raise InvalidParameters(f"no face found in {field} ({img.filename!r}); send a clearer frontal face, or a "
                                    "cropped face with detector=none", extra={"image": img.filename, "field": field})
        return img.faces[0]

    def _check_count(self, uploads: list[Upload]) -> None:
        if not uploads:
            raise InvalidParameters("at least one image is required (field 'image')")
        if len(uploads) > self.max_images:
            raise InvalidParameters(f"{len(uploads)} images sent; at most {self.max_images} per request")

    # ----- endpoints ------------------------------------------------------------------------------------
    async def embed(self, uploads: list[Upload], model: str | None, detector: str | None,
                    max_faces: int | None) -> r.EmbedResponse:
        """Every detected face of every upload with its box, score and embedding."""
        self._check_count(uploads)
        name, loaded, found, embs = await self._embed_uploads(uploads, model, detector, max_faces or self.max_faces)
        return r.EmbedResponse(**self._model_info(name, loaded), dim=loaded.dim, results=[
            r.ImageEmbeddings(filename=img.filename, faces_detected=img.detected, faces=[
                r.EmbeddedFace(box=self._box(f), score=round(f.box.score, 4),
                               embedding=[round(float(v), 7) for v in e])
                for f, e in zip(img.faces, es, strict=True)])
            for img, es in zip(found, embs, strict=True)])

    async def verify_pair(self, a: Upload, b: Upload, model: str | None, detector: str | None,
                          threshold: float | None) -> r.VerifyResponse:
        """Are the largest faces of two images the same person?"""
        name, loaded, found, embs = await self._embed_uploads([a, b], model, detector, 1)
        fa = self._require_face(found[0], "image_a")
        fb = self._require_face(found[1], "image_b")
        tau, source = self._threshold(loaded, threshold)
        d = _distance(embs[0][0], embs[1][0])
        return r.VerifyResponse(**self._model_info(name, loaded), **self._decision(d, tau, source),
                                faces={"image_a": self._verified(found[0], fa),
                                       "image_b": self._verified(found[1], fb)})

    @staticmethod
    def _decision(d: float, tau: float, source: str) -> dict[str, Any]:
        return {"match": d <= tau, "distance": round(d, 6), "similarity": round(1.0 - d / 2.0, 6),
                "threshold": round(tau, 6), "threshold_source": source}

    async def verify_subject(self, upload: Upload, subject: str, detector: str | None,
                             threshold: float | None) -> r.VerifyResponse:
        """Is the largest face of an image the enrolled subject? (closest of the subject's faces)"""
        gallery, name, loaded = self._gallery()
        self._subject(subject)
        try:
            face_ids, vecs = await asyncio.to_thread(gallery.subject_embeddings, subject)
        except UnknownSubject as exc:
            raise NotFound(f"unknown subject {subject!r}", extra={"subject": subject}) from exc
        except ModelMismatch as exc:
            raise Conflict(str(exc), extra={"subject": subject}) from exc
        if not face_ids:
            raise Conflict(f"subject {subject!r} has no enrolled faces left", extra={"subject": subject})
        _, _, found, embs = await self._embed_uploads([upload], name, detector, 1)
        face = self._require_face(found[0], "image")
        dists = ((vecs - embs[0][0][None, :]) ** 2).sum(-1)
        best = int(np.argmin(dists))
        tau, source = self._threshold(loaded, threshold)
        # subject, face_id and faces_compared are set here only: a pair's answer leaves them out
        return r.VerifyResponse(**self._model_info(name, loaded), **self._decision(float(dists[best]), tau, source),
                                subject=subject, face_id=face_ids[best], faces_compared=len(face_ids),
                                faces={"image": self._verified(found[0], face)})

    @staticmethod
    def _subject(subject: str) -> str:
        try:
            return validate_subject(subject)
        except InvalidSubject as exc:
            raise InvalidParameters(f"subject: {exc}", extra={"subject": subject[:200]}) from exc

    async def enroll(self, subject: str, uploads: list[Upload], detector: str | None,
                     quality: str = "report") -> r.EnrollResponse:
        """Store the largest face of each image for the subject, all or nothing, with each face's quality checks:
        'small' and 'blurred' (against the server's limits), 'duplicate' (identify would name another subject for
        this photo: within the 1:N threshold of the current gallery size) and 'unlike-subject' (farther than the
        1:1 verification threshold from every other face of the subject). quality='report' enrols and reports them;
        'strict' refuses the whole request with a 422 listing them, and stores nothing."""
        self._subject(subject)
        self._check_count(uploads)
        if quality not in QUALITY_MODES:
            raise InvalidParameters(f"quality must be one of {', '.join(QUALITY_MODES)}, not {quality!r}")
        gallery, name, loaded = self._gallery()
        _, _, found, embs = await self._embed_uploads(uploads, name, detector, 1, quality=True)
        for i, img in enumerate(found):
            self._require_face(img, f"image[{i}]")
        vecs = np.stack([es[0] for es in embs])
        duplicates, unlike, dup_threshold = await asyncio.to_thread(self._enrol_checks, gallery, loaded, subject, vecs)
        checked: list[dict[str, Any]] = []
        issue_lists: list[list[str]] = []
        for i, img in enumerate(found):
            face = img.faces[0]
            assert face.quality is not None  # measured: quality=True above
            issues = face.quality.issues(self.enroll_min_side, self.enroll_min_sharpness)
            issues += ["duplicate"] * bool(duplicates[i]) + ["unlike-subject"] * unlike[i]
            issue_lists.append(issues)
            checked.append({"image": img.filename, "quality": self._quality_json(face), "issues": issues,
                            "duplicates": duplicates[i]})
        limits = {"min_face_side": self.enroll_min_side, "min_sharpness": self.enroll_min_sharpness,
                  "duplicate_threshold": dup_threshold,
                  "unlike_threshold": round(self._threshold(loaded, None)[0], 6)}
        flagged = [(img.filename, issues) for img, issues in zip(found, issue_lists, strict=True) if issues]
        if quality == "strict" and flagged:
            raise InvalidParameters(
                f"{len(flagged)} of {len(checked)} images failed the enrolment quality checks; nothing was stored: "
                + "; ".join(f"{fname!r}: {', '.join(issues)}" for fname, issues in flagged),
                extra={"images": checked, "limits": limits})
        new = [NewFace(es[0], box=self._face_json(img.faces[0])["box"], image=img.filename)
               for img, es in zip(found, embs, strict=True)]
        records = await asyncio.to_thread(gallery.enroll, subject, new)
        faces = []
        for rec, img, check in zip(records, found, checked, strict=True):
            # optional fields are set only when they apply (unset ones are absent from the JSON)
            note: dict[str, Any] = {}
            if img.detected > 1:
                note["note"] = f"{img.detected} faces detected; the largest was enrolled"
            faces.append(r.EnrolledFace(
                face_id=rec["face_id"], image=img.filename, box=rec["box"], score=round(img.faces[0].box.score, 4),
                faces_detected=img.detected, quality=r.FaceQuality.model_validate(check["quality"]),
                issues=check["issues"], duplicates=[r.Duplicate.model_validate(d) for d in check["duplicates"]],
                **note))
        warning: dict[str, Any] = {}
        if flagged:
            warning["warning"] = (f"{len(flagged)} of {len(checked)} enrolled faces have quality issues (see each "
                                  "face's `issues`); send quality=strict to refuse such enrolments")
        return r.EnrollResponse(**self._model_info(name, loaded), subject=subject,
                                quality_check=quality,  # type: ignore[arg-type]  # one of QUALITY_MODES (checked)
                                limits=r.EnrolLimits.model_validate(limits), faces=faces, **warning)

    @staticmethod
    def _quality_json(face: Face) -> dict[str, Any]:
        assert face.quality is not None
        return {"face_side": face.quality.face_side, "sharpness": face.quality.sharpness,
                "eyes": face.eyes.to_dict() if face.eyes else None}

    def _enrol_checks(self, gallery: GalleryProtocol, loaded: LoadedFaceEmbedder, subject: str, vecs: np.ndarray
                      ) -> tuple[list[list[dict[str, Any]]], list[bool], float | None]:
        """Blocking. For each new face: the other subjects identify would name for it (duplicates), and whether it
        is farther than the verification threshold from every other face of the subject, enrolled or new."""
        n = gallery.index.ntotal
        tau, _ = self._threshold(loaded, None)  # the 1:1 threshold (the server's override, else the model's)
        duplicates: list[list[dict[str, Any]]] = [[] for _ in range(len(vecs))]
        dup_threshold: float | None = None
        if n:
            chosen, _ = self._identify_threshold(loaded, n, None, None)
            dup_threshold = float(chosen["threshold"])
            for i, hits in enumerate(gallery.search(vecs, 5)):
                duplicates[i] = [{"subject": h.subject, "face_id": h.face_id, "distance": round(h.distance, 6)}
                                 for h in hits if h.subject != subject and h.distance <= dup_threshold]
        try:
            _, enrolled = gallery.subject_embeddings(subject)
        except (UnknownSubject, ModelMismatch):
            enrolled = np.zeros((0, vecs.shape[1]), dtype=np.float32)
        unlike = []
        for i in range(len(vecs)):
            others = np.concatenate([np.asarray(enrolled, dtype=np.float32).reshape(-1, vecs.shape[1]),
                                     np.delete(vecs, i, axis=0)])
            unlike.append(bool(len(others)) and float(((others - vecs[i]) ** 2).sum(-1).min()) > tau)
        return duplicates, unlike, dup_threshold

    async def identify(self, upload: Upload, top_k: int, max_faces: int | None, detector: str | None,
                       threshold: float | None, fpir: float | None = None) -> r.IdentifyResponse:
        """For every detected face: the top-k subjects and the best one if it is within the 1:N threshold.

        The gallery size N is the number of enrolled faces searched (not subjects): the search compares the probe
        with every face, so a subject with k faces gives a stranger k chances. Counting them all keeps the FPIR
        near the target whatever the correlation of a subject's faces (union bound: FPIR <= N x FAR, at most
        1.005% for a 1% target); counting subjects would under-count."""
        gallery, name, loaded = self._gallery()
        # validate the threshold choice before the image work (a 422 should not cost an embedding)
        self._identify_threshold(loaded, 0, threshold, fpir)
        _, _, found, embs = await self._embed_uploads([upload], name, detector, max_faces or self.max_faces)
        self._require_face(found[0], "image")
        n = gallery.index.ntotal  # faces of this model in the index: what the search compares with
        chosen, warnings = self._identify_threshold(loaded, n, threshold, fpir)
        tau = float(chosen["threshold"])
        hits = await asyncio.to_thread(gallery.search, np.stack(embs[0]), top_k)
        results = []
        for face, cands in zip(found[0].faces, hits, strict=True):
            best = cands[0] if cands and cands[0].distance <= tau else None
            results.append(r.IdentifiedFace(
                box=self._box(face), score=round(face.box.score, 4),
                subject=best.subject if best else None,
                distance=round(cands[0].distance, 6) if cands else None,
                candidates=[r.Candidate(subject=h.subject, face_id=h.face_id, distance=round(h.distance, 6),
                                        similarity=round(h.similarity, 6), match=h.distance <= tau) for h in cands],
            ))
        if gallery.foreign_faces:
            warnings.append(f"{gallery.foreign_faces} gallery faces were made by another model and were not "
                            "searched; re-enrol those subjects")
        warning: dict[str, Any] = {"warning": "; ".join(warnings)} if warnings else {}  # else absent from the JSON
        return r.IdentifyResponse(**self._model_info(name, loaded), **chosen, faces_detected=found[0].detected,
                                  faces=results, **warning)

    # ----- gallery management ---------------------------------------------------------------------------
    async def list_subjects(self, limit: int, offset: int) -> r.SubjectsPage:
        gallery, _, _ = self._gallery()
        rows, total = await asyncio.to_thread(gallery.list_subjects, limit, offset)
        nxt = f"/faces/subjects?limit={limit}&offset={offset + limit}" if offset + limit < total else None
        return r.SubjectsPage(subjects=[r.SubjectSummary.model_validate(row) for row in rows], total=total,
                              limit=limit, offset=offset, next=nxt)

    async def get_subject(self, subject: str) -> r.SubjectDetail:
        gallery, _, _ = self._gallery()
        self._subject(subject)
        try:
            found = await asyncio.to_thread(gallery.get_subject, subject)
        except UnknownSubject as exc:
            raise NotFound(f"unknown subject {subject!r}", extra={"subject": subject}) from exc
        return r.SubjectDetail.model_validate(found)

    async def delete_subject(self, subject: str) -> r.DeletedSubject:
        gallery, _, _ = self._gallery()
        self._subject(subject)
        try:
            n = await asyncio.to_thread(gallery.delete_subject, subject)
        except UnknownSubject as exc:
            raise NotFound(f"unknown subject {subject!r}", extra={"subject": subject}) from exc
        return r.DeletedSubject(subject=subject, deleted_faces=n)

    async def delete_face(self, face_id: str) -> r.DeletedFace:
        gallery, _, _ = self._gallery()
        try:
            deleted = await asyncio.to_thread(gallery.delete_face, face_id)
        except UnknownFace as exc:
            raise NotFound(f"unknown face {face_id!r}", extra={"face_id": face_id[:200]}) from exc
        return r.DeletedFace.model_validate(deleted)

    async def gallery_stats(self) -> r.GalleryStats:
        gallery, _, _ = self._gallery()
        return r.GalleryStats.model_validate(await asyncio.to_thread(gallery.stats))
