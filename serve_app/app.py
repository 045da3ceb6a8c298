"""Application builders: the `import_path` targets of configs/*.yaml.

    serve_app.app:model_app    one model (args: ModelConfig) -> a ModelServer deployment
    serve_app.app:gateway_app  the HTTP ingress (args: GatewayConfig) -> the Gateway and BatchRunner deployments

Each validates its args (unknown keys rejected, errors naming the key) before Serve deploys anything. Imports are
local so that building the gateway never loads torch.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve_app.config import GatewayConfig, ModelConfig, validate_args


def model_app(args: dict[str, Any]) -> Application:
    config = validate_args(ModelConfig, args, "model")
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
