"""What the services answer: typed results that the routers return as they are (their response models).

The class names are the schema names of /openapi.json and the fields are the JSON clients see, so renaming a
class or a field here changes the API. The face results forbid extra fields and leave optional fields unset
(absent from the JSON: the face routes answer with response_model_exclude_unset) unless the service sets them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# ----- classification and text ------------------------------------------------------------------------------


class Prediction(BaseModel):
    label: str
    index: int
    probability: float = Field(ge=0.0, le=1.0)


class ImageResult(BaseModel):
    filename: str
    top_k: list[Prediction]


class ClassifyResponse(BaseModel):
    model: str
    weights: Literal["trained", "untrained"]
    weights_source: str
    results: list[ImageResult]

    model_config = {
        "json_schema_extra": {
            "examples": [{
                "model": "cifar10-resnet56", "weights": "trained", "weights_source": "weights_dir",
                "results": [{"filename": "ship.jpg", "top_k": [
                    {"label": "ship", "index": 8, "probability": 0.93},
                    {"label": "airplane", "index": 0, "probability": 0.04}]}],
            }]
        }
    }


class TextResult(BaseModel):
    top_k: list[Prediction]
    truncated: bool = Field(description="the text was longer than the model's window and was cut")


class TextClassifyResponse(BaseModel):
    model: str
    weights: str
    weights_source: str
    window: int = Field(description="what the model reads of a text: characters for the character-level models, "
                        "word tokens for the word-level ones (`window_unit`)")
    window_unit: Literal["characters", "tokens"] = Field(description="what `window` counts")
    results: list[TextResult]


# ----- faces ------------------------------------------------------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Box(_Out):
    x: int
    y: int
    w: int
    h: int


class ModelInfo(_Out):
    model: str = Field(description="the face model that made the embeddings")
    model_sha256: str = Field(description="sha256 of its weights ('untrained' for random weights)")
    weights: str = Field(description="'trained' or 'untrained'")


class DetectedFace(_Out):
    box: Box
    score: float = Field(description="the detector's score (Haar: the cascade's level weight; 1 for detector=none)")


class EmbeddedFace(DetectedFace):
    embedding: list[float] = Field(description="unit-length embedding")


class ImageEmbeddings(_Out):
    filename: str
    faces_detected: int
    faces: list[EmbeddedFace] = Field(description="the largest max_faces faces, largest first")


class EmbedResponse(ModelInfo):
    dim: int
    results: list[ImageEmbeddings]


class VerifiedFace(DetectedFace):
    faces_detected: int


class Decision(ModelInfo):
    match: bool
    distance: float = Field(description="squared L2 distance between the unit embeddings (0-4)")
    similarity: float = Field(description="cosine similarity, 1 - distance / 2")
    threshold: float
    threshold_source: Literal["model", "server", "request"]


class VerifyResponse(Decision):
    faces: dict[str, VerifiedFace] = Field(description="image_a and image_b, or image")
    subject: str | None = Field(default=None, description="the subject verified against (image + subject)")
    face_id: str | None = Field(default=None, description="the subject's closest enrolled face")
    faces_compared: int | None = Field(default=None, description="the subject's enrolled faces compared")


class Eyes(_Out):
    left: list[float]
    right: list[float]


class FaceQuality(_Out):
    face_side: int = Field(description="shorter side of the detector box in the upload, pixels")
    sharpness: float = Field(description="variance of the Laplacian of the embedder's crop")
    eyes: Eyes | None = Field(description="the eyes the crop was aligned on (models with face_crop.align = eyes)")


class Duplicate(_Out):
    subject: str
    face_id: str
    distance: float


class EnrolledFace(_Out):
    face_id: str
    image: str
    box: Box | None
    score: float
    faces_detected: int
    quality: FaceQuality
    issues: list[Literal["small", "blurred", "duplicate", "unlike-subject"]]
    duplicates: list[Duplicate] = Field(description="other subjects identify would name for this photo")
    note: str | None = None


class EnrolLimits(_Out):
    min_face_side: int
    min_sharpness: float
    duplicate_threshold: float | None = Field(description="the 1:N threshold at the gallery size before this "
                                                          "enrolment (null: the gallery was empty)")
    unlike_threshold: float = Field(description="the 1:1 verification threshold")


class EnrollResponse(ModelInfo):
    subject: str
    quality_check: Literal["report", "strict"]
    limits: EnrolLimits
    faces: list[EnrolledFace]
    warning: str | None = None


class Candidate(_Out):
    subject: str
    face_id: str
    distance: float
    similarity: float
    match: bool = Field(description="distance <= the identification threshold")


class IdentifiedFace(DetectedFace):
    subject: str | None = Field(description="the nearest subject when within the threshold, else null (a stranger)")
    distance: float | None = Field(description="distance to the nearest subject's best face")
    candidates: list[Candidate]


class IdentifyResponse(ModelInfo):
    threshold: float
    threshold_source: Literal["identification-fpir", "request", "server", "verification"]
    fpir: float | None = Field(description="the FPIR target the threshold was set for (null: not set from one)")
    gallery_size: int = Field(description="enrolled faces searched")
    fpir_expected: float | None
    threshold_clamped: Literal["strictest", "most-lenient"] | None
    faces_detected: int
    faces: list[IdentifiedFace]
    warning: str | None = None


class SubjectSummary(_Out):
    subject: str
    created_at: float = Field(description="Unix time")
    face_count: int
    faces_from_other_models: int


class SubjectsPage(_Out):
    subjects: list[SubjectSummary]
    total: int
    limit: int
    offset: int
    next: str | None


class StoredFace(_Out):
    face_id: str
    model: str
    model_sha256: str
    current_model: bool = Field(description="made by the server's face model (searched); else stored, not indexed")
    box: Box | None
    image: str | None
    created_at: float


class SubjectDetail(_Out):
    subject: str
    created_at: float | None
    face_count: int
    faces: list[StoredFace]


class DeletedSubject(_Out):
    subject: str
    deleted_faces: int


class DeletedFace(_Out):
    face_id: str
    subject: str


class GalleryStats(_Out):
    subjects: int
    faces: int
    indexed_faces: int
    faces_from_other_models: int
    index: str
    index_source: str
    model: str
    model_sha256: str


# ----- style transfer jobs ----------------------------------------------------------------------------------


class StyleJob(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    progress: float
    step: int
    total_steps: int | None
    loss: float | None
    queue_position: int | None
    eta_seconds: float | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    attempts: int
    error: str | None
    cancel_requested: bool
    parameters: dict[str, Any]
    feature_weights: str | None
    device: str | None
    owner: str | None = None  # the principal that submitted it (null for jobs from before owners were kept)
    links: dict[str, str]


class StyleJobList(BaseModel):
    jobs: list[StyleJob]
    total: int
    limit: int
    offset: int
    next: str | None
