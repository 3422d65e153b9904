"""The v2 models: each op of each loaded model is one Open Inference Protocol model named
`<model>-<op>`, with the tensors it takes and gives; it runs through the model's ModelHandle,
so through the same micro-batcher, limits and metrics as the REST routes."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast, get_args

import numpy as np

from app.errors import BadRequest, ModelNotFound, PayloadTooLarge
from app.http.schemas import MAX_LATENT_VALUE
from app.http.v2_protocol import DecodedRequest, OutputTensor, ParameterValue
from app.metrics import Metrics
from app.service.batching import RequestTimeout
from app.service.imaging import IMAGE_SIDE
from app.service.predict import ModelHandle, PriorName, draw_seed
from app.service.registry import LoadedModel
from app.service.repository import ModelRepository
from app.service.stats import InferenceStats, recording
from app.settings import Settings

PLATFORM = "pytorch"
# Before versions named revisions, each model had the one version "1": a client that still
# pins it gets the version serving by default (a digest is never "1").
LEGACY_VERSION = "1"
OPS = ("decode", "sample", "encode", "anomaly")
MAX_SEED = 2**63 - 1
MAX_TEMPERATURE = 2.0
# tritonclient's `timeout=`: the request's deadline in microseconds (0: the server's own).
# Every other request parameter an op does not take (`priority`, `sequence_id`, MLServer's
# `content_type`, ...) is passed over, as KServe ignores them and Triton passes them on.
TIMEOUT = "timeout"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's name, datatype and shape (-1: any size) as the model metadata gives them."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def configure(self) -> dict[str, Any]:
        """The tensor as Triton's model configuration gives it."""
        return {"name": self.name, "data_type": f"TYPE_{self.datatype}", "dims": list(self.shape)}

    def __str__(self) -> str:
        return f"{self.name} ({self.datatype} {list(self.shape)})"

    def fits(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.shape) and all(
            want in (-1, got) for want, got in zip(self.shape, shape, strict=True)
        )


@dataclass(frozen=True)
class V2Model:
    """One op of one loaded model, as a v2 model."""

    name: str
    op: str
    entry: LoadedModel
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    required: frozenset[str] = frozenset()
    parameters: tuple[str, ...] = ()  # the request parameters it takes
    stats: InferenceStats = field(default_factory=InferenceStats, compare=False, repr=False)

    @property
    def version(self) -> str:
        """The loaded revision this is (`LoadedModel.version`)."""
        return self.entry.version

    def metadata(self, versions: list[str]) -> dict[str, Any]:
        """GET /v2/models/{name}: the protocol's $metadata_model_response, with the versions
        loaded (oldest first)."""
        return {
            "name": self.name,
            "versions": versions,
            "platform": PLATFORM,
            "inputs": [spec.describe() for spec in self.inputs],
            "outputs": [spec.describe() for spec in self.outputs],
        }

    def config(self, settings: Settings) -> dict[str, Any]:
        """GET /v2/models/{name}/config: Triton's model configuration, as its JSON. No implicit
        batch dimension (max_batch_size 0): the shapes are the metadata's, -1 where any size
        goes, and the server batches requests together by itself (dynamic_batching)."""
        device = self.entry.device
        group: dict[str, Any] = {"name": self.name, "count": 1}
        if device.type == "cuda":
            group.update(kind="KIND_GPU", gpus=[device.index or 0])
        else:
            group["kind"] = "KIND_CPU"
        return {
            "name": self.name,
            "platform": PLATFORM,
            "max_batch_size": 0,
            "input": [
                {**spec.configure(), "optional": spec.name not in self.required}
                for spec in self.inputs
            ],
            "output": [spec.configure() for spec in self.outputs],
            "dynamic_batching": {
                "max_queue_delay_microseconds": round(settings.max_batch_wait_ms * 1000)
            },
            "instance_group": [group],
        }


def _fp32(name: str, *shape: int) -> TensorSpec:
    return TensorSpec(name, "FP32", shape)


def _int64(name: str, *shape: int) -> TensorSpec:
    return TensorSpec(name, "INT64", shape)


IMAGES = _fp32("images", -1, IMAGE_SIDE, IMAGE_SIDE)
DIGIT = _int64("digit", -1)
DIGIT_PROBABILITY = _fp32("digit_probability", -1)
# Sample's options, as [1]-shaped inputs or as request parameters of the same name.
COUNT, SEED, TEMPERATURE = _int64("n", 1), _int64("seed", 1), _fp32("temperature", 1)


