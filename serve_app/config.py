"""The validated configuration of the service: one schema for the whole Serve config file.

A config file (configs/*.yaml) is a Ray Serve config that `serve run` / `serve deploy` accept as is. It holds
one Serve *application per model* plus one *gateway* application (the HTTP ingress):

    applications:
      - name: gateway                       # HTTP: auth, routes, model lookup
        route_prefix: /
        import_path: serve_app.app:gateway_app
        args: {...}                          # GatewayConfig
      - name: qwen3-reranker-0.6b           # no HTTP route: reached through the gateway only
        route_prefix: null
        import_path: serve_app.app:model_app
        args: {...}                          # ModelConfig

Why one application per model: Ray Serve restarts every deployment of an application whose `args` change
(design.md section 6). With one model per application, adding, removing or changing a model restarts that model
only; the gateway finds models at run time (serve_app/gateway/directory.py), so its args never list them.

Serve silently drops misspelled deployment options, so this module validates the *whole* file with
`extra="forbid"` everywhere: `python -m serve_app.replica.weights configs/prod.yaml` checks a file (`--fetch` also
fetches its models' weights), and every builder validates its own `args` again when Serve imports it. Errors name the bad
key, e.g. `applications.1.args.batching.token_budgt: Extra inputs are not permitted`.
"""

from __future__ import annotations

