"""What a request's model work was (model, version, images, batch size), noted by the service
side for the request's access log line."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass
class WorkNote:
    """Filled in as the request's jobs run; None where the request ran no model work. A request
    that runs several jobs (variations, interpolate) keeps its largest images and batch."""

    model: str | None = None
    model_version: str | None = None
    images: int | None = None
    batch_size: int | None = None  # images in the forward pass (micro-batch) the job ran in

    def job(self, model: str, model_version: str | None, images: int) -> None:
        self.model, self.model_version = model, model_version
        self.images = max(images, self.images or 0)

    def batch(self, images: int) -> None:
        self.batch_size = max(images, self.batch_size or 0)


# Set per request by the access log (app.http.access_log) only: None when it is off, so the
# service side skips the notes.
current_work: ContextVar[WorkNote | None] = ContextVar("current_work", default=None)
