"""POST /classify: top-k labels for one or more uploaded images."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from app.api.schemas import PROBLEM_RESPONSES, ClassifyResponse
from app.deps import Classification
from app.services.classification import Upload

router = APIRouter(tags=["classification"])


@router.post("/classify", response_model=ClassifyResponse, responses=PROBLEM_RESPONSES, summary="Classify images")
async def classify(
    service: Classification,
    image: Annotated[list[UploadFile], File(description="one or more images (repeat the field)")],
    model: Annotated[str | None, Form(description="model name (default: the service's default classifier)")] = None,
    top_k: Annotated[int, Form(ge=1, le=100, description="classes per image")] = 5,
) -> ClassifyResponse:
    """Classify each uploaded image with the chosen model; probabilities are softmax outputs."""
    uploads = []
    for i, f in enumerate(image):
        # read at most one byte past the limit: enough to know the file is too large
        data = await f.read(service.max_image_bytes + 1)
        uploads.append(Upload(filename=f.filename or f"image[{i}]", data=data))
    return await service.classify(uploads, model or None, top_k)
