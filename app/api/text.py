"""POST /text/classify: topic labels for texts, from a character-level CNN."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from app.api.schemas import PROBLEM_RESPONSES
from app.deps import Text
from app.services.results import TextClassifyResponse as TextClassifyResponse
from app.services.results import TextResult as TextResult

router = APIRouter(tags=["text"])


class TextClassifyRequest(BaseModel):
    """Texts to classify (Unicode; longer than the model's window: the start is used)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"texts": ["Federer beats Nadal in straight sets to reach the final", "Oil prices climb as OPEC cuts output"],
         "top_k": 2}]})
    texts: list[str] = Field(min_length=1, description="1 to CNN_MAX_TEXTS_PER_REQUEST non-empty texts")
    model: str | None = Field(None, description="text model (default: the service's default text model)")
    top_k: int = Field(5, ge=1, le=100, description="labels per text")


@router.post("/text/classify", response_model=TextClassifyResponse, responses=PROBLEM_RESPONSES,
             summary="Classify texts")
async def classify_text(body: TextClassifyRequest, service: Text) -> TextClassifyResponse:
    """Top-k labels for each text; probabilities are softmax outputs."""
    return await service.classify(body.texts, body.model, body.top_k)