import re
from decimal import Context, Decimal, Inexact, InvalidOperation, Overflow, localcontext
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Exact arithmetic or an exception: products of counts and prices never round silently (Price here, credit amounts
# in serve_app/accounts/credit/amounts.py).
EXACT = Context(prec=60, traps=[Inexact, InvalidOperation, Overflow])

MODEL_IMPORT_PATH = "serve_app.app:model_app"
GATEWAY_IMPORT_PATH = "serve_app.app:gateway_app"
# The deployment class name inside every model application; the gateway discovers models by it.
MODEL_DEPLOYMENT_NAME = "ModelServer"
GATEWAY_DEPLOYMENT_NAME = "Gateway"
# The token-aware autoscaling policy (`autoscaling.queued_work`), as Serve imports it in its controller.
QUEUED_WORK_POLICY = "serve_app.replica.autoscaling:QueuedWorkPolicy"
# The token-aware router (`request_router: queued_work`), as Serve imports it wherever a handle to the model is.
QUEUED_WORK_ROUTER = "serve_app.replica.routing:QueuedWorkRouter"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BatchingConfig(Strict):
    """How requests are gathered (Serve queue) and cut into forward passes (engine micro-batches).

    Lives in the deployment's `user_config`: changing it reconfigures running replicas without a restart.
    """

    # Padded token slots per forward micro-batch (B x T_max). None: the engine's measured default for its
    # device (1024 on CPU, 32768 on CUDA; BENCHMARKS.md).
    token_budget: int | None = Field(default=None, ge=64)
    # Most sequences in one forward micro-batch. None: the engine's default for its device (64 on CPU, 96 on CUDA,
    # where fewer, fuller passes are what counts; models/base.py says what was measured).
    max_items: int | None = Field(default=None, ge=1)
    # Tokens gathered from concurrent requests into one engine call (the @serve.batch budget, counted with
    # batch_size_fn). A single request larger than this still runs: in parts (max_pass_seconds), or whole and
    # alone when max_pass_seconds is None.
    max_batch_tokens: int = Field(default=65536, ge=256)
    # How long the first request of a batch waits for company in @serve.batch. Only requests that arrive while the
    # engine is busy take that path (they would wait for the running pass anyway); one that finds it idle runs at
    # once (serve_app/replica/deployment.py).
    max_wait_ms: float = Field(default=2.0, ge=0, le=1000)
    # Requests a replica accepts while its engine is busy, beyond those in the running forward pass; the next
    # one is refused at once (503 + Retry-After) instead of waiting. Bounds latency per replica, whatever the
    # number of gateway replicas (Serve's max_queued_requests counts per caller, and is at least 1). 0: an
    # accepted request never waits for a whole forward pass (CPU, where batching adds no throughput). None: only
    # Serve's max_ongoing_requests bounds it.
    max_waiting_requests: int | None = Field(default=None, ge=0)
    # Background work (Batch API lines) starts a forward pass only when no online request is inside the replica and
    # none has been for this long: the gap between one client's back-to-back requests is shorter, so a stream of
    # online requests never waits behind a background pass (only the first after a quiet spell may, for one pass).
    background_grace_ms: float = Field(default=100.0, ge=0, le=10_000)
    # About how long one engine run may compute, at the replica's measured tokens per second (never less than the
    # engine's token_budget): a request that arrives during a run waits for all of it. A request larger than that
    # runs in parts (whole documents or inputs), and requests that arrive meanwhile are taken in between
    # (serve_app/replica/passes.py). None: unbounded (a request is one run, however long; runs still stop at
    # max_batch_tokens).
    max_pass_seconds: float | None = Field(default=0.25, gt=0)


class QueuedWorkConfig(Strict):
    """Scale a model on the work its replicas hold, in tokens, instead of on the number of requests
    (serve_app/replica/autoscaling.py): enough replicas that the online tokens queued drain within
    target_queue_seconds at the tokens per second the replicas have been computing."""

    # How long the online work queued in a model's replicas may take to drain at their measured throughput: the
    # queue wait the policy steers towards. Lower: more replicas, sooner.
    target_queue_seconds: float = Field(default=1.0, gt=0)
    # Background work (Batch API lines) alone never adds replicas while this is None: it fills the capacity online
    # traffic leaves. A number: replicas are also added so that background work drains within this many seconds.
    background_queue_seconds: float | None = Field(default=None, gt=0)
    # What a replica assumes it computes before it has measured it (tokens per second). None: the per-device
    # estimate in serve_app/replica/autoscaling.py (from the device and the model's parameters).
    estimated_tokens_per_s: float | None = Field(default=None, gt=0)

    def policy_kwargs(self) -> dict[str, Any]:
        return {"target_queue_seconds": self.target_queue_seconds,
                "background_queue_seconds": self.background_queue_seconds}


DEFAULT_TARGET_ONGOING_REQUESTS = 8.0


class AutoscalingConfig(Strict):
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=4, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    # Serve's request-count policy: in-flight requests per replica that Serve steers towards (None: 8). Model
    # replicas batch, so a few queued requests are what keeps batches full. Not with queued_work.
    target_ongoing_requests: float | None = Field(default=None, gt=0)
    # The token-aware policy instead of Serve's request count (models only). Leave it out to fall back to Serve's.
    queued_work: QueuedWorkConfig | None = None
    upscale_delay_s: float = Field(default=10, ge=0)
    downscale_delay_s: float = Field(default=300, ge=0)
    # Serve's smoothing, applied to either policy's decision: the fraction of the step from the current to the
    # wanted replica count taken at once (None: 1, the whole step).
    upscaling_factor: float | None = Field(default=None, gt=0)
    downscaling_factor: float | None = Field(default=None, gt=0)
    # Over how long Serve averages the load it scales on (Serve's default 30 s when unset): shorter reacts faster
    # to bursts and follows noise more.
    look_back_period_s: float | None = Field(default=None, gt=0)
    # How often handles and replicas report their load to the controller (Serve's default 10 s when unset): no
    # scaling decision can come sooner after a change of load. Serve 2.60 calls this field deprecated in favour of
    # RAY_SERVE_HANDLE/REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S, but does not read those variables yet
    # (ray/serve/_private/router.py and replica.py push every `metrics_interval_s`), so the field is the knob.
    metrics_interval_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        # Each load report covers only the last look_back_period_s, so a window no longer than the interval between
        # reports leaves the load between them unseen (Serve warns, and says a later release will refuse it; it does
        # not check its own defaults).
        interval, look_back = self.metrics_interval_s or 10.0, self.look_back_period_s or 30.0
        if look_back <= interval:
            raise ValueError(
                f"look_back_period_s ({look_back:g}{'' if self.look_back_period_s else ', Serve default'}) must be "
                f"longer than metrics_interval_s ({interval:g}{'' if self.metrics_interval_s else ', Serve default'})")
        if self.queued_work is not None and self.target_ongoing_requests is not None:
            raise ValueError("target_ongoing_requests is the request-count policy's target and queued_work replaces "
                             "that policy: set one of them")
        return self

    @property
    def look_back_s(self) -> float:
        """The look-back window Serve uses (its default when unset)."""
        return self.look_back_period_s or 30.0

    def serve_options(self) -> dict[str, Any]:
        """Serve's `autoscaling_config`: queued_work becomes Serve's `policy` (our policy's import path and its
        kwargs); without it Serve's default request-count policy applies."""
        options = self.model_dump(exclude_none=True, exclude={"queued_work"})
        options.setdefault("target_ongoing_requests", DEFAULT_TARGET_ONGOING_REQUESTS)
        if self.queued_work is not None:
            options["policy"] = {"policy_function": QUEUED_WORK_POLICY,
                                 "policy_kwargs": self.queued_work.policy_kwargs()}
        return options


# The gateway calls models over Serve's gRPC transport (handles with _by_reference=False), whose receive limit is
# 4 MiB unless raised: a body near max_body_bytes, or 2048 vectors of an 8B embedder (32 MiB of float32), failed
# with RESOURCE_EXHAUSTED, a 500. Every replica (the gateway receives answers, models receive requests) raises it.
INTERNAL_MESSAGE_LIMIT_BYTES = 1 << 30
MAX_BODY_BYTES_LIMIT = 256 * 2**20  # so that any allowed body, and its answer, fits the limit above


class DeploymentOptions(Strict):
    """Ray Serve options of one deployment. Either a fixed `num_replicas` or `autoscaling`."""

    num_replicas: int | None = Field(default=None, ge=1)
    autoscaling: AutoscalingConfig | None = None
    num_cpus: float = Field(default=1, ge=0)
    # Fractions share a GPU between models (prod.yaml sizes them from each model's memory).
    num_gpus: float = Field(default=0, ge=0)
    memory_gib: float | None = Field(default=None, gt=0)
    max_ongoing_requests: int = Field(default=32, ge=1)
    # Requests waiting in each caller's queue before Serve answers 503/429; -1 = unbounded.
    max_queued_requests: int = Field(default=256, ge=-1)
    # What a client gets when that queue is full and Serve refuses the request itself, not our code (in front of
    # the gateway: the gateway replica's own HTTP server under the HAProxy ingress, Serve's proxy under the Python
    # one): 503 or 429, with Retry-After in seconds so clients back off.
    backpressure_status: Literal[503, 429] = 503
    backpressure_retry_after_s: float | None = Field(default=1, ge=0)
    health_check_period_s: float = Field(default=10, gt=0)
    health_check_timeout_s: float = Field(default=30, gt=0)
    graceful_shutdown_timeout_s: float = Field(default=20, ge=0)
    # Start-up failures (weights missing, hub unreachable) rarely heal by retrying: fail the deploy after a few
    # tries so `serve run` stops and shows the error, instead of Serve's 20.
    max_constructor_retries: int = Field(default=3, ge=1)
    # Which replica gets a request: Serve's power of two choices on requests in flight, or (models only) the replica
    # holding the fewest tokens of work (serve_app/replica/routing.py), which keeps small requests from queueing
    # behind a replica's huge one. queued_work needs Serve's Python proxy: under the HAProxy ingress Ray 2.60 refuses
    # custom routers on an application's ingress deployment (serve_app/app.py says so at deploy time).
    request_router: Literal["power_of_two", "queued_work"] = "power_of_two"
    # How often each replica reports the tokens it holds to the queued-work router (Serve's default: 10 s).
    routing_stats_period_s: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> "DeploymentOptions":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set either num_replicas or autoscaling, not both")
        return self

    def serve_options(self) -> dict[str, Any]:
        """The keyword arguments of `Deployment.options()`."""
        message_limit = {"RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(INTERNAL_MESSAGE_LIMIT_BYTES)}
        actor_options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                                         "runtime_env": {"env_vars": message_limit}}
        if self.memory_gib is not None:
            actor_options["memory"] = int(self.memory_gib * 2**30)
        options: dict[str, Any] = {
            "ray_actor_options": actor_options,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "backpressure_config": {"status_code": self.backpressure_status,
                                    "retry_after_s": self.backpressure_retry_after_s},
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "max_constructor_retry_count": self.max_constructor_retries,
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.serve_options()
        else:
            options["num_replicas"] = self.num_replicas or 1
        if self.request_router == "queued_work":
            options["request_router_config"] = {"request_router_class": QUEUED_WORK_ROUTER,
                                                "request_routing_stats_period_s": self.routing_stats_period_s}
        return options


class Price(Strict):
    """What usage of a model costs, priced the way hosted APIs price these models: the gateway debits prepaid keys
    by it (serve_app/accounts/credit) and the usage report multiplies it out. Exact decimals (a YAML 0.05 is the decimal
    0.05), with at most as many decimal places as make the cost of one document or one token a whole number of
    the credit store's 10^-12 units, so no cost is ever rounded."""

    per_1k_documents: Decimal | None = Field(default=None, ge=0, decimal_places=9)  # rerankers: per 1,000 documents
    per_1m_tokens: Decimal | None = Field(default=None, ge=0, decimal_places=6)  # embedders: per 1M input tokens
    # Batch API usage costs this fraction of the price (OpenAI charges batches half).
    batch_factor: Decimal = Field(default=Decimal(1), ge=0, le=1, decimal_places=3)

    @model_validator(mode="after")
    def _some_price(self) -> "Price":
        if self.per_1k_documents is None and self.per_1m_tokens is None:
            raise ValueError("a price needs per_1k_documents (rerankers) or per_1m_tokens (embedders)")
        # The batch price must stay a whole number of 10^-12 units per document and per token, like the price.
        with localcontext(EXACT):
            for rate, places in ((self.per_1k_documents, 9), (self.per_1m_tokens, 6)):
                if rate is not None and -(rate * self.batch_factor).normalize().as_tuple().exponent > places:
                    raise ValueError(f"batch_factor {self.batch_factor} times {rate} needs more than {places} "
                                     "decimal places; the credit store could not hold that cost exactly")
        return self

    def cost(self, usage: Mapping[str, Any]) -> Decimal:
        """The exact cost of a usage row (a ledger row, or a model's totals over rows): its documents at
        per_1k_documents plus its input tokens at per_1m_tokens, times batch_factor for Batch API usage (a row
        with a `batch_id`, or report totals with `batch` true). It takes the row, not two counts, so that what
        else a row says can price it too."""
        with localcontext(EXACT):
            cost = ((Decimal(usage["documents"]) * (self.per_1k_documents or 0)).scaleb(-3)
                    + (Decimal(usage["input_tokens"]) * (self.per_1m_tokens or 0)).scaleb(-6))
            return cost * self.batch_factor if usage.get("batch_id") or usage.get("batch") else cost


class ModelConfig(Strict):
    """One served model: the args of a `serve_app.app:model_app` application."""

    # The name clients put in `model`; aliases resolve to the same model (e.g. the hub id).
    name: str = Field(min_length=1, max_length=128, pattern=r"^[\w.:/-]+$")
    aliases: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(default_factory=list)
    task: Literal["rerank", "embed"]
    # A hub repo id ("Qwen/Qwen3-Reranker-0.6B") or a local directory. Local paths start with "/", "./",
    # "../" or "~" so that the two can never be confused.
    source: str
    revision: str | None = None
    # Build a random-weight offline checkpoint at `source` when it is missing (tiny.yaml: CI and trying the
    # API without downloads). Only for local paths.
    build_offline: Literal["tiny"] | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_length: int = Field(default=8192, ge=16, le=32768)
    # torch threads of the replica. None: the replica's num_cpus (at least 1), as Ray intends.
    cpu_threads: int | None = Field(default=None, ge=1)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    # Optional: what a request costs prepaid keys (debited from their credit) and the amounts in the usage report
    # (python -m serve_app.usage --config ...). No price: the model costs nothing.
    price: Price | None = None
    # Rerankers: how many token windows a document too long for max_length is split into when a request does not
    # say (Cohere's max_chunks_per_doc); each is scored as a document and the document gets the best score.
    # None: one window, i.e. cut as the model card does.
    max_chunks_per_doc: int | None = Field(default=None, ge=1)
    # Embedders: the file that fixes this model's int8/uint8 ranges, made once from the shipped calibration corpus
    # by `python -m serve_app.replica.quantization.calibration` (a local path, as `source`). None: int8 and uint8
    # embeddings are refused (400); float, base64 and binary need none. With build_offline, a missing file is made
    # at start-up (offline test models only: the ranges of real weights must come from one reviewed file).
    calibration: str | None = None

    @field_validator("source")
    @classmethod
    def _source_kind(cls, source: str) -> str:
        if not (is_local_path(source) or _HUB_ID.match(source)):
            raise ValueError(f"{source!r} is neither a hub repo id (org/name) nor a local path "
                             "(start local paths with '/', './', '../' or '~')")
        return source

    @model_validator(mode="after")
    def _offline_needs_local_path(self) -> "ModelConfig":
        if self.build_offline and not is_local_path(self.source):
            raise ValueError("build_offline needs a local path as source")
        return self

    @model_validator(mode="after")
    def _task_options(self) -> "ModelConfig":
        if self.max_chunks_per_doc is not None and self.task != "rerank":
            raise ValueError("max_chunks_per_doc applies to rerank models only")
        if self.calibration is not None:
            if self.task != "embed":
                raise ValueError("calibration applies to embed models only")
            if not is_local_path(self.calibration):
                raise ValueError(f"calibration {self.calibration!r} must be a local path (start it with '/', "
                                 "'./', '../' or '~')")
        return self

    @property
    def served_names(self) -> list[str]:
        return [self.name, *self.aliases]


class AuthConfig(Strict):
    # Off only for trying things out (configs/tiny.yaml); the gateway says so at start-up.
    enabled: bool = True
    # How often each gateway replica reloads the active keys: a revoked key stops working within this.
    key_refresh_s: float = Field(default=2.0, gt=0, le=60)


class LocalFileStorage(Strict):
    """Batch files in a directory of this machine (one-machine deployments). Relative paths are under the project
    root, like the SQLite default."""

    kind: Literal["local"] = "local"
    path: str = "var/batch-files"


class S3FileStorage(Strict):
    """Batch files in S3-compatible object storage (a cluster: every gateway replica and the runner see them), through
    s3fs. Credentials come from the usual AWS sources (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, an
    instance role), never from this file."""

    kind: Literal["s3"]
    url: str = Field(pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$")  # s3://bucket/optional/prefix
    endpoint_url: str | None = None  # for S3-compatible servers (MinIO, Ceph, ...); None: AWS
    region: str | None = None


class BatchesConfig(Strict):
    """The OpenAI Batch API (serve_app/gateway/batches/): limits, where files live, and how the runner works."""

    storage: LocalFileStorage | S3FileStorage = Field(default_factory=LocalFileStorage, discriminator="kind")
    # OpenAI's limits: an upload past max_file_bytes or max_file_lines is refused with 413; an embeddings batch
    # whose file holds more than max_embedding_inputs inputs in all is refused at create with 400.
    max_file_bytes: int = Field(default=200 * 2**20, ge=1024)
    max_file_lines: int = Field(default=50_000, ge=1)
    max_embedding_inputs: int = Field(default=50_000, ge=1)
    # Batch lines waiting on one model at once, from one runner replica: the model's background queue holds at most
    # this many, so bulk work cannot crowd out online requests, yet keeps an idle model busy. 16: the engine gets
    # about 8 lines a pass while the next 8 wait (8 gave passes of 4 and embeddings at 89% of online saturation,
    # 16 gave 93-109% in three runs; BENCHMARKS.md, Batch API). Serve counts background lines against the models'
    # max_ongoing_requests (32 by default) too, so runner replicas x this should stay below it.
    max_in_flight_per_model: int = Field(default=16, ge=1, le=1024)
    # Batches one runner replica works on at once (more wait in validating/in_progress until one ends).
    max_running_batches: int = Field(default=4, ge=1)
    # Progress is made durable (output part written, lines billed, position saved) every checkpoint_lines lines or
    # checkpoint_s seconds, whichever comes first: what a killed runner redoes at most.
    checkpoint_lines: int = Field(default=512, ge=1)
    checkpoint_s: float = Field(default=10.0, gt=0)
    # A runner replica holds a batch for lease_s past its last heartbeat (every poll_s); a replica that died gives
    # its batches up after that, to the next runner replica that polls.
    lease_s: float = Field(default=30.0, gt=0)
    poll_s: float = Field(default=1.0, gt=0)
    # How long a line whose model answered 503/504 (overloaded, restarting) is retried before it goes to the
    # error file with that status.
    line_retry_s: float = Field(default=3600.0, ge=0)
    runner: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(
        num_cpus=0.25, num_replicas=1, max_ongoing_requests=64, health_check_period_s=5))

    @model_validator(mode="after")
    def _lease_outlives_heartbeats(self) -> "BatchesConfig":
        if self.lease_s < 2 * self.poll_s:
            raise ValueError(f"lease_s ({self.lease_s}) must be at least twice poll_s ({self.poll_s}): the lease is "
                             "renewed every poll_s")
        _no_queued_work(self.runner, "runner")
        return self


class DefaultModels(Strict):
    """The model (served name or alias) of each task that serves requests naming none. A TEI server hosts one model,
    so TEI clients send no model name: /tei/<model>/... names it in the URL, and the bare TEI paths (/embed, /rerank
    with `texts`, /tokenize, /decode, /info) use these, as do vLLM's /tokenize, /detokenize and /score bodies without
    `model`. /embed and /rerank take their task's model; the task-less paths the embed model, else the rerank one.
    None: such requests get 400 naming the per-model base URLs. Models are found at run time (as every model the
    gateway serves), so a name no model has is answered 404 at request time, naming the setting."""

    embed: str | None = Field(default=None, min_length=1)
    rerank: str | None = Field(default=None, min_length=1)


class TEIConfig(Strict):
    """Text Embeddings Inference's routes (serve_app/gateway/tei.py)."""

    # TEI's --auto-truncate: what `truncate` is when a TEI request leaves it out (TEI's default: false, so an input
    # longer than the model's max_length is refused with 413 rather than cut).
    auto_truncate: bool = False


class HopSharingConfig(Strict):
    """Concurrent requests for one model sharing the hop to it (serve_app/gateway/hop_sharing.py). A request that finds
    no call to its model (same method) in flight from its gateway replica is sent at once, alone; requests that come
    while one is in flight wait in the gateway until a call to that model returns, at most `max_wait_ms`, and then go
    together in one handle call of at most `max_items` requests. Each keeps its own answer, error, usage row and
    cancellation."""

    enabled: bool = True
    max_items: int = Field(default=32, ge=2, le=256)
    # Calls to one model a gateway replica lets run at once before requests wait to share the next. 1 shares the
    # most (a call carries whatever arrived during the one before); more lets requests at light load go in parallel,
    # each at once, as without sharing.
    max_calls_in_flight: int = Field(default=1, ge=1, le=64)
    # The longest a request waits in the gateway for the call in flight to return; past it the requests gathered
    # so far go anyway, so a slow call (a large request) never holds small ones back for long.
    max_wait_ms: float = Field(default=10.0, ge=0, le=1000)


class GatewayConfig(Strict):
    """The ingress: the args of the `serve_app.app:gateway_app` application."""

    # API keys (and the usage ledger): SQLite for one machine, PostgreSQL for a cluster. $QWEN3_SERVE_DB overrides
    # it (keeps passwords out of config files). A relative SQLite path is under the project root.
    database_url: str = "sqlite:///var/qwen3-serve.db"
    auth: AuthConfig = Field(default_factory=AuthConfig)
    batches: BatchesConfig = Field(default_factory=BatchesConfig)
    default_models: DefaultModels = Field(default_factory=DefaultModels)
    tei: TEIConfig = Field(default_factory=TEIConfig)

    deployment: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(
        num_cpus=0.5, max_ongoing_requests=256, max_queued_requests=1024))
    # Request limits: past them clients get 413 with the limit in the message.
    max_body_bytes: int = Field(default=32 * 2**20, ge=1024, le=MAX_BODY_BYTES_LIMIT)
    max_embedding_inputs: int = Field(default=2048, ge=1)
    max_rerank_documents: int = Field(default=1000, ge=1)
    # How often the gateway refreshes its model table from the Serve controller (a miss refreshes at once).
    model_refresh_s: float = Field(default=2.0, gt=0)
    # Seconds a client is told to wait (Retry-After) when a model is overloaded.
    retry_after_s: int = Field(default=1, ge=0)
    # Browser origins allowed to call the API (CORS). Empty: no CORS headers at all, so browsers refuse
    # cross-origin calls; API keys belong on servers, not in web pages.
    cors_allow_origins: list[str] = Field(default_factory=list)
    # A request whose model has not answered after this gets 504 and its model call is cancelled (not billed).
    request_timeout_s: float = Field(default=120, gt=0)
    # Tries of a model call whose replica died before answering (1 = no retry). Safe: models are pure functions.
    model_call_attempts: int = Field(default=3, ge=1, le=10)
    hop_sharing: HopSharingConfig = Field(default_factory=HopSharingConfig)

    @model_validator(mode="after")
    def _scales_on_requests(self) -> "GatewayConfig":
        _no_queued_work(self.deployment, "deployment")
        return self


def _no_queued_work(options: DeploymentOptions, where: str) -> None:
    """Only model replicas report the work they hold; any other deployment scales on Serve's request count and is
    routed by Serve's own router."""
    if options.autoscaling is not None and options.autoscaling.queued_work is not None:
        raise ValueError(f"{where}.autoscaling.queued_work: only model deployments report queued work; this one "
                         "scales on target_ongoing_requests")
    if options.request_router == "queued_work":
        raise ValueError(f"{where}.request_router: queued_work routes by the work model replicas report; this "
                         "deployment takes power_of_two")


# ---- the whole Serve config file ---------------------------------------------------------------------------

class DeploymentOverride(Strict):
    """A `deployments:` entry of an application. Only user_config is meant to change here (batching without a
    restart); everything else belongs in the model's `deployment` args, where it is validated."""

    name: str
    user_config: BatchingConfig | None = None


class ModelApplication(Strict):
    name: str
    route_prefix: None = None
    import_path: Literal["serve_app.app:model_app"]
    args: ModelConfig
    deployments: list[DeploymentOverride] = Field(default_factory=list)
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    logging_config: dict[str, Any] | None = None  # Serve's own (log level, access log), checked by Serve

    @model_validator(mode="after")
    def _named_after_model(self) -> "ModelApplication":
        if self.name != self.args.name:
            raise ValueError(f"application name {self.name!r} must equal its model's name {self.args.name!r}")
        for override in self.deployments:
            if override.name != MODEL_DEPLOYMENT_NAME:
                raise ValueError(f"deployment {override.name!r} does not exist; the model deployment is "
                                 f"{MODEL_DEPLOYMENT_NAME!r}")
        return self


class GatewayApplication(Strict):
    name: str = "gateway"
    route_prefix: str = "/"
    import_path: Literal["serve_app.app:gateway_app"]
    args: GatewayConfig = Field(default_factory=GatewayConfig)
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    logging_config: dict[str, Any] | None = None


def _application_kind(raw: Any) -> str:
    if isinstance(raw, dict) and raw.get("import_path") == GATEWAY_IMPORT_PATH:
        return "gateway"
    return "model"


class HTTPOptions(Strict):
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=1, le=65535)
    request_timeout_s: float | None = Field(default=None, gt=0)
    keep_alive_timeout_s: float | None = Field(default=None, gt=0)


