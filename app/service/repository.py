"""The models served and their revisions, changed while the service runs: load a checkpoint
folder again (a retrained revision), unload it, or poll the folders for new revisions.

Each loaded revision is a version (its weights' digest, `LoadedModel.version`). A load reads,
checks and warms up the new revision beside the one serving, then swaps it in in one step of
the event loop: a request is answered by the old version or the new one, never by a half-loaded
model, and a load that fails leaves the old one serving and says why. The last
`VAE_MODEL_VERSIONS` revisions of a name stay loaded, so a request may pin one; a retired
revision's batcher finishes what it was given before it stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import BadRequest, ModelNotFound
from app.metrics import Metrics
from app.service.batching import MicroBatcher
from app.service.inference import warm_up
from app.service.registry import LoadedModel, Registry, load_model
from app.settings import Settings
from models import CheckpointError
from models.checkpoint import CONFIG_NAME, read_metadata, swap_in_progress

logger = logging.getLogger("app.service.repository")
BatcherFactory = Callable[[LoadedModel], MicroBatcher]


@dataclass
class Deployed:
    """One loaded revision of a model and the batcher that runs it."""

    entry: LoadedModel
    batcher: MicroBatcher

    @property
    def version(self) -> str:
        return self.entry.version


@dataclass
class Served:
    """A name's loaded revisions, oldest first: the last is the one requests get by default."""

    versions: dict[str, Deployed] = field(default_factory=dict)

    @property
    def latest(self) -> Deployed:
        return next(reversed(self.versions.values()))


@dataclass(frozen=True)
class RepositoryEntry:
    """A row of the repository index: a model the service knows, and its state."""

    name: str
    version: str | None
    state: str  # READY or UNAVAILABLE, as Triton's index says
    reason: str


