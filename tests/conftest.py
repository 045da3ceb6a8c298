"""Shared fixtures: tiny random-weight Qwen3 checkpoints with the real Qwen3 tokenizer, built offline once.

They live in `checkpoints/` (git-ignored; override with QWEN3_CHECKPOINTS) so repeated runs reuse them.
"""

import os
from pathlib import Path

import pytest

from models.checkpoints import build_checkpoint, checkpoint_name

REPO = Path(__file__).resolve().parent.parent
CHECKPOINTS = Path(os.environ.get("QWEN3_CHECKPOINTS", REPO / "checkpoints"))


@pytest.fixture(scope="session")
def tiny_reranker_path() -> Path:
    return build_checkpoint(CHECKPOINTS / checkpoint_name("rerank", "tiny"), "rerank", "tiny")


@pytest.fixture(scope="session")
def tiny_embedder_path() -> Path:
    return build_checkpoint(CHECKPOINTS / checkpoint_name("embed", "tiny"), "embed", "tiny")
