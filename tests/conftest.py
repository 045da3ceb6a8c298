"""Shared fixtures: tiny random-weight Qwen3 checkpoints with the real Qwen3 tokenizer, built offline once.

They live in `checkpoints/` (git-ignored; override with QWEN3_CHECKPOINTS) so repeated runs reuse them.
"""

import os
from pathlib import Path

import pytest

from models.checkpoints import build_checkpoint, checkpoint_name

REPO = Path(__file__).resolve().parent.parent
CHECKPOINTS = Path(os.environ.get("QWEN3_CHECKPOINTS", REPO / "checkpoints"))

# The S3 storage test talks to a moto server on 127.0.0.1, which takes any credentials, but botocore must find some.
# Set here, before any test starts Ray, so the gateway and runner processes inherit them; test values only, so no
# real credentials a developer has in the environment are ever sent anywhere by the tests.
os.environ.update(AWS_ACCESS_KEY_ID="qwen3-serve-tests", AWS_SECRET_ACCESS_KEY="qwen3-serve-tests")


def pytest_collection_modifyitems(items):
    """Multi-node tests start their own Ray cluster and Ray allows one per process: they run first, before anything
    starts the session's single-node instance (`served`), and shut their cluster down when done."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("multinode") else 1)


@pytest.fixture(scope="session")
def tiny_reranker_path() -> Path:
    return build_checkpoint(CHECKPOINTS / checkpoint_name("rerank", "tiny"), "rerank", "tiny")


@pytest.fixture(scope="session")
def tiny_embedder_path() -> Path:
    return build_checkpoint(CHECKPOINTS / checkpoint_name("embed", "tiny"), "embed", "tiny")


@pytest.fixture(scope="session")
def tiny_calibration_path(tiny_embedder_path) -> Path:
    """The tiny embedder's calibration file (its fixed int8/uint8 ranges), made once from the shipped corpus before
    any served replica needs it, so tests and replicas read the same file."""
    from serve_app.replica.quantization.calibration import Calibration, calibrate, corpus_sha256
    from tests.serving import calibration_path

    path = calibration_path(tiny_embedder_path)
    if not path.exists() or Calibration.load(path).corpus_sha256 != corpus_sha256():  # left by an older corpus
        from models import Qwen3Embedder

        engine = Qwen3Embedder.from_pretrained(str(tiny_embedder_path), device="cpu")
        calibrate(engine, source=str(tiny_embedder_path)).save(path)
    return path


@pytest.fixture(scope="session")
def key_database(tmp_path_factory) -> str:
    """The SQLite database of the served app's API keys."""
    return f"sqlite:///{tmp_path_factory.mktemp('db') / 'serve.db'}"


@pytest.fixture(scope="session")
def key_store(key_database):
    from serve_app.accounts.keys import KeyStore
    from serve_app.accounts.store import connect

    return KeyStore(connect(key_database))


@pytest.fixture(scope="session")
def api_key(key_store) -> str:
    """A valid key of the served app."""
    return key_store.create("tests")[1]


@pytest.fixture(scope="session")
def admin_headers(key_store) -> dict[str, str]:
    """Authorization for an admin key of the served app (key management, every key's usage)."""
    return {"Authorization": f"Bearer {key_store.create('tests-admin', admin=True)[1]}"}


@pytest.fixture(scope="session")
def serve_config(tiny_reranker_path, tiny_embedder_path, tiny_calibration_path, key_database, tmp_path_factory):
    """configs/tiny.yaml as the HTTP tests deploy it (tests.serving.tiny_test_config)."""
    from tests.serving import free_port, tiny_test_config

    return tiny_test_config(free_port(), tiny_reranker_path, tiny_embedder_path, key_database,
                            tmp_path_factory.mktemp("batch-files"))


@pytest.fixture(scope="session")
def served(serve_config, api_key):
    """A real Ray Serve instance on 127.0.0.1 with the test config deployed; shut down after the session."""
    from tests.serving import ServeInstance

    instance = ServeInstance.start_on(serve_config["http_options"]["port"])
    instance.headers = {"Authorization": f"Bearer {api_key}"}
    try:
        instance.deploy(serve_config)
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def http(served):
    """An HTTP client of the served app, with a valid key."""
    import httpx

    with httpx.Client(base_url=served.url, headers=served.headers, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server (tests/postgres.py), stopped after the session."""
    from tests.postgres import PostgresServer, available

    if not available():
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) are required for the ledger and key tests")
    server = PostgresServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """Each store test runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_url")
