"""Neural style transfer jobs: submit (202), poll, fetch the result or a preview, cancel, list."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image
from pydantic import BaseModel

from app.api.schemas import PROBLEM_RESPONSES
from app.deps import StyleJobsDep
from app.services.style import encode_image

router = APIRouter(tags=["style transfer"])


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
    links: dict[str, str]


class StyleJobList(BaseModel):
    jobs: list[StyleJob]
    total: int
    limit: int
    offset: int
    next: str | None


async def _read(f: UploadFile, limit: int) -> tuple[str, bytes]:
    return f.filename or "upload", await f.read(limit + 1)


@router.post("/style-transfer", status_code=202, response_model=StyleJob, responses=PROBLEM_RESPONSES,
             summary="Submit a style-transfer job")
async def submit(
    jobs: StyleJobsDep,
    content: Annotated[UploadFile, File(description="the photograph to restyle")],
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
    c = await _read(content, limit)
    s = [await _read(f, limit) for f in style]
    job = await asyncio.to_thread(jobs.submit, c, s, raw)  # decodes the images and writes files: off the loop
    body = StyleJob.model_validate(jobs.view(job)).model_dump()
    return JSONResponse(body, status_code=202, headers={"Location": f"/style-transfer/{job.id}"})


@router.get("/style-transfer", response_model=StyleJobList, responses=PROBLEM_RESPONSES, summary="Recent jobs")
async def list_jobs(
    jobs: StyleJobsDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
    status: Annotated[Literal["queued", "running", "succeeded", "failed", "canceled"] | None, Query()] = None,
) -> StyleJobList:
    """Jobs, newest first."""
    page, total = jobs.store.list_jobs(limit=limit, offset=offset, status=status)
    nxt = f"/style-transfer?limit={limit}&offset={offset + limit}" if offset + limit < total else None
    if nxt and status:
        nxt += f"&status={status}"
    return StyleJobList(jobs=[StyleJob.model_validate(jobs.view(j)) for j in page], total=total, limit=limit,
                        offset=offset, next=nxt)


@router.get("/style-transfer/{job_id}", response_model=StyleJob, responses=PROBLEM_RESPONSES, summary="One job")
async def get_job(job_id: str, jobs: StyleJobsDep) -> StyleJob:
    """Status, progress (0..1), step, loss, queue position or ETA, timestamps, error and links."""
    return StyleJob.model_validate(jobs.view(jobs.get(job_id)))


@router.get("/style-transfer/{job_id}/result", responses={**PROBLEM_RESPONSES, 200: {
    "content": {"image/png": {}, "image/jpeg": {}}, "description": "the stylised image"}}, summary="The result")
async def get_result(job_id: str, jobs: StyleJobsDep,
                     format: Annotated[Literal["png", "jpeg"], Query(description="image format")] = "png",
                     ) -> Response:
    """The result image once the job succeeded (409 before)."""
    path = jobs.result(job_id)
    if format == "png":
        return FileResponse(path, media_type="image/png", filename=f"{job_id}.png")

    def to_jpeg() -> bytes:
        with Image.open(path) as img:
            return encode_image(img, "JPEG")

    return Response(await asyncio.to_thread(to_jpeg), media_type="image/jpeg",
                    headers={"Content-Disposition": f'inline; filename="{job_id}.jpg"'})


@router.get("/style-transfer/{job_id}/preview", responses={**PROBLEM_RESPONSES, 200: {
    "content": {"image/png": {}}, "description": "the latest intermediate image"}}, summary="Latest preview")
async def get_preview(job_id: str, jobs: StyleJobsDep) -> FileResponse:
    """The latest intermediate image while running (the result once succeeded)."""
    return FileResponse(jobs.preview(job_id), media_type="image/png", headers={"Cache-Control": "no-store"})


@router.delete("/style-transfer/{job_id}", responses={**PROBLEM_RESPONSES, 200: {"model": StyleJob},
               204: {"description": "a finished job and its files were deleted"}}, summary="Cancel or delete")
async def delete_job(job_id: str, jobs: StyleJobsDep) -> Response:
    """Cancel a queued job at once or a running one within a step or two; delete a finished job's files."""
    job = jobs.cancel_or_delete(job_id)
    if job is None:
        return Response(status_code=204)
    return JSONResponse(StyleJob.model_validate(jobs.view(job)).model_dump())
