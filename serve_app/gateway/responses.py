"""JSON responses rendered by orjson.

Starlette's JSONResponse renders with `json.dumps`, which is slow on what this gateway returns most: float vectors.
A 100 x 1024 float embedding response renders in 100.6 ms with json.dumps and 4.1 ms with orjson here
(bench/json_bench.py, BENCHMARKS.md), with identical JSON values: both write each float's shortest round-trip
repr. FastAPI's own ORJSONResponse is deprecated (FastAPI serializes response models itself now); the
gateway builds its bodies as plain dicts and lists, so it renders them here.
"""

from typing import Any

import orjson
from starlette.responses import JSONResponse


class OrjsonResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        # NaN and infinities become null (json.dumps would write invalid JSON); scores and vectors are finite.
        return orjson.dumps(content)
