"""Multipart upload helpers shared by the routers."""

from __future__ import annotations

from fastapi import UploadFile

from app.errors import InvalidParameters


def single_file(files: list[UploadFile] | None, field: str) -> UploadFile | None:
    """The one file of a field that takes one image: a repeated field is a 422, never silently the last file."""
    if not files:
        return None
    if len(files) > 1:
        raise InvalidParameters(f"{field}: one image expected, {len(files)} sent", extra={"field": field})
    return files[0]
