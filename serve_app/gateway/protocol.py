"""Wire schemas only: what clients send and get back. No serving logic here.

Request models ignore unknown fields (SDKs add fields over time and must keep working) but validate every
field they know. Shapes follow design.md section 5: OpenAI embeddings; Cohere v2 / Jina / vLLM rerank; Text
Embeddings Inference's routes; vLLM's tokenizer helpers and score.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

NonNegativeTokenId = Annotated[StrictInt, Field(ge=0)]


def _has_text(query: str) -> str:
    # The model would score an empty query (the model card's prompt allows it), but every document would
    # then be ranked against nothing: that is a client bug, so say so instead of billing for noise.
    if not query.strip():
        raise ValueError("query must not be empty or only whitespace: send the text to rank the documents against")
    return query


QueryText = Annotated[StrictStr, AfterValidator(_has_text)]


class WireModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---- embeddings (OpenAI) ----------------------------------------------------------------------------------

class EmbeddingRequest(WireModel):
    model: StrictStr
    # A string, strings, token ids, or lists of token ids: exactly OpenAI's four forms.
    input: StrictStr | list[StrictStr] | list[NonNegativeTokenId] | list[list[NonNegativeTokenId]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None
    # Extension: the query instruction of Qwen3-Embedding ("Instruct: {instruction}\nQuery:{text}"). Send it
    # for queries, leave it out for documents. The openai SDK passes it with extra_body={"instruction": ...}.
    instruction: StrictStr | None = None
    # Extension: false refuses inputs longer than the model's max_length instead of cutting them.
    truncate: bool = True

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("input must not be an empty list")
        return value

    def inputs(self) -> list[str] | list[list[int]]:
        """The four input forms as a list of strings or a list of token-id lists."""
        if isinstance(self.input, str):
            return [self.input]
        if all(isinstance(item, int) for item in self.input):
            return [list(self.input)]
        return list(self.input)


class Embedding(WireModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(WireModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(WireModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


# ---- embeddings (Cohere v2: POST /v2/embed, as cohere.ClientV2.embed sends it) -----------------------------

CohereInputType = Literal["search_document", "search_query", "classification", "clustering", "image"]
CohereEmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]


class CohereTextContent(WireModel):
    type: Literal["text"]
    text: StrictStr | None = None  # optional in the SDK's type; the route refuses an item without it


class CohereImageContent(WireModel):
    type: Literal["image_url"]
    image_url: Any = None


class CohereEmbedInput(WireModel):
    content: list[Annotated[CohereTextContent | CohereImageContent, Field(discriminator="type")]] = Field(
        min_length=1)


class CohereEmbedRequest(WireModel):
    model: StrictStr
    input_type: CohereInputType  # required, as by Cohere's API: queries and documents embed differently
    texts: list[StrictStr] | None = Field(default=None, min_length=1)
    inputs: list[CohereEmbedInput] | None = Field(default=None, min_length=1)  # text content only
    images: list[StrictStr] | None = None  # refused: the model embeds text
    embedding_types: list[CohereEmbeddingType] = Field(default_factory=lambda: ["float"], min_length=1)
    output_dimension: StrictInt | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)  # per input, instruction and end token included
    truncate: Literal["NONE", "START", "END"] = "END"
    # Extension, as on /v1/embeddings: the query instruction, overriding what input_type implies.
    instruction: StrictStr | None = None


class CohereEmbedMeta(WireModel):
    api_version: dict[str, str]
    billed_units: dict[str, int]


class CohereEmbedResponse(WireModel):
    id: str
    response_type: Literal["embeddings_by_type"] = "embeddings_by_type"
    embeddings: dict[CohereEmbeddingType, list[list[float]] | list[list[int]] | list[str]]
    texts: list[str]
    meta: CohereEmbedMeta


# ---- rerank (Cohere v2 / Jina / vLLM / Voyage) ------------------------------------------------------------

class DocumentObject(WireModel):
    text: StrictStr


class RerankRequest(WireModel):
    model: StrictStr
    query: QueryText
    documents: list[StrictStr | DocumentObject] = Field(min_length=1)
    top_n: StrictInt | None = Field(default=None, ge=1)
    top_k: StrictInt | None = Field(default=None, ge=1)  # Voyage's name for top_n
    return_documents: bool = True
    instruction: StrictStr | None = None
    max_tokens_per_doc: StrictInt | None = Field(default=None, ge=1)
    # Cohere v1's: a document too long for the model is scored in up to this many token windows, its score the
    # best one's (None: the model's configured default, else cut to one window).
    max_chunks_per_doc: StrictInt | None = Field(default=None, ge=1)

    def document_texts(self) -> list[str]:
        return [doc if isinstance(doc, str) else doc.text for doc in self.documents]


class RerankDocument(WireModel):
    text: str


class RerankResult(WireModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class BilledUnits(WireModel):
    search_units: int


class RerankMeta(WireModel):
    billed_units: BilledUnits


class RerankResponse(WireModel):
    id: str
    model: str
    results: list[RerankResult]
    usage: Usage
    meta: RerankMeta


# ---- Text Embeddings Inference (serve_app/gateway/tei.py) ------------------------------------------------------
# TEI's request fields as its router reads them. TEI has no model field (a server hosts one model): `model` here is
# our extension for the bare paths (and batch lines); without it they serve the gateway's default model.

# TEI's TruncationDirection, in the case TEI's docs write it and in the case its enum is named.
TEITruncationDirection = Literal["right", "left", "Right", "Left"]
TEIInput = StrictStr | list[NonNegativeTokenId]


class TEIEmbedRequest(WireModel):
    model: StrictStr | None = None
    # A text, token ids, or a batch of texts or token-id lists (TEI's untagged `Input`).
    inputs: StrictStr | list[NonNegativeTokenId] | list[TEIInput]
    normalize: bool = True
    truncate: bool | None = None  # None: the gateway's tei.auto_truncate (TEI's --auto-truncate)
    truncation_direction: TEITruncationDirection = "right"
    # A prompt name (serve_app/replica/instructions.py PROMPT_NAME_INSTRUCTIONS): the query instruction it stands for.
    prompt_name: StrictStr | None = None
    dimensions: StrictInt | None = None
    # Extension, as on /v1/embeddings: the query instruction itself.
    instruction: StrictStr | None = None

    def input_list(self) -> list[str | list[int]]:
        """The inputs as a batch: a single text or a single token-id list is a batch of one."""
        if isinstance(self.inputs, str):
            return [self.inputs]
        if self.inputs and all(isinstance(item, int) for item in self.inputs):
            return [list(self.inputs)]
        return list(self.inputs)


class TEIRerankRequest(WireModel):
    """TEI's body on /rerank; told apart from the Cohere shape by `texts`."""

    model: StrictStr | None = None
    query: QueryText
    texts: list[StrictStr]
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool | None = None  # None: the gateway's tei.auto_truncate (TEI's default: false, refuse long texts)
    truncation_direction: TEITruncationDirection = "right"


