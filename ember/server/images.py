"""/v1/images/generations over a ``DiffusionPipeline`` (``ember.load`` of a diffusion folder).

The pipeline's ``generate`` is synchronous, so requests run one at a time on a worker
thread (each call already fuses a request's images into shared UNet calls); at most
``ServerLimits.max_queue`` requests wait, beyond that 429 + ``Retry-After``. A client
that disconnects while its request is still queued drops it before it runs; one that is
already running finishes (the pipeline has no mid-loop cancel) and is discarded.
Images come back as base64 PNG (``response_format: "b64_json"``; ``url`` is not offered).
"""
from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from ember.errors import InputError
from ember.server import openai_schema as oa
from ember.server.completions import CLIENT_CLOSED
from ember.server.limits import ServerLimits
from ember.server.metrics import ServerMetrics
from ember.server.streaming import wait_disconnect

DEFAULT_IMAGE_QUEUE = 8


class _Job:
    def __init__(self, req: oa.ImageRequest):
        self.req = req
        self.abandoned = threading.Event()  # set when nobody waits for the answer any more


class ImageService:
    """Validates image requests and runs them, one at a time, on a worker thread."""

    def __init__(self, pipeline: Any, limits: ServerLimits, metrics: ServerMetrics, model_name: str):
        self.pipeline, self.metrics, self.model_name = pipeline, metrics, model_name
        self.max_queue = limits.max_queue if limits.max_queue is not None else DEFAULT_IMAGE_QUEUE
        self.pending = 0  # queued + running (event loop only)
        self.jobs: set[_Job] = set()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="ember-images")
        self._seconds_per_job = 10.0  # running estimate for Retry-After

    def _run(self, job: _Job) -> Any:
        if job.abandoned.is_set():
            return None
        r = job.req
        size = r.width_height()
        return self.pipeline.generate([r.prompt] * r.n, negative_prompt=r.negative_prompt or "",
                                      steps=r.num_inference_steps, seed=0 if r.seed is None else r.seed,
                                      guidance_scale=r.guidance_scale, height=size[1] if size else None,
                                      width=size[0] if size else None)

    async def generate(self, body: Any, receive: Receive) -> Response:
        req = oa.parse(oa.ImageRequest, body)
        oa.check_texts(req.text_fields())
        if req.model is not None and req.model != self.model_name:
            raise oa.ApiError(404, f"model {req.model!r} is not served here; this server serves {self.model_name!r}",
                              param="model", code="model_not_found")
        req.width_height()  # validate before queueing
        if self.pending > self.max_queue:
            wait = max(1, round(self._seconds_per_job * self.pending))
            raise oa.ApiError(429, f"image queue is full ({self.pending} requests ahead); retry later",
                              type="overloaded", code="queue_full", headers={"Retry-After": str(wait)})
        job = _Job(req)
        self.pending += 1
        self.jobs.add(job)
        t0 = time.perf_counter()
        work = asyncio.get_running_loop().run_in_executor(self._worker, self._run, job)

        def finished(_: Any) -> None:
            self.pending -= 1
            self.jobs.discard(job)
        work.add_done_callback(finished)
        gone = asyncio.ensure_future(wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                job.abandoned.set()
        if work not in done:
            self.metrics.disconnects += 1
            return Response(status_code=CLIENT_CLOSED)
        try:
            result = work.result()
        except InputError as e:
            raise oa.ApiError(400, str(e)) from None
        except Exception as e:  # noqa: BLE001 - this request fails alone; the next one runs
            raise oa.ApiError(500, f"image generation failed: {type(e).__name__}: {e}", type="server_error") from None
        if result is None:
            raise oa.ApiError(503, "the request was cancelled (server shutting down)", type="service_unavailable")
        seconds = time.perf_counter() - t0
        self.metrics.image_latency.observe(seconds)
        self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * result.timings.get("total_s", seconds)
        return JSONResponse({"created": int(time.time()),
                             "data": [{"b64_json": png_base64(img), "revised_prompt": None} for img in result.images],
                             "ember": {"timings": result.timings, "notes": result.notes}})

    def cancel_inflight(self) -> int:
        """Drop every queued request (drain deadline); the running one finishes. Returns how many."""
        jobs = list(self.jobs)
        for j in jobs:
            j.abandoned.set()
        return len(jobs)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


def png_base64(image: Any) -> str:
    """uint8 [H, W, 3] -> base64 PNG text."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
