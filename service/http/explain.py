"""POST /explain: one image's prediction plus its Grad-CAM map (the door; the core is `service.pathology.explanation`).

The prediction takes /predict's path through the core: one queue slot before the body is read
(503 when full), the deadline, the decode pool, the batcher, the refer decision and the
metrics. The Grad-CAM map is one more ORT run of the same decoded input that fetches only the
`feature_maps` and `cam_weights` outputs, in the decode pool (the hot-path batches never fetch
them), followed by the overlay PNG.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Final

import numpy as np
from fastapi import APIRouter, Query, Request
from numpy.typing import NDArray

from service.core.admission import admitted_uploads
from service.core.decode_pool import PixelAllowance
from service.core.runtime import Classified, ImageReservation, ModelRuntime, ServiceState
from service.errors import LungserveError, ModelNotReady
from service.http.guards import deadline, unless_disconnected
from service.http.schemas import (
    ERROR_RESPONSES,
    ErrorResponse,
    ExplainResponse,
    ExplanationInfo,
    multipart_body,
    prediction,
)
from service.http.uploads import RouteLimits, Upload
from service.model.preprocess import Probe, probe_image
from service.pathology.explanation import (
    FEATURE_MAPS,
    OVERLAY_MAX_SIDE,
    b64,
    check_class,
    class_index,
    display_image,
    grad_cam,
    overlay_png,
    require_cam_outputs,
)
from service.pathology.gradcam import normalised

router = APIRouter()

_EXPLAIN_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    **ERROR_RESPONSES,
    422: {"model": ErrorResponse, "description": "missing field, not a decodable image, or unknown class"},
    409: {"model": ErrorResponse, "description": "the model being served has no Grad-CAM outputs"},
}


def _probe(data: bytes, max_pixels: int) -> Probe:
    return probe_image(data, OVERLAY_MAX_SIDE, max_pixels=max_pixels)


async def _explain_upload(
    service: ServiceState,
    runtime: ModelRuntime,
    reservation: ImageReservation,
    upload: Upload,
    requested_class: str | None,
) -> tuple[Classified, NDArray[np.float32], int, bytes, tuple[int, int]]:
    try:
        if upload.error is not None:
            raise upload.error
        manifest = runtime.engine.manifest
        allowance = PixelAllowance(service.settings.max_request_pixels)
        image = await service.decode(upload.data, runtime.engine.input_size, allowance)
        # The prediction and its decision come from the shared core, exactly as for /predict.
        result, info = await runtime.classify(reservation, image)
    except LungserveError as exc:
        service.observer.on_image_failed(exc)
        raise
    except asyncio.CancelledError:
        service.observer.on_image_abandoned()
        raise
    service.observer.on_classified(result, info)
    index = class_index(manifest, requested_class, result.probabilities)
    decoder = service.decoder
    if decoder is None:
        raise ModelNotReady("the server is not started")
    loop = asyncio.get_running_loop()
    cam = await loop.run_in_executor(decoder.pool, grad_cam, runtime.engine, image, index)
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
    settings = service.settings
    try:
        runtime = service.current()
        # Before reading anything: a 409 or 422 costs nothing.
        require_cam_outputs(runtime.engine.manifest, runtime.engine.output_names)
        check_class(runtime.engine.manifest, class_name)
        headers = request.headers
        # /predict's way in: readiness, declared size, queue and upload gate (503 before reading),
        # the body at the minimum rate, then one queue slot (a slow body never holds one).
        async with (
            deadline(settings.request_deadline_s),
            admitted_uploads(
                service, headers.get("content-type"), headers.get("content-length"), request.stream(), limits.predict
            ) as (upload,),
        ):
            runtime = service.current()
            with runtime.reserve(1) as reservation:
                result, cam, index, png, (width, height) = await unless_disconnected(
                    _explain_upload(service, runtime, reservation, upload, class_name), request.receive
                )
    except LungserveError as exc:
        service.observer.on_rejected(exc)
        raise
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
