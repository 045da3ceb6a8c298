"""Turn a ModelConfig into a loaded engine, with the start-up messages an operator needs.

- The weights come from weights.py (the hub, its cache, or a local checkpoint, built offline when asked for).
- A GPU fraction on a machine without CUDA (Ray hands out logical GPUs) falls back to CPU with a warning.
- One log line per model when ready: device, dtype, parameters, memory, token budget, load time.
- An embedder's `calibration` file (its fixed int8/uint8 ranges) is read and checked against the weights; with
  `build_offline` a missing one is made from the shipped corpus (serve_app/replica/quantization/calibration.py).

torch and the engines are imported where they are used, so importing this module loads neither.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from serve_app.config import ModelConfig
from serve_app.replica.quantization.calibration import Calibration, CalibrationError, calibrate
from serve_app.replica.weights import ModelLoadError, fetch_weights, resolve_local_path

logger = logging.getLogger("ray.serve")


def choose_device(config: ModelConfig) -> str:
    import torch

    if config.device == "cpu" or torch.cuda.is_available():
        return config.device
    if config.device == "cuda" or config.deployment.num_gpus > 0:
        logger.warning("%s: asked for a GPU (num_gpus=%g, device=%s) but CUDA is not available here; running "
                       "on CPU", config.name, config.deployment.num_gpus, config.device)
    return "cpu"


def cpu_threads(config: ModelConfig) -> int:
    return config.cpu_threads or max(1, math.floor(config.deployment.num_cpus))


def load_engine(config: ModelConfig) -> tuple[Any, dict[str, Any]]:
    import torch

    from models import Qwen3Embedder, Qwen3Reranker

    started = time.perf_counter()
    # Set explicitly: Ray's OMP_NUM_THREADS may come after torch has sized its pool (imported on unpickling).
    torch.set_num_threads(cpu_threads(config))
    path = fetch_weights(config)
    device = choose_device(config)
    if device != "cpu" and 0 < config.deployment.num_gpus < 1:
        # Fractional GPUs are a scheduling promise only; cap the caching allocator so the promise holds.
        torch.cuda.set_per_process_memory_fraction(config.deployment.num_gpus)
    logger.info("%s: loading %s weights from %s on %s", config.name, config.task, path, device)
    engine = {"rerank": Qwen3Reranker, "embed": Qwen3Embedder}[config.task].from_pretrained(
        str(path), device=device, dtype=config.dtype, max_length=config.max_length,
        token_budget=config.batching.token_budget, max_batch_items=config.batching.max_items)
    weights_bytes = sum(p.numel() * p.element_size() for p in engine.backbone.parameters())
    facts = {**engine.describe(), "source": config.source, "revision": config.revision,
             "weights_bytes": weights_bytes, "cpu_threads": torch.get_num_threads(), "load_seconds": round(time.perf_counter() - started, 2)}
    if config.task == "embed":
        facts["dimensions"] = engine.native_dimensions
    if engine.runtime.device.type == "cuda":
        facts["cuda_memory_bytes"] = torch.cuda.memory_allocated(engine.runtime.device)
    logger.info("%s ready: task=%s device=%s dtype=%s attention=%s parameters=%.1fM memory=%.1f MiB "
                "token_budget=%d max_length=%d threads=%d load=%.1fs", config.name, config.task, facts["device"],
                facts["dtype"], facts["attention"], facts["parameters"] / 1e6,
                facts.get("cuda_memory_bytes", weights_bytes) / 2**20, engine.token_budget, engine.max_length,
                facts["cpu_threads"], facts["load_seconds"])
    return engine, facts


def load_calibration(config: ModelConfig, engine) -> Calibration | None:
    """The embedder's calibration (None when its config names none), checked against the loaded weights."""
    if config.calibration is None:
        return None
    path = resolve_local_path(config.calibration)
    if not path.exists():
        if not config.build_offline:
            raise ModelLoadError(f"{config.name}: no calibration file at {path}. Make it once with `python -m "
                                 "serve_app.replica.quantization.calibration --config <this config> --model "
                                 f"{config.name}`, or remove `calibration` (int8 and uint8 are then refused)")
        logger.info("%s: making the offline calibration file %s from the shipped corpus", config.name, path)
        calibrate(engine, source=config.source, revision=config.revision).save(path)
    try:
        calibration = Calibration.load(path)
        cosine = calibration.check_matches(lambda texts: engine.embed(texts).embeddings)
    except CalibrationError as exc:
        raise ModelLoadError(f"{config.name}: calibration {path}: {exc}") from None
    logger.info("%s: int8/uint8 ranges from %s (corpus %s, made on %s; check cosine %.4f)", config.name, path,
                calibration.corpus_sha256[:12], calibration.made_with, cosine)
    return calibration
