"""Application builders: the `import_path` targets of configs/*.yaml.

    serve_app.app:model_app    one model (args: ModelConfig) -> a ModelServer deployment
    serve_app.app:gateway_app  the HTTP ingress (args: GatewayConfig) -> the Gateway and BatchRunner deployments

Each validates its args (unknown keys rejected, errors naming the key) before Serve deploys anything. Imports are
local so that building the gateway never loads torch.
"""

from __future__ import annotations

import os
from typing import Any

from ray.serve import Application

from serve_app.config import GatewayConfig, ModelConfig, validate_args


def model_app(args: dict[str, Any]) -> Application:
    config = validate_args(ModelConfig, args, "model")
    if config.deployment.request_router == "queued_work" and os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        # Ray 2.60 (serve/_private/build_app.py) refuses any custom router on an application's ingress deployment
        # under its HAProxy ingress, even one like ours that has no HTTP route: say so in our terms.
        raise ValueError(f"model {config.name!r}: deployment.request_router: queued_work needs Serve's Python proxy "
                         "(QWEN3_SERVE_HAPROXY=0 before Ray starts): under the HAProxy ingress Ray 2.60 refuses a "
                         "custom router on a model application's deployment; use power_of_two")
    from serve_app.replica.deployment import ModelServer

    return ModelServer.options(**config.deployment.serve_options(),
                               user_config=config.batching.model_dump()).bind(config.model_dump())


def gateway_app(args: dict[str, Any] | None = None) -> Application:
    """The Gateway deployment, and beside it in the same application the BatchRunner (serve_app/gateway/batches/runner.py):
    Serve restarts a runner that dies and removes it with the gateway; the gateway holds a handle to wake it."""
    config = validate_args(GatewayConfig, args, "gateway")
    from serve_app.gateway.batches.runner import BatchRunner
    from serve_app.gateway.ingress import Gateway

    runner = BatchRunner.options(**config.batches.runner.serve_options()).bind(config.model_dump())
    return Gateway.options(**config.deployment.serve_options()).bind(config.model_dump(), runner)