def models_of(entry: LoadedModel) -> list[V2Model]:
    """The v2 models of one loaded model: anomaly only when its checkpoint is calibrated."""
    latent = _fp32("z", -1, entry.latent_dim)
    digit = (DIGIT,) if entry.conditional else ()
    predicted = (DIGIT, DIGIT_PROBABILITY) if entry.conditional else ()
    name = entry.name
    models = [
        V2Model(
            f"{name}-decode",
            "decode",
            entry,
            inputs=(latent, *digit),
            outputs=(IMAGES,),
            required=frozenset({"z", *(d.name for d in digit)}),
        ),
        V2Model(
            f"{name}-sample",
            "sample",
            entry,
            inputs=(*digit, COUNT, SEED, TEMPERATURE),
            outputs=(IMAGES, *digit, latent),
            parameters=("n", "seed", "temperature", "prior"),
        ),
        V2Model(
            f"{name}-encode",
            "encode",
            entry,
            inputs=(IMAGES, *digit),
            outputs=(
                _fp32("mu", -1, entry.latent_dim),
                _fp32("logvar", -1, entry.latent_dim),
                *predicted,
            ),
            required=frozenset({"images"}),
        ),
    ]
    if bool(entry.model.anomaly_fitted) and entry.anomaly_threshold is not None:
        percentile = (_fp32("percentile", -1),) if entry.anomaly_quantiles.numel() >= 2 else ()
        models.append(
            V2Model(
                f"{name}-anomaly",
                "anomaly",
                entry,
                inputs=(IMAGES,),
                outputs=(
                    _fp32("score", -1),
                    TensorSpec("is_anomaly", "BOOL", (-1,)),
                    *predicted,
                    *percentile,
                ),
                required=frozenset({"images"}),
                parameters=("threshold",),
            )
        )
    return models


Versioned = dict[tuple[str, str], V2Model]  # (v2 name, version) -> the v2 model


def versioned(repository: ModelRepository, previous: Versioned) -> Versioned:
    """Every v2 model of every loaded version, by name and version, built when a load or an
    unload changes them: those of versions already loaded are kept (with their statistics)."""
    models: Versioned = {}
    for name in repository.served:
        for version in repository.versions(name):
            entry = repository.deployed(name, version).entry
            for model in models_of(entry):
                key = (model.name, version)
                models[key] = previous.get(key, model)
    return models


def newest(repository: ModelRepository, models: Versioned) -> dict[str, V2Model]:
    """Of `versioned`'s v2 models, each at its model's newest loaded version, by name: what a
    request that pins no version gets."""
    return {
        name: model
        for (name, version), model in models.items()
        if version == repository.served[model.entry.name].latest.version
    }


def find_model(
    models: dict[str, V2Model], name: str, version: str | None, pinned: Versioned
) -> V2Model:
    """The v2 model `name` (`<model>-<op>`) at `version` (None: the latest loaded), or a 404."""
    found = models.get(name)
    if found is None:
        raise ModelNotFound(
            f"no v2 model named {name!r}; this server has {', '.join(models)} "
            f"(<model>-<op>, for the models of GET /models and the ops {', '.join(OPS)})"
        )
    if version in (None, LEGACY_VERSION, found.version):
        return found
    try:
        return pinned[(name, version)]
    except KeyError:
        loaded = ", ".join(v for (n, v) in pinned if n == name)
        raise ModelNotFound(
            f"model {name!r} has no loaded version {version!r}; loaded: {loaded}"
        ) from None


@dataclass
class Context:
    """What an op needs besides its tensors."""

    handle: ModelHandle
    settings: Settings
    metrics: Metrics
    options: dict[str, ParameterValue] = field(default_factory=dict)


Outputs = dict[str, np.ndarray]
Result = tuple[Outputs, dict[str, ParameterValue]]  # outputs, response parameters
Run = Callable[[dict[str, np.ndarray], Context], Awaitable[Result]]


async def infer(
    model: V2Model,
    request: DecodedRequest,
    handle: ModelHandle,
    settings: Settings,
    metrics: Metrics,
) -> tuple[list[OutputTensor], dict[str, ParameterValue]]:
    """Check the request against the model's tensors, run its op within the request's
    deadline, pick the wanted outputs; counted in the model's statistics."""
    started = time.perf_counter_ns()
    token = recording.set(model.stats)
    try:
        outputs, parameters, rows = await _run(model, request, handle, settings, metrics)
    except Exception:
        model.stats.finished(time.perf_counter_ns() - started, rows=None)
        raise
    finally:
        recording.reset(token)
    model.stats.finished(time.perf_counter_ns() - started, rows=rows)
    return outputs, parameters


