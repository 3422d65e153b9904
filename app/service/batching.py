"""Micro-batching: concurrent requests for one model and op share one forward pass."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from app.errors import Overloaded, ServiceError, ShuttingDown, Unavailable
from app.metrics import Metrics
from app.service.stats import InferenceStats, record_pass, recording
from app.service.work_log import current_work
from app.tracing import span

if TYPE_CHECKING:
    from opentelemetry.trace import Span, SpanContext, Tracer

logger = logging.getLogger("app.service.batching")

Inputs = dict[str, Tensor]
RunBatch = Callable[[str, Inputs], Inputs]


class RequestTimeout(Unavailable):
    """The request waited past its deadline; answered instead of piling up."""

    status_code = 504
    reason = "timeout"


@dataclass
class _Job:
    op: str
    inputs: Inputs
    images: int
    future: asyncio.Future[Inputs]
    stats: InferenceStats | None = None  # what the request counts into (v2's statistics)
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    batch_images: int = 0  # images in the forward pass that answered it
    # With tracing on: the request's span (the batch links to it) and its queue wait.
    request_span: SpanContext | None = None
    queue_span: Span | None = None


class MicroBatcher:
    """Per-model queue and worker. Jobs of the same op are concatenated along the batch axis,
    up to `max_batch_images` images, and run in one forward pass on a dedicated thread.

    No job waits for a batch to fill: the worker takes whatever is queued the moment it is
    free, so a lone request runs at once, and under load the batch grows by itself while
    the previous forward pass runs. `max_wait_s` > 0 adds a short wait to gather more.

    With a `tracer`, each job's time in the queue is a span of its request, and each batch a
    span (its size an attribute, a link to every request in it, the first one its parent)
    around a span per forward pass.
    """

    def __init__(
        self,
        name: str,
        run: RunBatch,
        metrics: Metrics,
        *,
        max_batch_images: int,
        max_queue_images: int,
        max_wait_s: float = 0.0,
        timeout_s: float = 30.0,
        tracer: Tracer | None = None,
    ) -> None:
        self.name = name
        self._tracer = tracer
        self._run = run
        self._metrics = metrics
        self._max_batch = max_batch_images
        self._max_queue = max_queue_images
        self._max_wait = max_wait_s
        self._timeout = timeout_s
        self._pending: deque[_Job] = deque()
        self._queued_images = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{name}")
        self._worker: asyncio.Task[None] | None = None
        self._running: list[_Job] = []  # the jobs of the forward pass under way
        self._stopping = False

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self, timeout_s: float | None = None) -> None:
        """Refuse new jobs, let queued and running ones finish for at most `timeout_s` (default:
        the request timeout, after which their callers have given up anyway), then stop the
        worker and answer what is left with ShuttingDown."""
        self._stopping = True
        in_flight = [j.future for j in (*self._running, *self._pending) if not j.future.done()]
        if in_flight and self._worker is not None and not self._worker.done():
            drain = self._timeout if timeout_s is None else timeout_s
            _, unfinished = await asyncio.wait(in_flight, timeout=drain)
            if unfinished:
                logger.warning("stopping %r with %d job(s) unfinished", self.name, len(unfinished))
        # Taken before the worker is cancelled: cancelling it clears the running pass's jobs.
        left = [*self._running, *self._pending]
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for job in (*left, *self._pending):
            if not job.future.done():
                job.future.set_exception(ShuttingDown("the server is shutting down; retry"))
        self._pending.clear()
        # A pass still running after the drain is stuck: waiting for its thread here would block
        # the event loop (the thread ends with its pass; the process waits for it at exit).
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, op: str, inputs: Inputs) -> Inputs:
        """Queue one request's inputs (leading axis = its images) and await its outputs."""
        images = next(iter(inputs.values())).shape[0]
        if self._stopping:
            raise ShuttingDown(f"model {self.name!r} is shutting down; retry", retry_after=1)
        if self._queued_images + images > self._max_queue:
            raise Overloaded(
                f"model {self.name!r} has {self._queued_images} images queued (limit "
                f"{self._max_queue}); retry shortly",
                retry_after=1,
            )
        job = _Job(op, inputs, images, asyncio.get_running_loop().create_future(), recording.get())
        if self._tracer is not None:
            self._trace_queue(job)
        self._pending.append(job)
        self._queued_images += images
        self._metrics.queue_depth.labels(self.name).set(self._queued_images)
        self._wakeup.set()
        try:
            outputs = await asyncio.wait_for(asyncio.shield(job.future), self._timeout)
        except TimeoutError:
            raise RequestTimeout(
                f"the request waited more than {self._timeout:g} s for model {self.name!r}; "
                "retry, or send fewer images per request"
            ) from None
        finally:
            # A job that timed out (or whose client went away) is dropped if still queued.
            if not job.future.done():
                job.future.cancel()
            if job.queue_span is not None and job.queue_span.is_recording():
                job.queue_span.end()  # dropped from the queue unanswered
        work = current_work.get()
        if work is not None:
            work.batch(job.batch_images)
        return outputs

    def _trace_queue(self, job: _Job) -> None:
        from opentelemetry import trace

        assert self._tracer is not None
        job.request_span = trace.get_current_span().get_span_context()
        job.queue_span = self._tracer.start_span(
            "queue wait",
            attributes={"vae.model": self.name, "vae.op": job.op, "vae.images": job.images},
        )

    def _take_batch(self) -> list[_Job]:
        """The oldest job plus queued jobs of the same op that fit under the image cap."""
        first = self._pending.popleft()
        batch, total, keep = [first], first.images, deque[_Job]()
        # Once the batch is full nothing else fits: stop scanning (a long queue under the
        # naive VAE_MAX_BATCH_IMAGES=1 would otherwise be walked once per request).
        while self._pending and total < self._max_batch:
            job = self._pending.popleft()
            if job.op == first.op and total + job.images <= self._max_batch:
                batch.append(job)
                total += job.images
            else:
                keep.append(job)
        keep.extend(self._pending)
        self._pending = keep
        return batch

    async def _loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                if self._max_wait > 0:
                    await asyncio.sleep(self._max_wait)
                jobs = self._take_batch()
                for job in jobs:
                    if job.queue_span is not None:
                        job.queue_span.end()
                self._queued_images -= sum(j.images for j in jobs)
                self._metrics.queue_depth.labels(self.name).set(self._queued_images)
                live = [j for j in jobs if not j.future.done()]
                if live:
                    self._running = live
                    try:
                        with self._batch_span(live):
                            await self._run_jobs(live)
                    finally:
                        self._running = []

    def _batch_span(self, jobs: list[_Job]) -> contextlib.AbstractContextManager[Any]:
        if self._tracer is None:
            return contextlib.nullcontext()
        from opentelemetry import trace

        linked = [
            job.request_span
            for job in jobs
            if job.request_span is not None and job.request_span.is_valid
        ]
        attributes: dict[str, str | int] = {
            "vae.model": self.name,
            "vae.op": jobs[0].op,
            "vae.batch.size": sum(job.images for job in jobs),
            "vae.batch.requests": len(jobs),
        }
        # The batch belongs to every request in it: the first is its parent (so a request
        # alone in its batch has the whole tree in its trace), each is linked.
        return self._tracer.start_as_current_span(
            "batch",
            context=trace.set_span_in_context(trace.NonRecordingSpan(linked[0]))
            if linked
            else None,
            links=[trace.Link(context) for context in linked],
            attributes=attributes,
        )

    async def _run_jobs(self, jobs: list[_Job]) -> None:
        op = jobs[0].op
        began = time.perf_counter_ns()
        for job in jobs:
            if job.stats is not None:
                job.stats.queue.add(began - job.enqueued_ns)
        try:
            outputs = await self._forward(op, jobs)
        except Exception as exc:
            if len(jobs) == 1:
                _fail(jobs[0], exc)
                return
            # One bad request must not fail the others it was batched with: retry alone.
            for job in jobs:
                job.batch_images = job.images
                try:
                    (alone,) = await self._forward(op, [job])
                    _succeed(job, alone)
                except Exception as single_exc:
                    _fail(job, single_exc)
            return
        total = sum(job.images for job in jobs)
        for job, output in zip(jobs, outputs, strict=True):
            job.batch_images = total
            _succeed(job, output)

    async def _forward(self, op: str, jobs: list[_Job]) -> list[Inputs]:
        """One forward pass over the jobs' inputs joined; each job's rows of the outputs."""
        began = time.perf_counter_ns()
        inputs = {k: torch.cat([j.inputs[k] for j in jobs]) for k in jobs[0].inputs}
        images = next(iter(inputs.values())).shape[0]
        joined = time.perf_counter_ns()
        loop = asyncio.get_running_loop()
        with span(self._tracer, "model pass", {"vae.op": op, "vae.images": images}):
            outputs = await loop.run_in_executor(self._executor, self._run, op, inputs)
        ran = time.perf_counter_ns()
        self._metrics.inference_duration.labels(self.name, op).observe((ran - joined) / 1e9)
        self._metrics.batch_size.labels(self.name, op).observe(images)
        parts, start = [], 0
        for job in jobs:
            parts.append({k: v[start : start + job.images] for k, v in outputs.items()})
            start += job.images
        split = time.perf_counter_ns() - ran
        record_pass((j.stats for j in jobs), images, joined - began, ran - joined, split)
        return parts


def _succeed(job: _Job, outputs: Inputs) -> None:
    if not job.future.done():
        job.future.set_result(outputs)


def _fail(job: _Job, exc: Exception) -> None:
    if not isinstance(exc, ServiceError):
        logger.error("forward pass %r failed: %r", job.op, exc, exc_info=exc)
    if not job.future.done():
        job.future.set_exception(exc)
