"""Compressed embeddings: the definitions, and the calibration file that fixes a model's int8/uint8 ranges."""

import numpy as np
import pytest

from models import Qwen3Embedder
from models.checkpoints import random_model
from serve_app.config import ModelConfig
from serve_app.replica import quantization
from serve_app.replica.loading import load_calibration
from serve_app.replica.quantization.calibration import (CHECK_TEXTS, Calibration, CalibrationError, calibrate,
                                                        corpus_sha256, corpus_texts)
from serve_app.replica.weights import ModelLoadError


@pytest.fixture(scope="module")
def engine(tiny_embedder_path):
    return Qwen3Embedder.from_pretrained(str(tiny_embedder_path), device="cpu")


@pytest.fixture(scope="module")
def calibration(tiny_calibration_path):
    return Calibration.load(tiny_calibration_path)


# ---- the definitions ----------------------------------------------------------------------------------------

def test_ubinary_packs_the_sign_bits_high_bit_first_and_binary_is_minus_128():
    x = np.array([[0.5, -0.1, 0.0, 2.0, -3.0, 1e-9, -1e-9, 0.3, 0.7, -0.2]], dtype=np.float32)
    # bits 1 0 0 1 0 1 0 1 | 1 0 (padded with zeros) -> 0b10010101 = 149, 0b10000000 = 128
    assert quantization.ubinary(x).tolist() == [[149, 128]]
    assert quantization.binary(x).tolist() == [[21, 0]] and quantization.binary(x).dtype == np.int8
    vectors = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    assert np.array_equal(quantization.ubinary(vectors), np.packbits(vectors > 0, axis=1))
    assert np.array_equal(quantization.binary(vectors).astype(np.int16),
                          np.packbits(vectors > 0, axis=1).astype(np.int16) - 128)


def test_uint8_buckets_over_the_ranges_and_int8_is_the_same_buckets_minus_128():
    lo, hi = np.array([-1.0, 0.0], dtype=np.float32), np.array([1.0, 1.0], dtype=np.float32)
    x = np.array([[-1.0, 0.0], [1.0, 1.0], [0.0, 0.5], [-2.0, 2.0], [0.999, 0.001]], dtype=np.float32)
    # floor((x - lo) / ((hi - lo) / 255)), clipped: 0 at lo, 255 at hi, 127 at the middle, outside values clip.
    assert quantization.uint8(x, lo, hi).tolist() == [[0, 0], [255, 255], [127, 127], [0, 255], [254, 0]]
    assert quantization.int8(x, lo, hi).tolist() == [[-128, -128], [127, 127], [-1, -1], [-128, 127], [126, -128]]
    assert quantization.int8(x, lo, hi).dtype == np.int8 and quantization.uint8(x, lo, hi).dtype == np.uint8


def test_uint8_equals_sentence_transformers_inside_the_ranges_but_at_bucket_edges():
    rng = np.random.default_rng(1)
    calibration = rng.standard_normal((1000, 64))
    vectors = calibration[:300]  # inside the ranges by construction; their maxima included
    lo, hi = calibration.min(axis=0), calibration.max(axis=0)
    steps = (hi - lo) / 255  # sentence_transformers.quantization.quantize_embeddings, "uint8"
    theirs = (vectors - lo) / steps
    ours = quantization.uint8(vectors, lo, hi).astype(int)
    at_edge = np.abs(theirs - np.round(theirs)) < 1e-9
    assert np.array_equal(ours[~at_edge], theirs.astype(np.uint8)[~at_edge].astype(int))
    assert np.abs(ours - np.floor(theirs + 1e-9)).max() == 0  # at an edge: the bucket that starts there
    assert (quantization.uint8(hi[None], lo, hi) == 255).all()  # theirs sends some maxima to 254


def test_a_range_without_spread_never_divides_by_zero():
    lo = hi = np.zeros(2, dtype=np.float32)
    assert quantization.uint8(np.array([[-1.0, 1.0]]), lo, hi).tolist() == [[0, 255]]


def test_encode_gives_every_type_at_once(calibration):
    vectors = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    ranges = calibration.ranges(64)
    encoded = quantization.encode(vectors, list(quantization.EMBEDDING_TYPES), ranges)
    assert list(encoded) == list(quantization.EMBEDDING_TYPES)
    assert encoded["float"] == vectors.tolist() and len(encoded["ubinary"][0]) == len(encoded["binary"][0]) == 8
    assert encoded["int8"] == quantization.int8(vectors, *ranges).tolist()
    with pytest.raises(ValueError):
        quantization.encode(vectors, ["int8"], None)


# ---- the calibration file -------------------------------------------------------------------------------------

