"""Cohere's embed API v2, `POST /v2/embed`, exactly as `cohere.ClientV2.embed` sends it.

    {"model", "input_type", "texts" | "inputs", "embedding_types"?, "output_dimension"?, "max_tokens"?,
     "truncate"?, "instruction"? (extension)}
    -> {"id", "response_type": "embeddings_by_type", "embeddings": {<type>: [...] per text}, "texts",
        "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens"}}}

- `input_type` picks Qwen3-Embedding's instruction (serve_app/replica/instructions.py); `instruction` overrides it;
  `image` is refused (400): the model embeds text.
- `texts`, or `inputs` whose content items are all text (several in one input are joined by newlines, one vector
  per input).
- `embedding_types`: any of float, int8, uint8, binary, ubinary, base64, several at once (serve_app/replica/quantization
  defines them; int8/uint8 need the model's calibration file, or 400).
- `output_dimension` 32 to native; `max_tokens` caps the tokens embedded per input; `truncate` NONE refuses a
  longer input (400 naming it), END cuts its end (the default), START its start (the instruction stays).

Limits, auth, credit, usage ledger, metrics and errors are /v1/embeddings' own: both go through
`serve_app.gateway.handling.embed_inputs`, and the gateway serves `COHERE_EMBED` as it serves every endpoint (so a batch can
name /v2/embed too).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serve_app.errors import InvalidRequest
from serve_app.gateway import protocol
from serve_app.gateway.bodies import json_body, parse_body
from serve_app.gateway.handling import Endpoint, RequestContext, Served, embed_inputs
from serve_app.replica import quantization
from serve_app.replica.instructions import INPUT_TYPE_INSTRUCTIONS

router = APIRouter()

API_VERSION = {"version": "2"}
# How the texts of one input's several content items become one text.
CONTENT_SEPARATOR = "\n"


@router.post("/v2/embed", responses={200: {"model": protocol.CohereEmbedResponse}},
             openapi_extra=json_body(protocol.CohereEmbedRequest))
async def embed_v2(request: Request) -> JSONResponse:
    gateway = request.app.state.gateway
    return await gateway.respond(request, COHERE_EMBED, await parse_body(request, COHERE_EMBED.schema))


async def serve_embed_by_type(body: protocol.CohereEmbedRequest, context: RequestContext) -> Served:
    """A parsed /v2/embed body -> its response body and usage."""
    texts, field = input_texts(body)
    instruction = body.instruction if body.instruction is not None else query_instruction(body.input_type)
    types = list(dict.fromkeys(body.embedding_types))  # each type once, in the order asked
    renamed = {"input": field, "dimensions": "output_dimension"}
    try:
        _, out, usage = await embed_inputs(
            context, body.model, texts, param=field, instruction=instruction, dimensions=body.output_dimension,
            truncate=body.truncate != "NONE", truncate_side="start" if body.truncate == "START" else "end",
            max_tokens=body.max_tokens, with_ranges=not quantization.CALIBRATED_TYPES.isdisjoint(types))
    except InvalidRequest as exc:
        exc.param = renamed.get(exc.param, exc.param)
        raise
    return Served({
        "id": context.request_id,
        "response_type": "embeddings_by_type",
        "embeddings": quantization.encode(out["embeddings"], types, out.get("ranges")),
        "texts": texts,
        "meta": {"api_version": API_VERSION, "billed_units": {"input_tokens": usage.input_tokens}},
    }, usage)


def query_instruction(input_type: str) -> str | None:
    if input_type == "image":
        raise InvalidRequest("input_type 'image' is not supported: Qwen3-Embedding embeds text; use "
                             "search_document, search_query, classification or clustering", param="input_type")
    return INPUT_TYPE_INSTRUCTIONS[input_type]


def input_texts(body: protocol.CohereEmbedRequest) -> tuple[list[str], str]:
    """The texts to embed and the field they came in (`texts` or `inputs`)."""
    if body.images:
        raise InvalidRequest("images are not supported: Qwen3-Embedding embeds text", param="images")
    if body.texts is not None and body.inputs is not None:
        raise InvalidRequest("send texts or inputs, not both", param="inputs")
    if body.texts is not None:
        return list(body.texts), "texts"
    if body.inputs is None:
        raise InvalidRequest("texts: send the texts to embed (texts, or inputs with text content)", param="texts")
    texts = []
    for position, item in enumerate(body.inputs):
        for part_position, part in enumerate(item.content):
            if isinstance(part, protocol.CohereImageContent):
                raise InvalidRequest(f"inputs.{position}.content.{part_position}: image content is not supported: "
                                     "Qwen3-Embedding embeds text", param="inputs")
            if part.text is None:
                raise InvalidRequest(f"inputs.{position}.content.{part_position}: a text item needs its text",
                                     param="inputs")
        texts.append(CONTENT_SEPARATOR.join(part.text for part in item.content))
    return texts, "inputs"


COHERE_EMBED = Endpoint(protocol.CohereEmbedRequest, serve_embed_by_type)
