"""Helpers shared by the engine and model-replica tests (and bench/pass_bench.py)."""

import copy


def engine_variant(engine, **changes):
    """The same engine (same weights) with other settings: engines keep their settings as plain attributes."""
    variant = copy.copy(engine)
    for name, value in changes.items():
        assert hasattr(variant, name), name
        setattr(variant, name, value)
    return variant


def replica_without_ray(config: dict, **batching) -> tuple:
    """The model replica's class (ModelServer) as a plain object, with `batching` applied, and `@serve.batch` (which
    needs a running Serve replica; tests/test_serving_deploy.py covers it there) replaced by a stand-in that hands
    each request on as a one-job batch would be. Returns the replica and the list of jobs that took the batch path."""
    from serve_app.replica.deployment import ModelServer

    server = ModelServer.func_or_class(config)
    if batching:
        server.reconfigure(batching)
    gathered = []

    async def serve_batch_stand_in(job):
        gathered.append(job)
        return (await server._forward([job]))[0]

    server._run_batch = serve_batch_stand_in
    return server, gathered
