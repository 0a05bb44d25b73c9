"""POST /explain: one image's prediction plus its Grad-CAM map (core: `service.pathology.gradcam`).

The prediction takes /predict's path through the core (admission, one queue slot, the shared
per-image outcome); the map is one more model run fetching only the two Grad-CAM outputs.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Final

import numpy as np
from fastapi import APIRouter, Query, Request
from numpy.typing import NDArray

from service.core.decode_pool import PixelAllowance
from service.core.model_client import Classified, ModelClient, Slots
from service.core.pipeline import Outcome, decode
from service.core.state import ServiceState
from service.errors import ModelNotReady
from service.http.guards import guarded, unless_disconnected
from service.http.schemas import (
    ERROR_RESPONSES,
    ErrorResponse,
    ExplainResponse,
    ExplanationInfo,
    b64,
    multipart_body,
    prediction,
)
from service.http.uploads import MultipartBody, RouteLimits, Upload
from service.model.manifest import FEATURE_MAPS
from service.model.preprocess import Probe, probe_image
from service.pathology.gradcam import (
    EXPLAIN_OVERLAY_MAX_SIDE,
    check_class,
    class_index,
    display_image,
    grad_cam,
    normalised,
    overlay_png,
    require_cam_outputs,
)

router = APIRouter()

_EXPLAIN_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    **ERROR_RESPONSES,
    422: {"model": ErrorResponse, "description": "missing field, not a decodable image, or unknown class"},
    409: {"model": ErrorResponse, "description": "the model being served has no Grad-CAM outputs"},
}


def _probe(data: bytes, max_pixels: int) -> Probe:
    return probe_image(data, EXPLAIN_OVERLAY_MAX_SIDE, max_pixels=max_pixels)


async def _explain_upload(
    service: ServiceState, model: ModelClient, slots: Slots, upload: Upload, requested_class: str | None
) -> tuple[Classified, NDArray[np.float32], int, bytes, tuple[int, int]]:
    with Outcome(service.observer) as outcome:  # counted as every other admitted image
        if upload.error is not None:
            raise upload.error
        allowance = PixelAllowance(service.settings.max_request_pixels)
        image = await decode(service, upload.data, model.input_size, allowance)
        result = outcome.classified(*await model.infer(slots, image))
    index = class_index(model.manifest, requested_class, result.probabilities)
    decoder = service.decoder
    if decoder is None:
        raise ModelNotReady("the server is not started")
    loop = asyncio.get_running_loop()
    cam = await grad_cam(model, image, index)
    # The overlay's picture is a second decode of the upload: a large one goes to the large lane.
    probe = await loop.run_in_executor(decoder.pool, _probe, upload.data, service.settings.max_image_pixels)
    lane = decoder.large_lane if probe.decode_pixels >= service.settings.large_image_pixels else decoder.pool
    display = await loop.run_in_executor(lane, display_image, upload.data)
    png = await loop.run_in_executor(decoder.pool, overlay_png, display, cam)
    return result, cam, index, png, (display.shape[1], display.shape[0])


@router.post(
    "/explain",
    summary="Classify one image and show where the model looked (Grad-CAM)",
    description=(
        "Multipart field `file` (as /predict). Optional query parameter `class` (e.g. `?class=lung_scc`): "
        "the class to explain, by default the predicted one. Answers /predict's fields plus `explanation`: "
        "the Grad-CAM map of the last convolutional block as numbers (`grid`, normalised to its peak) and "
        "as a PNG overlay on the image (`overlay_png`, base64). 409 when the served model has no Grad-CAM outputs."
    ),
    responses=_EXPLAIN_ERRORS,
    openapi_extra=multipart_body("file", many=False),
)
async def explain_image(
    request: Request,
    class_name: Annotated[
        str | None, Query(alias="class", description="class to explain; default: the predicted one")
    ] = None,
) -> ExplainResponse:
    service: ServiceState = request.app.state.service
    limits: RouteLimits = request.app.state.upload_limits
    async with guarded(service):
        model = service.current()
        # Before reading anything: a 409 or 422 costs nothing.
        require_cam_outputs(model.manifest, model.output_names)
        check_class(model.manifest, class_name)
        async with service.admit(MultipartBody.of(request, limits.predict)) as (upload,):
            model = service.current()  # a reload may have swapped it while the body came in
            with model.reserve(1) as slots:
                result, cam, index, png, (width, height) = await unless_disconnected(
                    _explain_upload(service, model, slots, upload, class_name), request.receive
                )
    answer = prediction(result)
    grid = normalised(cam)
    return ExplainResponse(
        **answer.model_dump(),
        explanation=ExplanationInfo(
            layer=FEATURE_MAPS,
            class_name=result.manifest.classes[index],
            grid=[[round(float(v), 4) for v in row] for row in grid],
            grid_peak=float(cam.max()) if cam.size else 0.0,
            overlay_png=b64(png),
            overlay_width=width,
            overlay_height=height,
        ),
    )
