"""The gateway's model table: {served name or alias: handle}, found at run time.

Each model is its own Serve application (serve_app/config.py says why), so the gateway does not take the model
list as args: it asks the Serve controller which applications run a `ModelServer` deployment, asks each new one
to describe itself (name, aliases, task, limits) and keeps a handle to it. The table refreshes in the background
every `refresh_s` and at once when a request names a model it does not know, so a model added with
`serve deploy` is served within seconds and the gateway never restarts for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, NamedTuple

from serve_app.config import MODEL_DEPLOYMENT_NAME
from serve_app.errors import InvalidRequest, ModelNotFound
from serve_app.periodic import Periodic

logger = logging.getLogger("ray.serve")

# A model that does not answer describe() within this is left out, and the next lookup or listing refreshes again
# (not only the background refresh). A miss refresh runs on a request's path, so this bounds how long an unknown
# name can wait. The first call from a fresh gateway replica also sets up its handle, which took over 2 s on the
# busy 2-core test machine.
DESCRIBE_TIMEOUT_S = 5.0
MISS_REFRESH_MIN_INTERVAL_S = 0.5


@dataclass(frozen=True)
class ModelEntry:
    app_name: str
    deployed_at: float  # the application's last deploy time: a redeploy re-describes the model
    facts: dict[str, Any]  # what the replica's describe() returned
    handle: Any  # DeploymentHandle to the model's ModelServer

    @property
    def name(self) -> str:
        return self.facts["name"]

    @property
    def task(self) -> str:
        return self.facts["task"]

    @property
    def served_names(self) -> list[str]:
        return [self.name, *self.facts.get("aliases", [])]


class ModelApp(NamedTuple):
    deployed_at: float  # the application's last deploy time
    running: bool  # at least one replica is up (it can describe itself)


def serve_model_apps() -> dict[str, ModelApp]:
    """The deployed model applications. Applications being deleted are left out: their replicas still run for a
    while but no longer answer.

    Reads the controller's plain details dict rather than `serve.status()`, which validates it into pydantic
    models (cloudpickling every deployment's request-router class on the way): 68 ms of the gateway's CPU per
    call against 2 ms on the 2-core machine, every refresh_s, on the cores that serve requests (BENCHMARKS.md)."""
    from ray.serve.context import _get_global_client

    deployed = {}
    for app_name, app in _get_global_client().get_serve_details().get("applications", {}).items():
        deployment = app.get("deployments", {}).get(MODEL_DEPLOYMENT_NAME)
        if deployment is None or app.get("status") == "DELETING":
            continue
        running = any(replica.get("state") == "RUNNING" for replica in deployment.get("replicas", []))
        deployed[app_name] = ModelApp(app["last_deployed_time_s"], running)
    return deployed


def serve_app_handle(app_name: str):
    from ray import serve

    return serve.get_app_handle(app_name).options(_by_reference=False)


class ModelDirectory:
    def __init__(self, refresh_s: float, *,
                 list_apps: Callable[[], dict[str, ModelApp]] = serve_model_apps,
                 get_handle: Callable[[str], Any] = serve_app_handle,
                 describe: Callable[[Any], Awaitable[dict]] | None = None):
        self._list_apps = list_apps
        self._get_handle = get_handle
        self._describe = describe or (lambda handle: handle.describe.remote())
        self._entries: dict[str, ModelEntry] = {}  # by application name
        self._by_name: dict[str, ModelEntry] = {}  # by served name and alias
        self._lock = asyncio.Lock()
        self._refreshed_at = 0.0
        self._undescribed: set[str] = set()  # running applications the last refresh could not describe
        self._refresher = Periodic(self.refresh, refresh_s, "the model table")

    # ---- lookups ------------------------------------------------------------------------------------------

    async def resolve(self, name: str, task: str) -> ModelEntry:
        """The model a request names; 404 listing the served names when unknown, 400 for the wrong task."""
        self._refresher.ensure_started()
        entry = self._by_name.get(name)
        if entry is None and self._refresh_allowed():
            await self.refresh()
            entry = self._by_name.get(name)
        if entry is None:
            raise ModelNotFound(f"model {name!r} does not exist; served models: {self.names_text()}",
                                param="model")
        if entry.task != task:
            same_task = sorted(e.name for e in self._entries.values() if e.task == task)
            raise InvalidRequest(f"model {name!r} is a {entry.task} model; {task} models: "
                                 f"{', '.join(same_task) or 'none'}", param="model", code="wrong_model_task")
        return entry

    async def only_model(self, task: str) -> ModelEntry:
        """For clients that send no model (TEI): the single model of that task."""
        candidates = [e for e in await self.entries() if e.task == task]
        if len(candidates) != 1:
            raise InvalidRequest(f"this server hosts {len(candidates)} {task} models; name one in 'model': "
                                 f"{', '.join(sorted(e.name for e in candidates)) or 'none'}", param="model")
        return candidates[0]

    async def entries(self) -> list[ModelEntry]:
        self._refresher.ensure_started()
        if not self._entries or (self._undescribed and self._refresh_allowed()):
            await self.refresh()
        return sorted(self._entries.values(), key=lambda e: e.name)

    def was_removed(self, entry: ModelEntry) -> bool:
        """True once a refresh finds the application behind `entry` deleted (a replica restart does not count)."""
        return entry.app_name not in self._entries

    def _refresh_allowed(self) -> bool:
        return time.monotonic() - self._refreshed_at > MISS_REFRESH_MIN_INTERVAL_S

    def names_text(self) -> str:
        return ", ".join(sorted(self._by_name)) or "none (no model is running yet)"

    # ---- refresh ------------------------------------------------------------------------------------------

    async def refresh(self) -> None:
        async with self._lock:
            deployed = await asyncio.to_thread(self._list_apps)
            fresh, to_describe = {}, []
            for app, info in deployed.items():
                known = self._entries.get(app)
                if known is not None and (known.deployed_at == info.deployed_at or not info.running):
                    # Unchanged; or restarting, or redeployed with no new replica up yet: keep serving its names,
                    # and Serve holds requests until a replica is back (a model never 404s while it restarts).
                    fresh[app] = known
                elif info.running:
                    to_describe.append(app)
            described = await asyncio.gather(*(self._describe_app(app, deployed[app].deployed_at)
                                               for app in to_describe))
            undescribed = set()
            for app, entry in zip(to_describe, described):
                if entry is not None:
                    fresh[app] = entry
                elif app in self._entries:
                    fresh[app] = self._entries[app]  # redeployed but not answering yet: the old facts still hold
                else:
                    undescribed.add(app)
            for app in set(self._entries) - set(fresh):
                logger.info("gateway: model application %r left the table", app)
            self._entries = fresh
            self._by_name = {name: entry for entry in fresh.values() for name in entry.served_names}
            self._undescribed = undescribed
            self._refreshed_at = time.monotonic()

    async def _describe_app(self, app_name: str, deployed_at: float) -> ModelEntry | None:
        async def handle_and_facts():
            # get_app_handle asks the controller (blocking): off the event loop, and under the same timeout.
            handle = await asyncio.to_thread(self._get_handle, app_name)
            return handle, await self._describe(handle)

        try:
            handle, facts = await asyncio.wait_for(handle_and_facts(), DESCRIBE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a model that cannot describe itself is not served yet
            logger.warning("gateway: model application %r did not describe itself: %r", app_name, exc)
            return None
        logger.info("gateway: serving %r (%s) from application %r", facts["name"], facts["task"], app_name)
        return ModelEntry(app_name, deployed_at, facts, handle)
