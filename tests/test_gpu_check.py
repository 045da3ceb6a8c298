"""bench/gpu_check.py on the tiny shape on CPU: every section of the summary is written, with finite numbers."""

import json
import math

from bench.gpu_check import main

TINY_CPU = ["--device", "cpu", "--shapes", "tiny", "--documents", "3", "--requests", "2",
            "--request-documents", "2", "--texts", "3", "--repeats", "1",
            # A measured bf16 peak would take minutes on this CPU: give one.
            "--peak-tflops", "0.1"]
SECTIONS = ["# GPU check", "## bf16 timings", "## bf16 vs fp32 on the same weights", "## Steps", "## JSON"]


def summary_blob(text: str) -> dict:
    return json.loads(text.split("```json\n", 1)[1].split("\n```", 1)[0])


def numbers(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from numbers(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_tiny_check_on_cpu_writes_every_section(tmp_path):
    out = tmp_path / "gpu_check.md"
    main(TINY_CPU + ["--deadline", "120", "--min-step-seconds", "0", "--out", str(out)])
    text = out.read_text()
    assert all(section in text for section in SECTIONS)
    blob = summary_blob(text)
    assert [step["status"] for step in blob["steps"]] == ["done", "done"]
    assert [row["workload"] for row in blob["timings"]] == ["rerank 1x3", "rerank 2x2", "embed 3", "rerank 1x1",
                                                            "embed 1"]
    for row in blob["timings"]:
        assert row["items_per_s"] > 0 and row["mfu"] > 0 and row["forward_passes"] >= 1
        assert row["computed_slots"] >= row["real_tokens"] > 0
    assert [row["workload"] for row in blob["precision"]] == ["rerank 1x3", "embed 3"]
    assert all(row["same_weights"] for row in blob["precision"])
    rerank, embed = blob["precision"]
    # bf16 differs from fp32, but by rounding only.
    assert 0 < rerank["max_abs_score_diff"] < 0.05 and 0 < embed["max_abs_embedding_diff"] < 0.05
    assert 0.99 < embed["min_cosine"] <= 1 + 1e-9
    assert all(math.isfinite(number) for number in numbers(blob))


def test_past_the_deadline_every_step_is_skipped_and_named(tmp_path):
    out = tmp_path / "gpu_check.md"
    main(TINY_CPU + ["--deadline", "0", "--out", str(out)])
    blob = summary_blob(out.read_text())
    assert [(step["step"], step["status"]) for step in blob["steps"]] == [
        ("tiny bf16 sdpa timings", "skipped"), ("tiny fp32 comparison", "skipped")]
    assert all(step["note"].startswith("deadline") for step in blob["steps"])
    assert blob["timings"] == [] and blob["precision"] == []
