"""Service settings, read from VAE_* environment variables and checked once at startup."""

import importlib.util
import math
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.http.api_keys import ApiKey, load_keys
from models.checkpoint import recover_checkpoints

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N (N = GPU index)"
_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
LOG_LEVELS: tuple[str, ...] = ("critical", "error", "warning", "info", "debug", "trace")


class SettingsError(ValueError):
    """A setting names something that is not there (a missing checkpoint folder)."""


class Settings(BaseSettings):
    """Everything the service can be told; each field is VAE_<NAME> in the environment."""

    model_config = SettingsConfigDict(env_prefix="VAE_", extra="ignore")
    _keys: list[ApiKey] = PrivateAttr(default_factory=list)

    checkpoints: str = Field(
        default="checkpoints/default",
        description=(
            "Comma-separated checkpoint folders (each holding config.json), or one folder "
            "whose subfolders are checkpoints."
        ),
    )
    device: str = Field(default="auto", description=f"Where models run: {DEVICE_CHOICES}.")
    host: str = Field(default="127.0.0.1", description="Interface to bind.")
    port: int = Field(default=8000, ge=1, le=65535, description="TCP port to bind.")
    grpc_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="TCP port of the Open Inference Protocol's gRPC service, on VAE_HOST; unset: "
        "no gRPC. Each worker process binds it with SO_REUSEPORT, so the kernel spreads "
        "connections over the workers.",
    )
    max_samples: int = Field(
        default=256, ge=1, le=4096, description="Most images one /sample request may ask for."
    )
    max_upload_bytes: int = Field(
        default=10 * 1024 * 1024, gt=0, description="Largest accepted image file, in bytes."
    )
    max_json_bytes: int = Field(
        default=4 * 1024 * 1024,
        gt=0,
        description="Largest JSON body (/decode, /interpolate with base64 images).",
    )
    max_image_pixels: int = Field(
        default=4096 * 4096,
        gt=0,
        description="Largest accepted image, width x height, checked before decoding.",
    )
    max_files: int = Field(default=64, gt=0, description="Most images in one request.")
    # 64: one-image requests are as fast as at 256 within the noise (a batch of them is never
    # larger than the concurrency), and batches of mixed sizes up to 256 images fragment the
    # CPU allocator: over 16,000 mixed requests after a warm-up (2 CPU cores) RSS grew
    # 89-130 MB at 256 against 15 MB at 64.
    max_batch_images: int = Field(
        default=64, gt=0, description="Most images the batcher sends to a model at once."
    )
    max_batch_wait_ms: float = Field(
        default=0.0,
        ge=0.0,
        le=1000.0,
        description="Extra wait to gather a batch. 0 runs as soon as the model is free: a lone "
        "request never waits, and under load batches form while the previous one runs.",
    )
    max_queue_images: int = Field(
        default=4096,
        gt=0,
        description="Images waiting per model before requests are refused with 503.",
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0.0, description="Seconds a request may wait for its result."
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        description="Seconds a request body may stall between two received chunks before the "
        "request is answered 408 (slow or stalled uploads must not hold a connection forever).",
    )
    max_concurrency: int = Field(
        default=256,
        gt=0,
        description="Requests in progress per worker past which new ones are answered 503 "
        "(counted in the metrics; /healthz, /readyz and /metrics get a small reserve beyond "
        "it); bounds the memory that uploads in flight can hold.",
    )
    http: Literal["h11", "httptools"] = Field(
        default="h11",
        description="uvicorn's HTTP parser and event loop: `h11` on asyncio (pure Python), or "
        "`httptools` on uvloop (C; both are runtime dependencies).",
    )
    model_control: Literal["none", "explicit", "poll"] = Field(
        default="none",
        description="Model management at runtime (Triton's --model-control-mode): `none` "
        "serves what loaded at startup; `explicit` opens POST /models/{name}/load and "
        "/unload and the v2 repository extension (the admin key's, when keys are set); `poll` "
        "also loads each retrained checkpoint once its save completes.",
    )
    model_versions: int = Field(
        default=2,
        ge=1,
        le=8,
        description="Revisions of a model kept loaded after a reload (a request may pin one "
        "with `version`); the newest answers requests that pin none.",
    )
    model_poll_interval_s: float = Field(
        default=5.0,
        gt=0.0,
        description="Seconds between two looks at the checkpoint folders in the poll mode.",
    )
    workers: int | None = Field(
        default=None,
        gt=0,
        description="Server worker processes, each with its own copy of the models; unset or "
        "`auto`: one per CPU core this process may use (its CPU affinity and cgroup CPU limit).",
    )
    torch_threads: int | None = Field(
        default=None,
        gt=0,
        description="torch.set_num_threads in each worker; unset keeps torch's default (one "
        "per core). Measured: one thread per worker made /sample slower (bench/results).",
    )
    log_level: str = Field(default="info", description=f"One of {', '.join(LOG_LEVELS)}.")
    access_log: Literal["off", "text", "json"] = Field(
        default="text",
        description="One line per request at info level: `text`, uvicorn's access line (with "
        "the request and key ids); `json`, a JSON object (request id, method, route, status, "
        "duration, model, version, images, batch size, key id, trace id); `off`, none.",
    )
    api_keys: str = Field(
        default="",
        description="API keys, comma-separated ID:ROLE:KEY (ROLE user or admin); with any key "
        "set (here or in VAE_API_KEYS_FILE) model routes need one. Kept only as SHA-256 digests.",
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="A file of `ID ROLE sha256:HEX` lines (`python -m app.http.api_keys ID` "
        "makes a key and its line): keys stored hashed.",
    )
    auth_operations: bool = Field(
        default=False,
        description="With keys set, /healthz, /readyz, /metrics and the v2 health routes need a "
        "key too (off: probes and scrapes stay open).",
    )
    rate_limit_per_s: float = Field(
        default=0.0,
        ge=0.0,
        description="Requests per second each API key may make, per worker process "
        "(0: unlimited); past it, 429 with Retry-After.",
    )
    rate_limit_burst: int | None = Field(
        default=None,
        gt=0,
        description="Requests a key may make at once before the rate applies (default: one "
        "second's worth, at least 1).",
    )
    enable_test_hooks: bool = Field(
        default=False,
        description="Honour the X-Test-Fault request header (raise, oom or slow=<seconds>: "
        "make this request's forward pass fail or stall), for robustness tests; never in "
        "production.",
    )
    enable_bench_routes: bool = Field(
        default=False,
        description="Serve POST /bench/floor (a constant PNG) for the benchmark suite's "
        "floor measurement; off in production.",
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _auto_workers(cls, value: object) -> object:
        """`auto` (for config files that must name a value): one per usable core."""
        return None if isinstance(value, str) and value.strip().lower() == "auto" else value

    @model_validator(mode="after")
    def _queue_holds_the_largest_request(self) -> "Settings":
        largest = max(self.max_samples, self.max_files)
        if self.max_queue_images < largest:
            raise ValueError(
                f"VAE_MAX_QUEUE_IMAGES={self.max_queue_images} is below the largest request "
                f"({largest} images: VAE_MAX_SAMPLES / VAE_MAX_FILES), which could never be "
                "queued; raise it or lower those"
            )
        return self

    @model_validator(mode="after")
    def _explicit_control_has_one_worker(self) -> "Settings":
        if self.model_control == "explicit" and (self.workers or 1) > 1:
            raise ValueError(
                f"VAE_MODEL_CONTROL=explicit with VAE_WORKERS={self.workers}: a load or unload "
                "request reaches one worker process only, so the others would keep the old "
                "model; use VAE_WORKERS=1 with explicit, or VAE_MODEL_CONTROL=poll, which every "
                "worker follows"
            )
        return self

    @model_validator(mode="after")
    def _grpc_port_is_usable(self) -> "Settings":
        if self.grpc_port is None:
            return self
        if self.grpc_port == self.port:
            raise ValueError(
                f"VAE_GRPC_PORT and VAE_PORT are both {self.port}; HTTP and gRPC need ports of "
                "their own"
            )
        if not all(importlib.util.find_spec(name) for name in ("grpc", "tritonclient")):
            raise ValueError(
                "VAE_GRPC_PORT is set, but grpcio or tritonclient is not installed: "
                "pip install 'vae-serve[grpc]', or unset VAE_GRPC_PORT"
            )
        return self

    @model_validator(mode="after")
    def _keys_are_usable(self) -> "Settings":
        keys = load_keys(self.api_keys, self.api_keys_file)  # KeyConfigError is a ValueError
        self._keys = keys
        if (self.rate_limit_per_s or self.auth_operations) and not keys:
            raise ValueError(
                "VAE_RATE_LIMIT_PER_S and VAE_AUTH_OPERATIONS apply to API keys, but none is "
                "set; set VAE_API_KEYS or VAE_API_KEYS_FILE"
            )
        return self

    @property
    def keys(self) -> list[ApiKey]:
        """The API keys as validated at startup (the keys file is read once, here)."""
        return self._keys

    @property
    def rate_limit_burst_requests(self) -> int:
        """The bucket's size: the setting, or one second's worth of requests (at least 1)."""
        if self.rate_limit_burst is not None:
            return self.rate_limit_burst
        return max(1, int(self.rate_limit_per_s))

    @field_validator("checkpoints")
    @classmethod
    def _has_a_checkpoint_entry(cls, value: str) -> str:
        if not any(entry.strip() for entry in value.split(",")):
            raise ValueError(
                "VAE_CHECKPOINTS is empty; set it to a checkpoint folder "
                "(one holding config.json) or a folder of them"
            )
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        device = value.strip().lower()
        if not _DEVICE_PATTERN.fullmatch(device):
            raise ValueError(f"VAE_DEVICE={value!r} is not a device; use one of {DEVICE_CHOICES}")
        return device

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        level = value.strip().lower()
        if level not in LOG_LEVELS:
            raise ValueError(
                f"VAE_LOG_LEVEL={value!r} is not a log level; use one of {', '.join(LOG_LEVELS)}"
            )
        return level

    @property
    def worker_count(self) -> int:
        if self.workers is None and self.model_control == "explicit":
            return 1  # management requests must reach the one process that holds the models
        return self.workers or usable_cores()

    @property
    def shutdown_drain_s(self) -> int:
        """Longest a stop waits for the requests in flight: their deadline, and a second."""
        return int(self.request_timeout_s) + 1

    def checkpoint_dirs(self) -> list[Path]:
        """Expand `checkpoints` into checkpoint folders, in the order given.

        A folder holding config.json is one checkpoint; any other folder stands for its
        immediate subfolders that hold config.json, sorted by name (hidden ones, such as the
        folders of a save in progress, excepted). A save that a kill interrupted is finished
        first, so its checkpoint is found.
        """
        found: list[Path] = []
        for entry in self.checkpoints.split(","):
            if not entry.strip():
                continue
            folder = Path(entry.strip()).expanduser()
            recover_checkpoints(folder)
            if not folder.is_dir():
                raise SettingsError(
                    f"checkpoint folder {folder} does not exist; train one with vae-train "
                    "or point VAE_CHECKPOINTS at an existing folder"
                )
            if (folder / "config.json").is_file():
                found.append(folder)
                continue
            children = sorted(
                child
                for child in folder.iterdir()
                if not child.name.startswith(".") and (child / "config.json").is_file()
            )
            if not children:
                raise SettingsError(
                    f"no checkpoint in {folder}: neither it nor its subfolders hold "
                    "config.json; point VAE_CHECKPOINTS at a folder saved by vae-train"
                )
            found.extend(children)
        # The same folder named twice (directly and via its parent) loads once.
        unique: dict[Path, Path] = {}
        for path in found:
            unique.setdefault(path.resolve(), path)
        return list(unique.values())


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity, capped by a cgroup CPU limit (a
    container's or a Kubernetes pod's `limits.cpu`, rounded up), at least 1."""
    cores = len(os.sched_getaffinity(0))
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def _cgroup_cpu_quota() -> float | None:
    """The cgroup's CPU limit in cores (v2 cpu.max, else v1 cfs quota), None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        try:
            v1 = Path("/sys/fs/cgroup/cpu")
            quota = (v1 / "cpu.cfs_quota_us").read_text().strip()
            period = (v1 / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1") or int(period) <= 0:
        return None
    return int(quota) / int(period)