class TEIRank(WireModel):
    index: int
    score: float
    text: str | None = None


class TEITokenizeRequest(WireModel):
    model: StrictStr | None = None
    inputs: StrictStr | list[StrictStr]
    add_special_tokens: bool = True
    prompt_name: StrictStr | None = None
    # Extensions: an embedder's query instruction; a reranker's instruction and the query its template holds.
    instruction: StrictStr | None = None
    query: StrictStr | None = None


class TEIToken(WireModel):
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class TEIDecodeRequest(WireModel):
    model: StrictStr | None = None
    ids: list[NonNegativeTokenId] | list[list[NonNegativeTokenId]]
    skip_special_tokens: bool = True


class TEIInfo(WireModel):
    """GET /info: TEI's fields, with the model's real limits."""

    model_id: str  # the weights' source (hub id or path)
    model_sha: str | None  # the configured revision
    model_dtype: str
    model_type: dict[str, Any]  # {"embedding": {"pooling": "last_token"}} or {"reranker": {"id2label", "label2id"}}
    max_concurrent_requests: int  # per model replica (its max_ongoing_requests)
    max_input_length: int  # the model's max_length, in tokens, template and instruction included
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int  # inputs (embed, tokenize, decode) or texts (rerank) per request
    auto_truncate: bool
    tokenization_workers: int
    version: str
    sha: str | None
    docker_label: str | None
    model_name: str  # extension: the served name


