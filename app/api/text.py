"""POST /text/classify: topic labels for texts, from a character-level CNN."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from app.api.schemas import PROBLEM_RESPONSES, Prediction
from app.deps import Text

router = APIRouter(tags=["text"])


class TextClassifyRequest(BaseModel):
    """Texts to classify (Unicode; longer than the model's window: the start is used)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"texts": ["Federer beats Nadal in straight sets to reach the final", "Oil prices climb as OPEC cuts output"],
         "top_k": 2}]})
    texts: list[str] = Field(min_length=1, description="1 to CNN_MAX_TEXTS_PER_REQUEST non-empty texts")
    model: str | None = Field(None, description="text model (default: the service's default text model)")
    top_k: int = Field(5, ge=1, le=100, description="labels per text")


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


@router.post("/text/classify", response_model=TextClassifyResponse, responses=PROBLEM_RESPONSES,
             summary="Classify texts")
async def classify_text(body: TextClassifyRequest, service: Text) -> TextClassifyResponse:
    """Top-k labels for each text; probabilities are softmax outputs."""
    result = await service.classify(body.texts, body.model, body.top_k)
    return TextClassifyResponse.model_validate(result)
