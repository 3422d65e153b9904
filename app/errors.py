"""Domain exceptions the service raises; the HTTP layer maps them to responses in one place."""

from typing import Any

# The Open Inference Protocol's routes, whose errors are {"error": ...} as the protocol says.
V2_PREFIX = "/v2"


def error_body(path: str, message: Any) -> dict[str, Any]:
    """The JSON of an error answered to `path`: the REST API's {"detail": ...}, or under /v2
    the Open Inference Protocol's {"error": "..."} (always text, as its clients expect)."""
    if path == V2_PREFIX or path.startswith(V2_PREFIX + "/"):
        return {"error": message if isinstance(message, str) else str(message)}
    return {"detail": message}


# nginx's status for a request whose client went away before it was answered: no response
# reaches anyone, but the request is timed and counted under it, as the client's doing, not the
# server's (a 5xx would fire the error-ratio alert for any client that hangs up).
CLIENT_CLOSED_REQUEST = 499


class ServiceError(Exception):
    """A request the service refuses, with the HTTP status and metric label it maps to.

    `detail` is shown to the client, so it says what was wrong and how to fix it.
    `reason` labels `vae_requests_rejected_total{reason}`; it is a short, fixed
    vocabulary so the metric's cardinality stays bounded.
    """

    status_code: int = 500
    reason: str = "internal"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(ServiceError):
    """The input is well-formed but does not fit the model (wrong shape, label out of range)."""

    status_code = 400
    reason = "bad_request"


class ModelNotFound(ServiceError):
    """The request names a model the service has not loaded."""

    status_code = 404
    reason = "unknown_model"


class ManagementOff(ServiceError):
    """Model management was asked for while VAE_MODEL_CONTROL keeps it off."""

    status_code = 403
    reason = "management_off"


class PayloadTooLarge(ServiceError):
    """The upload is over a limit: bytes, pixels or number of files."""

    status_code = 413
    reason = "too_large"


class UnsupportedImage(ServiceError):
    """The bytes are not an image the service can decode."""

    status_code = 415
    reason = "bad_image"


class InvalidInput(ServiceError):
    """A parameter fails validation (out of range, wrong type, missing)."""

    status_code = 422
    reason = "invalid"


class Unavailable(ServiceError):
    """A temporary refusal; `retry_after` seconds becomes the Retry-After header."""

    status_code = 503

    def __init__(self, detail: str, *, retry_after: int = 1) -> None:
        if retry_after < 0:
            raise ValueError(f"retry_after must be >= 0 seconds, got {retry_after}")
        super().__init__(detail)
        self.retry_after = retry_after


class Overloaded(Unavailable):
    """The model's queue is full; the client should back off and retry."""

    reason = "overloaded"


class NotReady(Unavailable):
    """Models are still loading; the client should retry once readiness reports ready."""

    reason = "not_ready"


class ShuttingDown(Unavailable):
    """The server is stopping and takes no new work; the client should retry elsewhere."""

    reason = "shutting_down"


class InferenceFailed(ServiceError):
    """The forward pass raised: the server's fault, answered for the requests in that pass."""

    status_code = 500
    reason = "inference_failed"
