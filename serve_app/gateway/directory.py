"""The gateway's model table: {served name or alias: handle}, found at run time.

Each model is its own Serve application (serve_app/config.py says why), so the gateway does not take the model
list as args: it asks the Serve controller which applications run a `ModelServer` deployment, asks each new one
to describe itself (name, aliases, task, limits) and keeps a handle to it. The table refreshes in the background
every `refresh_s` and at once when a request names a model it does not know, so a model added with
`serve deploy` is served within seconds and the gateway never restarts for it.

Readiness comes from the same listing: a model application that is deployed but has no running replica yet (its
config applied but not yet built, or its weights loading) is *starting*. A request naming it, by name or alias,
gets 503 with Retry-After instead of a 404, and `/ready` (serve_app/gateway/probes.py) answers 503 until no model
is starting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, NamedTuple

from serve_app.config import MODEL_DEPLOYMENT_NAME, MODEL_IMPORT_PATH
from serve_app.errors import InvalidRequest, ModelNotFound, ModelStarting
from serve_app.periodic import Periodic

logger = logging.getLogger("ray.serve")

# A model that does not answer describe() within this is left out, and the next lookup or listing refreshes again
# (not only the background refresh). A miss refresh runs on a request's path, so this bounds how long an unknown
# name can wait. The first call from a fresh gateway replica also sets up its handle, which took over 2 s on the
# busy 2-core test machine.
DESCRIBE_TIMEOUT_S = 5.0
MISS_REFRESH_MIN_INTERVAL_S = 0.5
# Retry-After for a model that is starting: loading weights takes seconds (tiny) to minutes (8B from the hub), so a
# client polling every second would only add load to a gateway that cannot help it yet.
STARTING_RETRY_AFTER_S = 5


@dataclass(frozen=True)
class ModelEntry:
    app_name: str
    deployed_at: float  # the application's last deploy time: a redeploy re-describes the model
    facts: dict[str, Any]  # what the replica's describe() returned
    handle: Any  # DeploymentHandle to the model's ModelServer
    _methods: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def method(self, name: str) -> Any:
        """The handle for one of the model's methods. `handle.rerank` builds a new handle through options() on
        every access (1% of the gateway's CPU under load, BENCHMARKS.md), so each is made once per entry; a
        redeploy makes a new entry."""
        method = self._methods.get(name)
        if method is None:
            method = self._methods[name] = getattr(self.handle, name)
        return method

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
    # The model's name and aliases from the application's deployed config, known before any replica runs; empty
    # when Serve has no config for it (an application deployed from Python).
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Readiness:
    models: list[str]  # every deployed model application's model, by name
    starting: list[str]  # those without a running replica the gateway can call yet

    @property
    def ready(self) -> bool:
        return bool(self.models) and not self.starting


def serve_model_apps() -> dict[str, ModelApp]:
    """The deployed model applications, from the Serve controller (model_apps says which).

    Reads the controller's plain details dict rather than `serve.status()`, which validates it into pydantic
    models (cloudpickling every deployment's request-router class on the way): 68 ms of the gateway's CPU per
    call against 2 ms on the 2-core machine, every refresh_s, on the cores that serve requests (BENCHMARKS.md)."""
    from ray.serve.context import _get_global_client

    return model_apps(_get_global_client().get_serve_details())


def model_apps(details: dict[str, Any]) -> dict[str, ModelApp]:
    """The model applications in the controller's details: those running a ModelServer deployment, and those whose
    deployed config names our model builder but whose application is not built yet (Serve lists no deployment
    until the builder has run), so a model is starting, not unknown, from the moment its config is applied.
    Applications being deleted are left out: their replicas still run for a while but no longer answer."""
    deployed = {}
    for app_name, app in details.get("applications", {}).items():
        deployment = app.get("deployments", {}).get(MODEL_DEPLOYMENT_NAME)
        import_path = (app.get("deployed_app_config") or {}).get("import_path")
        if app.get("status") == "DELETING" or (deployment is None and import_path != MODEL_IMPORT_PATH):
            continue
        running = deployment is not None and any(replica.get("state") == "RUNNING"
                                                 for replica in deployment.get("replicas", []))
        deployed[app_name] = ModelApp(app.get("last_deployed_time_s", 0.0), running, configured_names(app))
    return deployed


def configured_names(app: dict[str, Any]) -> tuple[str, ...]:
    """The served names in an application's deployed config (its ModelConfig args): the model's name first."""
    args = (app.get("deployed_app_config") or {}).get("args") or {}
    name, aliases = args.get("name"), args.get("aliases") or []
    if not isinstance(name, str) or not isinstance(aliases, list):
        return ()
    return (name, *(alias for alias in aliases if isinstance(alias, str)))


async def serve_app_handle(app_name: str):
    """A by-value handle to the application's ingress. get_app_handle asks the controller (blocking), so it runs in
    a thread; options() sets the handle's router up, which needs this event loop when user code runs on the
    replica's main loop (RAY_SERVE_THROUGHPUT_OPTIMIZED=1 raises in a thread without one), so it runs here."""
    from ray import serve

    handle = await asyncio.to_thread(serve.get_app_handle, app_name)
    return handle.options(_by_reference=False)


class ModelDirectory:
    def __init__(self, refresh_s: float, *,
                 list_apps: Callable[[], dict[str, ModelApp]] = serve_model_apps,
                 get_handle: Callable[[str], Awaitable[Any]] = serve_app_handle,
                 describe: Callable[[Any], Awaitable[dict]] | None = None):
        self._list_apps = list_apps
        self._get_handle = get_handle
        self._describe = describe or (lambda handle: handle.describe.remote())
        self._entries: dict[str, ModelEntry] = {}  # by application name
        self._by_name: dict[str, ModelEntry] = {}  # by served name and alias
        self._lock = asyncio.Lock()
        self._refreshed_at = 0.0  # when the last refresh finished (monotonic)
        self._listed = False  # a refresh has listed the deployed applications at least once
        self._undescribed: set[str] = set()  # running applications the last refresh could not describe
        self._deployed: dict[str, ModelApp] = {}  # the last listing, by application name
        self._starting: dict[str, str] = {}  # served name -> model name, for deployed models not in the table yet
        self._refresher = Periodic(self.refresh, refresh_s, "the model table")

    # ---- lookups ------------------------------------------------------------------------------------------

    async def resolve(self, name: str, task: str | None) -> ModelEntry:
        """The model a request names; 503 while its application starts, 404 listing the served names when no
        application serves it, 400 for the wrong task (None: any task)."""
        self._refresher.ensure_started()
        entry = self._by_name.get(name)
        if entry is None and self._refresh_allowed():
            await self.refresh(unless_since=time.monotonic())
            entry = self._by_name.get(name)
        if entry is None:
            self.raise_if_starting(name)
            raise ModelNotFound(f"model {name!r} does not exist; served models: {self.names_text()}",
                                param="model")
        if task is not None and entry.task != task:
            same_task = sorted(e.name for e in self._entries.values() if e.task == task)
            raise InvalidRequest(f"model {name!r} is a {entry.task} model; {task} models: "
                                 f"{', '.join(same_task) or 'none'}", param="model", code="wrong_model_task")
        return entry

    def raise_if_starting(self, name: str) -> None:
        """503 with Retry-After when `name` belongs to a deployed model that no replica serves yet."""
        if name in self._starting:
            raise ModelStarting(f"model {self._starting[name]!r} is starting (no replica is running yet); retry in "
                                f"{STARTING_RETRY_AFTER_S} s", param="model",
                                headers={"Retry-After": str(STARTING_RETRY_AFTER_S)})

    async def entries(self) -> list[ModelEntry]:
        self._refresher.ensure_started()
        if not self._entries or (self._undescribed and self._refresh_allowed()):
            await self.refresh(unless_since=time.monotonic())
        return sorted(self._entries.values(), key=lambda e: e.name)

    async def readiness(self) -> Readiness:
        """Which deployed models the gateway can call now, and which are still starting. Answers from the latest
        listing (at most refresh_s old), refreshed first while something is starting, at most every
        MISS_REFRESH_MIN_INTERVAL_S: probes need no authentication, so they must not reach the controller more
        often than that however often they come."""
        self._refresher.ensure_started()
        if not self._listed or (not self._readiness().ready and self._refresh_allowed()):
            await self.refresh(unless_since=time.monotonic())
        return self._readiness()

    def _readiness(self) -> Readiness:
        def model_name(app: str) -> str:
            return self._deployed[app].names[0] if self._deployed[app].names else app

        return Readiness(models=sorted(model_name(app) for app in self._deployed),
                         starting=sorted(model_name(app) for app, info in self._deployed.items()
                                         if not info.running or app not in self._entries))

    def was_removed(self, entry: ModelEntry) -> bool:
        """True once a refresh finds the application behind `entry` deleted (a replica restart does not count)."""
        return entry.app_name not in self._entries

    def _refresh_allowed(self) -> bool:
        return time.monotonic() - self._refreshed_at > MISS_REFRESH_MIN_INTERVAL_S

    def names_text(self) -> str:
        return ", ".join(sorted(self._by_name)) or "none (no model is running yet)"

    # ---- refresh ------------------------------------------------------------------------------------------

    async def refresh(self, unless_since: float | None = None) -> None:
        """List the deployed applications and describe new ones. With `unless_since` (a monotonic time), skip it
        if a refresh finished after that time while this one waited for the lock: a burst of callers shares the
        listing that was under way when they came."""
        async with self._lock:
            if unless_since is not None and self._refreshed_at >= unless_since:
                return
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
            self._deployed = deployed
            # Served names of deployed models the table cannot route to yet: their config's names, and the
            # application's name (= the model's name in our configs) for applications deployed without one.
            self._starting = {served: (info.names or (app,))[0] for app, info in deployed.items() if app not in fresh
                              for served in {*info.names, app}}
            self._listed = True
            self._refreshed_at = time.monotonic()

    async def _describe_app(self, app_name: str, deployed_at: float) -> ModelEntry | None:
        async def handle_and_facts():
            handle = await self._get_handle(app_name)  # under the same timeout as describe()
            return handle, await self._describe(handle)

        try:
            handle, facts = await asyncio.wait_for(handle_and_facts(), DESCRIBE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a model that cannot describe itself is not served yet
            logger.warning("gateway: model application %r did not describe itself: %r", app_name, exc)
            return None
        logger.info("gateway: serving %r (%s) from application %r", facts["name"], facts["task"], app_name)
        return ModelEntry(app_name, deployed_at, facts, handle)