def test_ranges_are_the_calibration_vectors_cut_and_normalised_again(calibration):
    assert calibration.embeddings.shape == (2 * len(corpus_texts()), 64)
    assert calibration.corpus_sha256 == corpus_sha256() and len(corpus_texts()) == 512
    for dimensions in (32, 48, 64):
        cut = calibration.embeddings[:, :dimensions].astype(np.float64)
        cut /= np.linalg.norm(cut, axis=1, keepdims=True)
        lo, hi = calibration.ranges(dimensions)
        assert lo.shape == hi.shape == (dimensions,) and lo.dtype == np.float32
        np.testing.assert_allclose(lo, cut.min(axis=0), rtol=0, atol=1e-7)
        np.testing.assert_allclose(hi, cut.max(axis=0), rtol=0, atol=1e-7)
    assert not np.array_equal(calibration.ranges(32)[1], calibration.ranges(64)[1][:32])  # each setting its own


def test_the_file_fixes_the_ranges_bit_for_bit(tiny_calibration_path, tmp_path, calibration):
    again = Calibration.load(calibration.save(tmp_path / "copy.npz"))
    for dimensions in (32, 64):
        assert all(np.array_equal(a, b) for a, b in zip(again.ranges(dimensions), calibration.ranges(dimensions)))
    assert again.check_texts == corpus_texts()[:CHECK_TEXTS]


def test_calibration_embeds_the_corpus_as_documents_and_as_queries(engine, calibration):
    texts = corpus_texts()
    assert np.abs(calibration.embeddings[:3] - engine.embed(texts[:3]).embeddings).max() <= 1e-6
    from serve_app.replica.instructions import WEB_SEARCH_QUERY

    queries = engine.embed(texts[:3], instruction=WEB_SEARCH_QUERY).embeddings
    assert np.abs(calibration.embeddings[len(texts):len(texts) + 3] - queries).max() <= 1e-6


def test_a_file_made_from_other_weights_is_refused(engine, calibration):
    assert calibration.check_matches(lambda texts: engine.embed(texts).embeddings) > 0.9999
    other = Qwen3Embedder(random_model("embed", "tiny", seed=1).float(), engine.tokenizer, engine.runtime,
                          source="other")
    foreign = calibrate(other, source="other", texts=corpus_texts()[:16])
    with pytest.raises(CalibrationError, match="other weights"):
        foreign.check_matches(lambda texts: engine.embed(texts).embeddings)


def test_load_refuses_what_is_not_a_calibration_file(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a numpy file")
    with pytest.raises(CalibrationError, match="not a calibration file"):
        Calibration.load(path)


def test_a_missing_file_fails_the_start_up_with_the_command_to_make_it(engine, tmp_path, tiny_embedder_path):
    config = ModelConfig(name="e", task="embed", source=str(tiny_embedder_path),
                         calibration=str(tmp_path / "none.npz"))
    with pytest.raises(ModelLoadError, match="python -m serve_app.replica.quantization.calibration"):
        load_calibration(config, engine)
    assert load_calibration(config.model_copy(update={"calibration": None}), engine) is None


@pytest.mark.parametrize("args, message", [
    ({"task": "rerank", "calibration": "./c.npz"}, "embed models only"),
    ({"task": "embed", "calibration": "c.npz"}, "local path"),
    ({"task": "embed", "max_chunks_per_doc": 2}, "rerank models only"),
])
def test_config_keeps_each_option_to_its_task(args, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(name="m", source="./x", **args)


def test_an_uncalibrated_model_refuses_int8_and_uint8_before_any_work(tiny_embedder_path):
    import asyncio

    from serve_app.errors import InvalidRequest
    from serve_app.replica.deployment import ModelServer

    server = ModelServer.func_or_class({"name": "e", "task": "embed", "source": str(tiny_embedder_path),
                                        "device": "cpu"})
    assert server.calibration is None
    with pytest.raises(InvalidRequest) as error:
        asyncio.run(server.embed(["x"], with_ranges=True))
    assert error.value.code == "not_calibrated" and error.value.param == "embedding_types"


def test_the_command_makes_a_file_the_replica_accepts(tiny_embedder_path, tmp_path, engine, calibration):
    from serve_app.replica.quantization.calibration import main

    out = tmp_path / "made.npz"
    assert main(["--source", str(tiny_embedder_path), "--out", str(out), "--device", "cpu"]) == 0
    made = Calibration.load(out)
    assert (made.source, made.made_with, made.corpus_sha256) == (str(tiny_embedder_path), "cpu float32",
                                                                 corpus_sha256())
    assert made.check_matches(lambda texts: engine.embed(texts).embeddings) > 0.9999
    np.testing.assert_allclose(made.ranges(64)[0], calibration.ranges(64)[0], rtol=0, atol=1e-6)
