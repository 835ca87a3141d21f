"""Text categorisation, declared: POST /text/classify over the text-classification models."""

from __future__ import annotations

from app.api import text
from app.application import AppContext, Application, Started
from app.gate import RoutePolicy
from app.runtime.registry import LoadedTextClassifier
from app.services.text import TextService


async def start(ctx: AppContext) -> Started:
    """The text service over the pool of text classifiers."""
    s = ctx.settings
    assert ctx.pool is not None
    return Started(TextService(ctx.pool, max_texts=s.max_texts_per_request, max_text_chars=s.max_text_chars))


APP = Application(
    name="text", start=start, routers=(text.router,), task="text-classification", adapter=LoadedTextClassifier,
    models=lambda s: s.text_models, default_model=lambda s: s.default_text_model,
    policies={("POST", "/text/classify"): RoutePolicy("read", "text")},
)
