"""Neural style transfer jobs: submit (202), poll, fetch the result or a preview, cancel, list."""

from __future__ import annotations

import asyncio
import io
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from fastapi.responses import JSONResponse
from PIL import Image

from app.api.schemas import PROBLEM_RESPONSES
from app.api.uploads import single_file
from app.deps import Caller, StyleJobsDep
from app.services.results import StyleJob as StyleJob
from app.services.results import StyleJobList as StyleJobList
from app.services.style import encode_image, read_job_file

router = APIRouter(tags=["style transfer"])
MAX_OFFSET = 2**31 - 1  # pagination offsets beyond this are a 422 (SQLite integers overflow at 2**63)
JOB_RESPONSES: dict[int | str, dict[str, Any]] = {**PROBLEM_RESPONSES, 404: {
    **PROBLEM_RESPONSES[404], "description": "Unknown job (or another caller's: its existence is not revealed), "
    "deleted, expired or evicted"}}
NOT_YET: dict[int | str, dict[str, Any]] = {409: {
    **PROBLEM_RESPONSES[404], "description": "The job has no such image yet (see job_status)"}}


async def _read(f: UploadFile, limit: int) -> tuple[str, bytes]:
    return f.filename or "upload", await f.read(limit + 1)


@router.post("/style-transfer", status_code=202, response_model=StyleJob, responses={**PROBLEM_RESPONSES, 202: {
    "description": "queued", "headers": {"Location": {"description": "the job's URL", "schema": {"type": "string"}}}}},
             summary="Submit a style-transfer job")
async def submit(
    jobs: StyleJobsDep,
    caller: Caller,
    content: Annotated[list[UploadFile], File(description="the photograph to restyle (one file)")],
    style: Annotated[list[UploadFile], File(description="style image(s); repeat the field to blend several")],
    steps: Annotated[int | None, Form(description="optimisation steps (default 300)")] = None,
    size: Annotated[int | None, Form(description="longest side of the result in pixels (default 512)")] = None,
    content_weight: Annotated[float | None, Form(description="alpha")] = None,
    style_weight: Annotated[float | None, Form(description="beta")] = None,
    tv_weight: Annotated[float | None, Form(description="total-variation weight")] = None,
    init: Annotated[Literal["content", "noise"] | None, Form()] = None,
    optimizer: Annotated[Literal["lbfgs", "adam"] | None, Form()] = None,
    lr: Annotated[float | None, Form(description="Adam learning rate")] = None,
    style_blend: Annotated[str | None, Form(description="comma-separated weight per style image")] = None,
    preserve_colors: Annotated[bool | None, Form(description="keep the content's colours")] = None,
    multires: Annotated[int | None, Form(description="coarse-to-fine levels, 1 = off")] = None,
    seed: Annotated[int | None, Form()] = None,
) -> JSONResponse:
    """Queue a job: 202 Accepted, `Location: /style-transfer/{id}`, and the job."""
    limit = jobs.limits.max_image_bytes
    blend: list[Any] | None = None
    if style_blend is not None:
        blend = [p.strip() for p in style_blend.split(",") if p.strip()]
    raw = {"steps": steps, "size": size, "content_weight": content_weight, "style_weight": style_weight,
           "tv_weight": tv_weight, "init": init, "optimizer": optimizer, "lr": lr, "style_blend": blend,
           "preserve_colors": preserve_colors, "multires": multires, "seed": seed}
    one = single_file(content, "content")
    assert one is not None  # the field is required
    c = await _read(one, limit)
    s = [await _read(f, limit) for f in style]
    # decodes the images and writes files: off the loop; the job belongs to the caller
    job = await asyncio.to_thread(lambda: jobs.submit(c, s, raw, owner=caller.name))
    body = jobs.view(job).model_dump()
    return JSONResponse(body, status_code=202, headers={"Location": f"/style-transfer/{job.id}"})


@router.get("/style-transfer", response_model=StyleJobList, responses=PROBLEM_RESPONSES, summary="Recent jobs")
async def list_jobs(
    jobs: StyleJobsDep,
    caller: Caller,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    status: Annotated[Literal["queued", "running", "succeeded", "failed", "canceled"] | None, Query()] = None,
) -> StyleJobList:
    """Jobs, newest first: the caller's own; every job for an admin, or when API keys are off."""
    return jobs.page(limit=limit, offset=offset, status=status, owner=caller.owner_filter)


@router.get("/style-transfer/{job_id}", response_model=StyleJob, responses=JOB_RESPONSES, summary="One job")
async def get_job(job_id: str, jobs: StyleJobsDep, caller: Caller) -> StyleJob:
    """Status, progress (0..1), step, loss, queue position or ETA, timestamps, error and links."""
    return jobs.view(jobs.get(job_id, owner=caller.owner_filter))


@router.get("/style-transfer/{job_id}/result", responses={**JOB_RESPONSES, **NOT_YET, 200: {
    "content": {"image/png": {}, "image/jpeg": {}}, "description": "the stylised image"}}, summary="The result",
    response_class=Response)
async def get_result(job_id: str, jobs: StyleJobsDep, caller: Caller,
                     format: Annotated[Literal["png", "jpeg"], Query(description="image format")] = "png",
                     ) -> Response:
    """The result image once the job succeeded (409 before)."""
    path = jobs.result(job_id, owner=caller.owner_filter)
    # read whole (a few MB at most), not streamed: a job evicted meanwhile is then a 404, not a broken response
    png = await asyncio.to_thread(read_job_file, path)
    if format == "png":
        return Response(png, media_type="image/png",
                        headers={"Content-Disposition": f'attachment; filename="{job_id}.png"'})

    def to_jpeg() -> bytes:
        with Image.open(io.BytesIO(png)) as img:
            return encode_image(img, "JPEG")

    return Response(await asyncio.to_thread(to_jpeg), media_type="image/jpeg",
                    headers={"Content-Disposition": f'inline; filename="{job_id}.jpg"'})


@router.get("/style-transfer/{job_id}/preview", responses={**JOB_RESPONSES, **NOT_YET, 200: {
    "content": {"image/png": {}}, "description": "the latest intermediate image"}}, summary="Latest preview",
    response_class=Response)
async def get_preview(job_id: str, jobs: StyleJobsDep, caller: Caller) -> Response:
    """The latest intermediate image while running (the result once succeeded)."""
    path = jobs.preview(job_id, owner=caller.owner_filter)
    png = await asyncio.to_thread(read_job_file, path)
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.delete("/style-transfer/{job_id}", responses={**JOB_RESPONSES, 200: {"model": StyleJob},
               204: {"description": "a finished job and its files were deleted"}}, summary="Cancel or delete")
async def delete_job(job_id: str, jobs: StyleJobsDep, caller: Caller) -> Response:
    """Cancel a queued job at once or a running one within a step or two; delete a finished job's files."""
    # off the loop: deleting files (and evicting old finished jobs after a cancel) touches the disk
    job = await asyncio.to_thread(lambda: jobs.cancel_or_delete(job_id, owner=caller.owner_filter))
    if job is None:
        return Response(status_code=204)
    return JSONResponse(jobs.view(job).model_dump())
