"""Faces: /faces/embed, /faces/verify, /faces/enroll, /faces/identify and the gallery of subjects."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Path, Query, Response, UploadFile

from app.api import face_schemas as fs
from app.api.schemas import PROBLEM_RESPONSES
from app.api.uploads import single_file
from app.deps import Faces
from app.errors import InvalidParameters
from app.services.classification import Upload

router = APIRouter(prefix="/faces", tags=["faces"])

RESPONSES: dict[int | str, dict[str, Any]] = {
    **PROBLEM_RESPONSES,
    404: {**PROBLEM_RESPONSES[404], "description": "Unknown model, subject or face"},
    409: {**PROBLEM_RESPONSES[422], "description": "Stored embeddings were made by another model"},
    422: {**PROBLEM_RESPONSES[422], "description": "Invalid parameters, bad subject id, or no face in an image"},
}

DetectorField = Annotated[str | None, Form(description="'haar' (default) or 'none' when the image is a cropped face")]
ThresholdField = Annotated[float | None, Form(gt=0.0, lt=4.0, description="squared-L2 threshold for this request "
                                              "(default: the model's calibrated one)")]


async def _read(service: Any, f: UploadFile, fallback: str) -> Upload:
    # read at most one byte past the limit: enough to know the file is too large
    return Upload(filename=f.filename or fallback, data=await f.read(service.max_image_bytes + 1))


@router.post("/embed", response_model=fs.EmbedResponse, responses=RESPONSES,
             summary="Detect faces and return their embeddings")
async def embed(
    service: Faces,
    image: Annotated[list[UploadFile], File(description="one or more images (repeat the field)")],
    model: Annotated[str | None, Form(description="face model (default: the gallery's)")] = None,
    detector: DetectorField = None,
    max_faces: Annotated[int | None, Form(ge=1, le=100, description="largest faces kept per image")] = None,
) -> fs.EmbedResponse:
    """Every detected face (largest first) with its box, detector score and unit embedding; an image without a
    face gives an empty list."""
    uploads = [await _read(service, f, f"image[{i}]") for i, f in enumerate(image)]
    return await service.embed(uploads, model or None, detector, max_faces)


@router.post("/verify", response_model=fs.VerifyResponse, response_model_exclude_unset=True, responses=RESPONSES,
             summary="Verify two faces, or a face against an enrolled subject")
async def verify(
    service: Faces,
    image_a_field: Annotated[list[UploadFile] | None, File(alias="image_a",
                                                           description="first image (with image_b)")] = None,
    image_b_field: Annotated[list[UploadFile] | None, File(alias="image_b",
                                                           description="second image (with image_a)")] = None,
    image_field: Annotated[list[UploadFile] | None, File(alias="image",
                                                         description="image to check against `subject`")] = None,
    subject: Annotated[str | None, Form(description="enrolled subject to verify `image` against")] = None,
    model: Annotated[str | None, Form(description="face model for image_a/image_b (default: the gallery's)")] = None,
    detector: DetectorField = None,
    threshold: ThresholdField = None,
) -> fs.VerifyResponse:
    """Same person when the squared L2 distance between the largest faces' embeddings is at most the threshold.
    Send either image_a + image_b, or image + subject."""
    image_a, image_b = single_file(image_a_field, "image_a"), single_file(image_b_field, "image_b")
    image = single_file(image_field, "image")
    pair = image_a is not None or image_b is not None
    single = image is not None or subject is not None
    if pair == single:
        raise InvalidParameters("send either image_a and image_b, or image and subject")
    if pair:
        if image_a is None or image_b is None:
            raise InvalidParameters("image_a and image_b are both required")
        a = await _read(service, image_a, "image_a")
        b = await _read(service, image_b, "image_b")
        return await service.verify_pair(a, b, model or None, detector, threshold)
    if image is None or not subject:
        raise InvalidParameters("image and subject are both required")
    return await service.verify_subject(await _read(service, image, "image"), subject, detector, threshold)


LOCATION = {"Location": {"description": "the subject's URL", "schema": {"type": "string"}}}


@router.post("/enroll", status_code=201, response_model=fs.EnrollResponse, response_model_exclude_unset=True,
             summary="Enrol faces of a subject",
             responses={**RESPONSES, 201: {"description": "enrolled", "headers": LOCATION}})
async def enroll(
    service: Faces,
    response: Response,
    subject: Annotated[str, Form(description="subject id: 1-128 of letters, digits and . _ @ + -")],
    image: Annotated[list[UploadFile], File(description="one or more images (repeat the field); the largest face "
                                                        "of each is enrolled")],
    detector: DetectorField = None,
    quality: Annotated[Literal["report", "strict"], Form(
        description="'report' (default): enrol and list each face's quality issues; 'strict': refuse the whole "
                    "request (422, nothing stored) when any face has one")] = "report",
) -> fs.EnrollResponse:
    """Store the largest face of each image for the subject (created on first use). All or nothing: an image
    without a face is a 422 naming it, and nothing is stored.

    Each enrolled face reports its quality: `face_side` (shorter box side in pixels), `sharpness` (Laplacian
    variance of the crop), the eye positions used for alignment, and `issues`: `small` and `blurred` (below the
    server's limits, in `limits`), `duplicate` (/faces/identify would name another subject for this photo;
    `duplicates` lists them) and `unlike-subject` (farther than the 1:1 verification threshold from every other
    face of this subject: possibly another person)."""
    uploads = [await _read(service, f, f"image[{i}]") for i, f in enumerate(image)]
    result = await service.enroll(subject, uploads, detector, quality)
    response.headers["Location"] = f"/faces/subjects/{subject}"
    return result


@router.post("/identify", response_model=fs.IdentifyResponse, response_model_exclude_unset=True, responses=RESPONSES,
             summary="Identify faces against the gallery")
async def identify(
    service: Faces,
    image: Annotated[list[UploadFile], File(description="one image with one or more faces")],
    top_k: Annotated[int, Form(ge=1, le=100, description="subjects per face")] = 5,
    max_faces: Annotated[int | None, Form(ge=1, le=100, description="largest faces identified")] = None,
    detector: DetectorField = None,
    threshold: Annotated[float | None, Form(gt=0.0, lt=4.0, description="squared-L2 threshold for this request "
                                            "(default: set from the FPIR for the current gallery size)")] = None,
    fpir: Annotated[float | None, Form(gt=0.0, lt=1.0, description="target probability that a stranger is "
                                       "identified as someone, for this request (default: the server's, 0.01); "
                                       "not with threshold")] = None,
) -> fs.IdentifyResponse:
    """For each detected face (largest first): the top-k subjects by best face distance, and `subject` = the
    nearest one when its distance is within the threshold, else null (a stranger).

    The threshold is an identification (1:N) threshold, not /faces/verify's 1:1 one: it is set from the model's
    impostor-distance calibration so that a stranger is identified as some enrolled subject with probability
    `fpir` at the current gallery size (`gallery_size`: enrolled faces searched), stricter as the gallery grows.
    The response says which threshold was used and where it came from (`threshold_source`: identification-fpir,
    request, server, or verification when the model has no calibration, with a `warning`)."""
    one = single_file(image, "image")
    assert one is not None  # the field is required
    return await service.identify(await _read(service, one, "image"), top_k, max_faces, detector, threshold, fpir)


SubjectPath = Annotated[str, Path(description="subject id")]


@router.get("/subjects", response_model=fs.SubjectsPage, responses=RESPONSES, summary="List enrolled subjects")
async def list_subjects(
    service: Faces,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,  # larger: 422 (SQLite integers overflow at 2**63)
) -> fs.SubjectsPage:
    """Subjects sorted by id with their face counts; `next` links the following page."""
    return await service.list_subjects(limit, offset)


@router.get("/subjects/{subject}", response_model=fs.SubjectDetail, responses=RESPONSES,
            summary="One subject and its faces")
async def get_subject(service: Faces, subject: SubjectPath) -> fs.SubjectDetail:
    return await service.get_subject(subject)


@router.delete("/subjects/{subject}", response_model=fs.DeletedSubject, responses=RESPONSES,
               summary="Delete a subject and all its faces")
async def delete_subject(service: Faces, subject: SubjectPath) -> fs.DeletedSubject:
    """Deleted from SQLite and the index before the response: nothing of the subject is found afterwards."""
    return await service.delete_subject(subject)


@router.get("/gallery", response_model=fs.GalleryStats, responses=RESPONSES, summary="Gallery statistics")
async def gallery(service: Faces) -> fs.GalleryStats:
    """Subjects, faces, indexed faces, faces from other models, index kind and how it was opened."""
    return await service.gallery_stats()


@router.delete("/{face_id}", response_model=fs.DeletedFace, responses=RESPONSES, summary="Delete one enrolled face")
async def delete_face(service: Faces, face_id: Annotated[str, Path(max_length=64)]) -> fs.DeletedFace:
    return await service.delete_face(face_id)
