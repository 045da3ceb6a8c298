"""Ray Serve's own floor for a two-hop design: proxy -> FastAPI ingress -> handle call -> a deployment that
returns constants. Whatever our stack takes above this, per request, is ours to cut (bench/floor_bench.py).

The ingress reads the body (any server must) and answers with the constant deployment's dict as JSON; no auth,
no validation, no model, no ledger. Deployed as `bench.floor_app:floor_app` next to our applications.
"""

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

floor_api = FastAPI()


@serve.deployment(name="Constants", max_ongoing_requests=256)
class Constants:
    async def rerank(self) -> dict:
        return {"scores": [0.5], "token_counts": [20]}

    async def embed(self) -> dict:
        return {"embeddings": [[0.0] * 32], "token_counts": [20]}


@serve.deployment(name="FloorIngress", max_ongoing_requests=256)
@serve.ingress(floor_api)
class FloorIngress:
    def __init__(self, constants):
        self.constants = constants

    @floor_api.post("/v1/rerank")
    async def rerank(self, request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse(await self.constants.rerank.remote())

    @floor_api.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse(await self.constants.embed.remote())


def floor_app(args: dict | None = None):
    options = {"ray_actor_options": {"num_cpus": (args or {}).get("num_cpus", 0)}}
    return FloorIngress.options(**options).bind(Constants.options(**options).bind())
