"""Schemathesis against the service's own /openapi.json, in process on the ASGI app.

Every operation gets schema-valid and schema-invalid requests (a fixed number, derandomized,
so CI sees the same ones every run): none may answer 5xx, and every answer must match the
schema (status code documented, content type, body, headers); invalid ones must be refused.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.checks import positive_data_acceptance
from schemathesis.python import asgi
from schemathesis.specs.openapi.schemas import OpenApiSchema

from app.main import create_app
from app.settings import Settings

pytestmark = pytest.mark.slow

EXAMPLES_PER_MODE = 60
# Validity that no schema can state: that the bytes of a `file` decode as an image, that a z
# row has the model's latent_dim, that a digit goes only to a conditional model. Schema-valid
# requests may therefore be refused with a documented 4xx, which this check would call a bug.
EXCLUDED_CHECKS = [positive_data_acceptance]
# Schema keywords that only describe a value; any other keyword constrains it.
DESCRIPTIVE = {"type", "title", "description"}


def can_be_invalid(operation: dict[str, Any]) -> bool:
    """Whether a request to the operation can break its schema: it has a body, or a parameter
    other than a free-form path segment (any text is a valid `{model_name}`)."""
    return "requestBody" in operation or any(
        parameter["in"] != "path" or set(parameter["schema"]) - DESCRIPTIVE
        for parameter in operation.get("parameters", [])
    )


# The operations and their generation modes, read from the app itself (building it loads
# nothing); an operation that no request can break has no schema-invalid requests.
CASES = [
    pytest.param(method.upper(), path, mode, id=f"{method.upper()} {path} {mode}")
    for path, item in create_app(Settings(checkpoints="unused")).openapi()["paths"].items()
    for method, operation in item.items()
    for mode in GenerationMode
    if mode == GenerationMode.POSITIVE or can_be_invalid(operation)
]


@pytest.fixture(scope="module")
def api_schema(trained_checkpoint: Path) -> Iterator[OpenApiSchema]:
    # max_samples stays small so that the largest valid /sample stays fast.
    app = create_app(Settings(checkpoints=str(trained_checkpoint), device="cpu", max_samples=16))
    try:
        # Loading the schema starts the app's lifespan (models loaded and warmed up).
        yield schemathesis.openapi.from_asgi("/openapi.json", app)
    finally:
        asgi.shutdown_lifespans()


V2_OPS = ("decode", "sample", "encode", "anomaly")


def served(case: Case, model: str, index: int) -> None:
    """Three requests in four to a v2 route name a served v2 model and its version, so that
    their bodies reach the parser rather than stopping at a 404 for a made-up name."""
    parameters = case.path_parameters or {}
    if "model_name" in parameters and index % 4:
        case.path_parameters = {
            **parameters,
            "model_name": f"{model}-{V2_OPS[index % len(V2_OPS)]}",
            **({"model_version": "1"} if "model_version" in parameters else {}),
        }


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_operation_conforms_to_its_schema(
    api_schema: OpenApiSchema,
    method: str,
    path: str,
    mode: GenerationMode,
    trained_checkpoint: Path,
) -> None:
    statuses: Counter[int] = Counter()

    @given(case=api_schema[path][method].as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_MODE,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def check(case: Case) -> None:
        served(case, trained_checkpoint.resolve().name, sum(statuses.values()))
        response = case.call_and_validate(excluded_checks=EXCLUDED_CHECKS)
        statuses[response.status_code] += 1

    check()
    assert statuses, "no request was made"
    assert max(statuses) < 500, statuses
    print(f"{method} {path} {mode}: {dict(sorted(statuses.items()))}")