async def _run(
    model: V2Model,
    request: DecodedRequest,
    handle: ModelHandle,
    settings: Settings,
    metrics: Metrics,
) -> tuple[list[OutputTensor], dict[str, ParameterValue], int]:
    """The outputs, the response parameters and the number of rows (images, latents)."""
    tensors = _checked_inputs(model, request)
    deadline_s = _deadline_s(request.parameters.get(TIMEOUT))
    specs = {spec.name: spec for spec in model.outputs}
    wanted = request.outputs
    if wanted is None:
        wanted = {name: request.binary_outputs for name in specs}
    for name in wanted:
        if name not in specs:
            raise BadRequest(
                f"model {model.name!r} has no output {name!r}; its outputs: "
                f"{', '.join(map(str, model.outputs))}"
            )
    options = {k: v for k, v in request.parameters.items() if k in model.parameters}
    context = Context(handle, settings, metrics, options)
    deadline = asyncio.timeout(deadline_s)
    try:
        async with deadline:
            outputs, parameters = await RUNS[model.op](tensors, context)
    except TimeoutError:
        if not deadline.expired():
            raise
        raise RequestTimeout(
            f"the request passed its deadline of {deadline_s:g} s (its {TIMEOUT!r} parameter) "
            f"waiting for model {model.name!r}; give it more time, or retry"
        ) from None
    chosen = [
        OutputTensor(name, specs[name].datatype, outputs[name], binary)
        for name, binary in wanted.items()
    ]
    return chosen, parameters, len(next(iter(outputs.values())))