# ---- vLLM's helpers (serve_app/gateway/vllm.py) ----------------------------------------------------------------

class VLLMTokenizeRequest(WireModel):
    model: StrictStr | None = None  # None: the gateway's default model (embed, else rerank)
    prompt: StrictStr
    add_special_tokens: bool = True
    return_token_strs: bool | None = False
    # Extensions: an embedder's query instruction; a reranker's instruction and the query its template holds.
    instruction: StrictStr | None = None
    query: StrictStr | None = None


class VLLMTokenizeResponse(WireModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class VLLMDetokenizeRequest(WireModel):
    model: StrictStr | None = None
    tokens: list[NonNegativeTokenId]


class VLLMDetokenizeResponse(WireModel):
    prompt: str


ScoreInputs = StrictStr | list[StrictStr]


class ScoreRequest(WireModel):
    """vLLM's /score: one pair of fields, text_1/text_2 (its first names), queries/documents or data_1/data_2."""

    model: StrictStr | None = None  # None: the gateway's default rerank model
    text_1: ScoreInputs | None = None
    text_2: ScoreInputs | None = None
    queries: ScoreInputs | None = None
    documents: ScoreInputs | None = None
    data_1: ScoreInputs | None = None
    data_2: ScoreInputs | None = None
    # vLLM's: false returns the raw logit instead of the probability P(yes).
    use_activation: bool | None = None
    # Extensions, as on /v1/rerank.
    instruction: StrictStr | None = None
    max_tokens_per_doc: StrictInt | None = Field(default=None, ge=1)
    max_chunks_per_doc: StrictInt | None = Field(default=None, ge=1)


class ScoreData(WireModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreUsage(WireModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ScoreResponse(WireModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: ScoreUsage


# ---- models -----------------------------------------------------------------------------------------------

class ModelCard(WireModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "qwen3-serve"
    root: str
    task: Literal["rerank", "embed"]
    max_model_len: int
    dimensions: int | None = None
    aliases: list[str] = Field(default_factory=list)


class ReadyReport(WireModel):
    """GET /ready when every deployed model can be called (a 503 error names the ones still starting)."""

    status: Literal["ready"]
    models: list[str]  # the deployed models, by name


class ModelList(WireModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- usage (GET /v1/usage) --------------------------------------------------------------------------------------

class UsageTotals(WireModel):
    requests: int
    input_tokens: int
    documents: int  # rerank documents
    search_units: int  # Cohere's billing unit: one rerank query with up to 100 documents
    embeddings: int  # vectors returned


class UsageRow(UsageTotals):
    key_id: str | None  # None for requests served while auth was off
    model: str
    day: str  # UTC, YYYY-MM-DD
    batch: bool = False  # Batch API lines (their model's price may carry a batch factor)


class CreditSummary(WireModel):
    """A prepaid key's credit. Amounts are exact decimal text in the currency of the models' prices."""

    key_id: str
    balance: str  # now: the journal's sum minus the debits; at or below zero the key is refused
    credit_added: str  # journal entries in the period (initial credit, top-ups, adjustments)
    used: str  # debits of the requests served in the period


class UsageReport(WireModel):
    object: Literal["usage_report"] = "usage_report"
    data: list[UsageRow]
    totals: UsageTotals
    credit: list[CreditSummary] = Field(default_factory=list)  # the prepaid keys among those reported
