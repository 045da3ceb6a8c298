"""Qwen3 reranker and embedding engines: torch + transformers, no Ray.

    from models import Qwen3Reranker, Qwen3Embedder
    reranker = Qwen3Reranker.from_pretrained("Qwen/Qwen3-Reranker-0.6B")
    reranker.rerank("what is a panda?", ["The giant panda is a bear.", "Paris is in France."]).scores
"""

from models.embedder import EmbedJob, EmbedResult, Qwen3Embedder
from models.errors import EngineInputError
from models.reranker import RerankJob, RerankResult, Qwen3Reranker

__all__ = ["EmbedJob", "EmbedResult", "EngineInputError", "Qwen3Embedder", "Qwen3Reranker", "RerankJob",
           "RerankResult"]
