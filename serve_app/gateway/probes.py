"""Probes for load balancers and Kubernetes, open without an API key:

    GET /health   liveness: the gateway replica answers (models may still be loading)
    GET /ready    readiness: 200 when every deployed model application has a running replica the gateway can
                  call, else 503 with Retry-After, the message naming the models still starting

`/ready` answers from the gateway's model directory (serve_app/gateway/directory.py), which lists the applications at most
every refresh_s (sooner while something is starting, never more than twice a second), so probing it often costs the
Serve controller nothing extra.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from serve_app.errors import ModelStarting
from serve_app.gateway import protocol
from serve_app.gateway.directory import STARTING_RETRY_AFTER_S, ModelDirectory

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", response_model=protocol.ReadyReport,
            responses={503: {"description": "a model is still starting (the message names them), or none is "
                                            "deployed; Retry-After says when to look again"}})
async def ready(request: Request) -> protocol.ReadyReport:
    directory: ModelDirectory = request.app.state.models
    readiness = await directory.readiness()
    retry = {"Retry-After": str(STARTING_RETRY_AFTER_S)}
    if not readiness.models:
        raise ModelStarting("not ready: no model application is deployed", headers=retry)
    if readiness.starting:
        raise ModelStarting(f"not ready: {len(readiness.starting)} of {len(readiness.models)} models still "
                            f"starting: {', '.join(readiness.starting)}", headers=retry)
    return protocol.ReadyReport(status="ready", models=readiness.models)
