"""Text categorisation: validate texts -> micro-batched character-level CNN -> top-k labels."""

from __future__ import annotations

import asyncio

from app.errors import InvalidParameters
from app.runtime.registry import LoadedTextClassifier
from app.services.classification import top_k
from app.services.pool import ModelPool
from app.services.results import TextClassifyResponse, TextResult

# texts up to this many characters in all are checked and measured on the event loop (tens of microseconds:
# about 50 us for 4,000 characters of the character encoding on a 2-core build machine); longer ones in a thread
INLINE_CHARS = 2048


class TextService:
    """Serves every loaded text classifier through its own micro-batcher."""

    def __init__(self, pool: ModelPool[LoadedTextClassifier], *, max_texts: int, max_text_chars: int) -> None:
        self.pool = pool
        self.max_texts = max_texts
        self.max_text_chars = max_text_chars

    @property
    def default_model(self) -> str | None:
        """The model used when a request names none."""
        return self.pool.default_model

    def validate(self, texts: list[str]) -> None:
        """422 naming the offending index for empty, blank or over-long texts; 422 for too many texts."""
        if not texts:
            raise InvalidParameters("texts: at least one text is required")
        if len(texts) > self.max_texts:
            raise InvalidParameters(f"texts: {len(texts)} texts sent; at most {self.max_texts} per request")
        for i, t in enumerate(texts):
            if not t.strip():
                raise InvalidParameters(f"texts[{i}] is empty or whitespace only", extra={"index": i})
            if len(t) > self.max_text_chars:
                raise InvalidParameters(f"texts[{i}] has {len(t)} characters; at most {self.max_text_chars}",
                                        extra={"index": i})

    async def classify(self, texts: list[str], model: str | None, k: int) -> TextClassifyResponse:
        """Top-k labels for each text."""
        if not texts or len(texts) > self.max_texts:  # cheap, and bounds the work handed to the thread below
            self.validate(texts)
        name, loaded = self.pool.resolve(model)
        window = loaded.encoding.length

        def check_and_measure() -> list[bool]:
            # scanning and normalising up to max_texts x max_text_chars characters is CPU work: on the loop only
            # when it is small (INLINE_CHARS), where a hop to a worker thread and back would cost more than it
            self.validate(texts)
            return [len(loaded.encoding.prepare(t)) > window for t in texts]

        if sum(len(t) for t in texts) <= INLINE_CHARS:  # len() is O(1); the count of texts is bounded above
            truncated = check_and_measure()
        else:
            truncated = await asyncio.to_thread(check_and_measure)
        probs = await self.pool.run(name, texts, loaded)
        labels = loaded.spec.labels
        results = [TextResult(top_k=top_k(p, labels, k), truncated=cut)
                   for p, cut in zip(probs, truncated, strict=True)]
        return TextClassifyResponse(model=name, weights=loaded.weights_tag, weights_source=loaded.weights_source,
                                    window=window, results=results,
                                    window_unit=loaded.encoding.unit)  # type: ignore[arg-type]  # validated here