class ModelRepository:
    """The configured checkpoint folders by name, and what of them is loaded."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        new_batcher: BatcherFactory,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self._new_batcher = new_batcher
        self.folders: dict[str, Path] = {e.name: e.path for e in registry.models.values()}
        for folder in settings.checkpoint_dirs():
            self.folders.setdefault(folder.resolve().name, folder)
        self.device = next(iter(registry.models.values())).device
        self.served: dict[str, Served] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._retired: list[Deployed] = []  # retired, their batchers not yet stopped
        self.reasons: dict[str, str] = {}  # why a name is not loaded, or its last load failed
        # Called in the same step of the event loop as each swap or unload (protocol adapters
        # rebuild what they derive from the loaded models).
        self.listeners: list[Callable[[], None]] = []
        for entry in registry.models.values():
            self._add(Deployed(entry, self._started(entry)))

    def _started(self, entry: LoadedModel) -> MicroBatcher:
        batcher = self._new_batcher(entry)
        batcher.start()
        if self.metrics is not None:
            self.metrics.model_info.labels(
                entry.name, entry.model.config.architecture, str(entry.device)
            ).set(1)
        return batcher

    def _add(self, deployed: Deployed) -> list[Deployed]:
        """Serve `deployed` as its name's latest version (a version loaded already moves to
        the end); returns the revisions it retires."""
        served = self.served.setdefault(deployed.entry.name, Served())
        served.versions.pop(deployed.version, None)
        served.versions[deployed.version] = deployed
        self.registry.put(deployed.entry)
        retired = []
        while len(served.versions) > self.settings.model_versions:
            oldest = next(iter(served.versions))
            retired.append(served.versions.pop(oldest))
        return retired

    def deployed(self, name: str | None, version: str | None = None) -> Deployed:
        """The revision a request names (the latest unless it pins a version); 404 else."""
        entry = self.registry.get(name)  # 404 for a name not loaded
        served = self.served[entry.name]
        if version is None:
            return served.latest
        try:
            return served.versions[version]
        except KeyError:
            raise ModelNotFound(
                f"model {entry.name!r} has no loaded version {version!r}; loaded: "
                f"{', '.join(served.versions)} (GET /models)"
            ) from None

    def versions(self, name: str) -> list[str]:
        served = self.served.get(name)
        return [] if served is None else list(served.versions)

    def index(self) -> list[RepositoryEntry]:
        rows = []
        for name in self.folders:
            served = self.served.get(name)
            if served is None:
                reason = self.reasons.get(name, "unloaded")
                rows.append(RepositoryEntry(name, None, "UNAVAILABLE", reason))
            else:
                rows.append(RepositoryEntry(name, served.latest.version, "READY", ""))
        return rows

    def folder(self, name: str) -> Path:
        try:
            return self.folders[name]
        except KeyError:
            raise ModelNotFound(
                f"no model named {name!r} in the repository; known: {', '.join(self.folders)} "
                "(POST /v2/repository/index)"
            ) from None

    async def load(self, name: str) -> Deployed:
        """(Re)load `name` from its folder: the new revision serves once it is loaded and
        warmed up; a failure keeps what serves now and is a 400 that says why."""
        folder = self.folder(name)
        async with self._locks.setdefault(name, asyncio.Lock()):
            try:
                entry = await asyncio.to_thread(self._read, name, folder)
            except Exception as exc:  # a damaged checkpoint, or one this code cannot serve
                self.reasons[name] = f"load failed: {exc}"
                logger.error(
                    "loading model %r from %s failed: %s",
                    name,
                    folder,
                    exc,
                    exc_info=not isinstance(exc, CheckpointError),
                )
                keeps = "the version serving now keeps serving" if name in self.served else ""
                raise BadRequest(
                    f"model {name!r} could not be loaded from {folder}: {exc}"
                    + (f"; {keeps}" if keeps else "")
                ) from None
            current = self.served.get(name)
            if current is not None and entry.version in current.versions:
                # That revision is loaded already (a rollback to the one before, or a load with
                # nothing new): it becomes the newest again, and the copy just read is dropped.
                deployed = current.versions[entry.version]
            else:
                deployed = Deployed(entry, self._started(entry))
            self._retire(self._add(deployed))
            self._changed()
            self.reasons.pop(name, None)
            logger.info("model %r now serves version %s", name, entry.version)
            return deployed

    def _read(self, name: str, folder: Path) -> LoadedModel:
        entry = load_model(name, folder, self.device)
        warm_up(entry)
        return entry

    async def unload(self, name: str) -> list[str]:
        """Stop serving `name`: requests for it are then 404s; those already given to its
        batchers are answered. Returns the versions unloaded."""
        self.folder(name)
        async with self._locks.setdefault(name, asyncio.Lock()):
            served = self.served.pop(name, None)
            if served is None:
                return []
            self.registry.remove(name)
            self._changed()
            self.reasons[name] = "unloaded"
            self._retire(list(served.versions.values()))
            logger.info("model %r unloaded (versions %s)", name, ", ".join(served.versions))
            return list(served.versions)

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()

    def _retire(self, retired: list[Deployed]) -> None:
        """Stop retired revisions' batchers once their callers are done: a request that took
        the revision just before the swap still submits to it, so the stop waits one request
        timeout (past which every such caller has given up) before refusing new jobs."""
        for deployed in retired:
            task = asyncio.get_running_loop().create_task(self._stop_later(deployed))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _stop_later(self, deployed: Deployed) -> None:
        self._retired.append(deployed)
        await asyncio.sleep(self.settings.request_timeout_s)
        self._retired.remove(deployed)
        await deployed.batcher.stop()

    def changed(self) -> dict[str, str]:
        """The names whose folder now holds a complete revision other than the one serving
        (a save in progress, with its `.NAME.new` / `.NAME.old` beside the folder, is skipped
        until it completes), with the new weights' digest; for the poll mode."""
        names: dict[str, str] = {}
        for name, folder in self.folders.items():
            if swap_in_progress(folder) or not (folder / CONFIG_NAME).is_file():
                continue
            try:
                digest = str(read_metadata(folder).get("weights_sha256") or "")
            except CheckpointError:
                continue  # a damaged or partial folder: wait for a whole one
            served = self.served.get(name)
            if served is not None and not digest.startswith(served.latest.version):
                names[name] = digest
        return names

    async def poll(self) -> None:
        """Load each retrained checkpoint when its save completes, every
        VAE_MODEL_POLL_INTERVAL_S, until cancelled (unloaded names stay unloaded)."""
        failed: dict[str, str] = {}  # name -> the digest that failed to load (tried once)
        while True:
            await asyncio.sleep(self.settings.model_poll_interval_s)
            for name, digest in (await asyncio.to_thread(self.changed)).items():
                if failed.get(name) == digest:
                    continue
                try:
                    await self.load(name)
                    failed.pop(name, None)
                except BadRequest:
                    failed[name] = digest

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        serving = [d for served in self.served.values() for d in served.versions.values()]
        for deployed in [*serving, *self._retired]:
            await deployed.batcher.stop()
        self.served.clear()