class ServeConfigFile(Strict):
    """A configs/*.yaml file: Serve's own top-level keys plus our applications."""

    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = "EveryNode"
    http_options: HTTPOptions = Field(default_factory=HTTPOptions)
    logging_config: dict[str, Any] | None = None
    applications: list[dict[str, Any]]

    @model_validator(mode="after")
    def _applications(self) -> "ServeConfigFile":
        errors: list[str] = []
        gateways, names = 0, {}
        for position, raw in enumerate(self.applications):
            kind = ModelApplication if _application_kind(raw) == "model" else GatewayApplication
            try:
                app = kind.model_validate(raw)
            except ValidationError as exc:
                errors.extend(f"applications.{position}.{line}" for line in format_errors(exc))
                continue
            if isinstance(app, GatewayApplication):
                gateways += 1
                continue
            for served in app.args.served_names:
                if served in names:
                    errors.append(f"applications.{position}.args: model name {served!r} is already used by "
                                  f"application {names[served]!r}")
                names[served] = app.name
        if gateways != 1:
            errors.append(f"applications: exactly one gateway application ({GATEWAY_IMPORT_PATH}) is needed, "
                          f"found {gateways}")
        if errors:
            raise ValueError("\n".join(errors))
        return self

    def model_configs(self) -> list[ModelConfig]:
        return [ModelConfig.model_validate(raw["args"]) for raw in self.applications
                if _application_kind(raw) == "model"]

    def gateway_config(self) -> GatewayConfig:
        raw = next(raw for raw in self.applications if _application_kind(raw) == "gateway")
        return GatewayConfig.model_validate(raw.get("args") or {})


def is_local_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~"))


def format_errors(exc: ValidationError) -> list[str]:
    """Pydantic errors as `dotted.key: message` lines."""
    return [f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors()]


def validate_args(schema: type[Strict], args: dict[str, Any] | None, what: str) -> Strict:
    """Validate an application's args; raise a ValueError that names every bad key (Serve shows it)."""
    try:
        return schema.model_validate(args or {})
    except ValidationError as exc:
        raise ValueError(f"invalid {what} config:\n  " + "\n  ".join(format_errors(exc))) from None


def load_config_file(path: str | Path) -> ServeConfigFile:
    raw = yaml.safe_load(Path(path).read_text())
    try:
        return ServeConfigFile.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"{path}: invalid config:\n  " + "\n  ".join(format_errors(exc))) from None