def _deadline_s(timeout: ParameterValue | None) -> float | None:
    """The `timeout` parameter (microseconds; 0 or none: only the server's own deadline,
    VAE_REQUEST_TIMEOUT_S, which applies either way) in seconds."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0:
        raise BadRequest(
            f"parameter {TIMEOUT!r} must be the request's deadline in microseconds, an integer "
            f">= 0 (0: the server's own), got {timeout!r}"
        )
    return timeout / 1e6 if timeout else None


def _checked_inputs(model: V2Model, request: DecodedRequest) -> dict[str, np.ndarray]:
    """The request's tensors, each a known input of the right datatype and shape, with the
    required ones there and every batch of the same size."""
    specs = {spec.name: spec for spec in model.inputs}
    for name, array in request.tensors.items():
        spec = specs.get(name)
        if spec is None:
            raise BadRequest(
                f"model {model.name!r} has no input {name!r}; its inputs: "
                f"{', '.join(map(str, model.inputs))}"
            )
        if request.datatypes[name] != spec.datatype:
            raise BadRequest(
                f"input {name!r} must be {spec.datatype}, got {request.datatypes[name]}"
            )
        if not spec.fits(array.shape):
            raise BadRequest(
                f"input {name!r} must have shape {list(spec.shape)} (-1: any size), got "
                f"{list(array.shape)}"
            )
    missing = sorted(model.required - set(request.tensors))
    if missing:
        raise BadRequest(f"model {model.name!r} needs input {specs[missing[0]]}")
    batched = {n: a.shape[0] for n, a in request.tensors.items() if specs[n].shape[0] == -1}
    if len(set(batched.values())) > 1:
        sizes = ", ".join(f"{n}: {rows}" for n, rows in batched.items())
        raise BadRequest(f"the inputs' first dimensions must agree, got {sizes}")
    return request.tensors


def _option(
    name: str, tensors: dict[str, np.ndarray], context: Context, kind: type[int] | type[float]
) -> int | float | None:
    """An option given as a [1]-shaped input or as a request parameter (not both)."""
    parameter = context.options.get(name)
    tensor = tensors.get(name)
    if tensor is not None:
        if parameter is not None:
            raise BadRequest(f"{name!r} is given as an input and as a parameter; give it once")
        return kind(tensor.reshape(-1)[0])
    if parameter is None:
        return None
    if isinstance(parameter, bool) or not isinstance(parameter, int | float):
        raise BadRequest(f"parameter {name!r} must be a number, got {parameter!r}")
    if kind is int and not isinstance(parameter, int):
        raise BadRequest(f"parameter {name!r} must be an integer, got {parameter!r}")
    return kind(parameter)


def _rows(array: np.ndarray, name: str, limit: int, setting: str) -> int:
    rows = array.shape[0]
    if rows < 1:
        raise BadRequest(f"input {name!r} has no rows; send at least one")
    if rows > limit:
        raise PayloadTooLarge(
            f"input {name!r} has {rows} rows; at most {limit} per request ({setting})"
        )
    return rows


def _finite(array: np.ndarray, name: str) -> np.ndarray:
    if not np.isfinite(array).all():
        raise BadRequest(f"input {name!r} holds NaN or infinite values")
    return array


def _images(tensors: dict[str, np.ndarray], context: Context) -> np.ndarray:
    """The `images` input as (N, 1, 28, 28), checked: pixel values in [0, 1], within limits."""
    images = tensors["images"]
    _rows(images, "images", context.settings.max_files, "VAE_MAX_FILES")
    x = _finite(images, "images")
    if images.size and (images.min() < 0.0 or images.max() > 1.0):
        raise BadRequest(
            "input 'images' must hold pixel values in [0, 1] (white digits on black, as "
            f"MNIST); got values from {images.min():g} to {images.max():g}"
        )
    return x[:, None]


def _digits(tensors: dict[str, np.ndarray]) -> list[int] | None:
    digit = tensors.get("digit")
    return None if digit is None else [int(d) for d in digit]


async def _decode(tensors: dict[str, np.ndarray], context: Context) -> Result:
    handle = context.handle
    z = tensors["z"]
    _rows(z, "z", context.settings.max_samples, "VAE_MAX_SAMPLES")
    digits = _digits(tensors) if handle.num_classes is not None else None
    handle.check_digit(digits)
    latents = _finite(z, "z")
    if z.size and np.abs(z).max() > MAX_LATENT_VALUE:
        # REST /decode's cap: past it float32 sums overflow into NaN images.
        raise BadRequest(
            f"input 'z' must hold values in [-{MAX_LATENT_VALUE:g}, {MAX_LATENT_VALUE:g}], as "
            f"/decode's; got {np.abs(z).max():g}"
        )
    images = await handle.decode_latents(latents, digits)
    return {"images": images[:, 0].numpy()}, {}


async def _sample(tensors: dict[str, np.ndarray], context: Context) -> Result:
    handle = context.handle
    digits = _digits(tensors)
    count = _option("n", tensors, context, int)
    n = int(count if count is not None else (1 if digits is None else len(digits)))
    if digits is not None and n != len(digits):
        raise BadRequest(f"n is {n} but {len(digits)} digits were given; give one per image")
    limit = context.settings.max_samples
    if not 1 <= n <= limit:
        raise BadRequest(f"n must be in 1..{limit} (VAE_MAX_SAMPLES), got {n}")
    seed = _option("seed", tensors, context, int)
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise BadRequest(f"seed must be in 0..{MAX_SEED}, got {seed}")
    temperature = _option("temperature", tensors, context, float)
    temperature = 1.0 if temperature is None else temperature
    if not 0.0 < temperature <= MAX_TEMPERATURE:
        raise BadRequest(f"temperature must be in (0, {MAX_TEMPERATURE:g}], got {temperature}")
    prior = context.options.get("prior")
    if prior is not None and prior not in get_args(PriorName):
        raise BadRequest(f"parameter 'prior' must be fitted or standard, got {prior!r}")
    seed = draw_seed() if seed is None else int(seed)
    chosen = cast("PriorName | None", prior)
    generated = await handle.sample(n, digits, temperature, seed, chosen)
    outputs = {"images": generated.images[:, 0].numpy(), "z": generated.latents.numpy()}
    if generated.digits is not None:
        outputs["digit"] = np.asarray(generated.digits, dtype=np.int64)
    return outputs, {"seed": seed, "prior": generated.prior or "standard"}


async def _encode(tensors: dict[str, np.ndarray], context: Context) -> Result:
    encoded = await context.handle.encode(_images(tensors, context), _digits(tensors))
    return {name: value.numpy() for name, value in encoded.items()}, {}


async def _anomaly(tensors: dict[str, np.ndarray], context: Context) -> Result:
    handle = context.handle
    threshold = _option("threshold", {}, context, float)
    if threshold is not None and not math.isfinite(threshold):
        raise BadRequest(f"parameter 'threshold' must be finite, got {threshold}")
    scored = await handle.anomaly(_images(tensors, context), threshold)
    outputs = {
        "score": np.asarray(scored.scores, dtype=np.float32),
        "is_anomaly": np.asarray(scored.is_anomaly, dtype=np.bool_),
    }
    if handle.entry.anomaly_quantiles.numel() >= 2:
        outputs["percentile"] = np.asarray(scored.percentile, dtype=np.float32)
    if scored.digits is not None and scored.digit_probability is not None:
        outputs["digit"] = np.asarray(scored.digits, dtype=np.int64)
        outputs["digit_probability"] = np.asarray(scored.digit_probability, dtype=np.float32)
    return outputs, {"threshold": scored.threshold}


RUNS: dict[str, Run] = {
    "decode": _decode,
    "sample": _sample,
    "encode": _encode,
    "anomaly": _anomaly,
}
