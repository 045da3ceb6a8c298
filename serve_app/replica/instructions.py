"""Qwen3-Embedding's query instructions by use: what Cohere's `input_type` and TEI's `prompt_name` mean for this model.

Qwen3-Embedding puts an instruction in front of queries (`Instruct: {instruction}\\nQuery:{text}`) and none in
front of documents. The retrieval one is the model card's; classification and clustering use generic forms of
the instructions Qwen3-Embedding was evaluated with on MTEB (e.g. "Identify the topic or theme of the given news
articles" for TwentyNewsgroupsClustering, "Classify the given Amazon review into its appropriate rating category").
"""

WEB_SEARCH_QUERY = "Given a web search query, retrieve relevant passages that answer the query"

# Cohere input_type -> instruction (None: embedded as a document, without one). "image" is not here: the model
# embeds text only.
INPUT_TYPE_INSTRUCTIONS: dict[str, str | None] = {
    "search_query": WEB_SEARCH_QUERY,
    "search_document": None,
    "classification": "Classify the given text into its appropriate category",
    "clustering": "Identify the topic or theme of the given text",
}

# TEI's `prompt_name` -> instruction. TEI looks prompt names up in a model's sentence-transformers `prompts`; for
# Qwen3-Embedding the model card's sentence-transformers example embeds queries with prompt_name="query" (its web
# search instruction) and documents with no prompt, so "query" and "document" mean that here, and Cohere's input
# types are accepted as prompt names too. Any other name is refused (TEI's 413 Validation), never ignored.
PROMPT_NAME_INSTRUCTIONS: dict[str, str | None] = {
    "query": WEB_SEARCH_QUERY,
    "document": None,
    **INPUT_TYPE_INSTRUCTIONS,
}
