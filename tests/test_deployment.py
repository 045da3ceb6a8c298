"""The model deployment's own logic, on the plain class (no Ray): failure isolation, health, batch sizing."""

import asyncio

import pytest

from models.reranker import RerankJob
from serve_app.deployment import ModelServer, job_tokens
from serve_app.errors import InternalError


@pytest.fixture(scope="module")
def server(tiny_reranker_path):
    return ModelServer.func_or_class({"name": "r", "task": "rerank", "source": str(tiny_reranker_path),
                                      "device": "cpu"})


def test_one_bad_job_fails_only_itself(server):
    good = server.engine.tokenize("q", ["a document", "another"])
    bad = RerankJob(head_ids=[10**9], tail_ids=[[1, 2, 3]])  # a token id outside the vocabulary
    results = server._run_isolated([good, bad, good])
    assert isinstance(results[1], InternalError) and results[1].status == 500
    expected = server.engine.run([good])[0].scores
    assert results[0].scores == pytest.approx(expected, abs=1e-6)
    assert results[2].scores == pytest.approx(expected, abs=1e-6)


def test_health_check_passes_and_fails_with_the_engine(tiny_reranker_path):
    server = ModelServer.func_or_class({"name": "r", "task": "rerank", "source": str(tiny_reranker_path),
                                        "device": "cpu"})
    asyncio.run(server.check_health())
    server.engine.backbone = None  # what a lost device or corrupted state looks like from here
    with pytest.raises(Exception):
        asyncio.run(server.check_health())


class Unsized:
    @property
    def num_tokens(self):
        raise RuntimeError("broken job")


@pytest.mark.parametrize("jobs, expected", [
    ([RerankJob(head_ids=[1, 2], tail_ids=[[3], [4, 5]])], 7),
    ([Unsized(), object(), None], 3),  # anything odd counts as one token, never raises
    ([], 0),
])
def test_batch_size_fn_never_raises(jobs, expected):
    assert job_tokens(jobs) == expected
