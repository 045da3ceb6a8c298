"""Turn a ModelConfig into a loaded engine, with the start-up messages an operator needs.

- Hub ids are downloaded first with huggingface_hub (progress bars in the replica's log), so a slow download
  shows progress instead of a silent replica; an unreachable hub without cached weights fails with a message
  that says so and names the offline config.
- Local paths resolve against the working directory, then the project root. `build_offline: tiny` builds the
  random-weight test checkpoint there when it is missing (configs/tiny.yaml).
- A GPU fraction on a machine without CUDA (Ray hands out logical GPUs) falls back to CPU with a warning.
- One log line per model when ready: device, dtype, parameters, memory, token budget, load time.
- An embedder's `calibration` file (its fixed int8/uint8 ranges) is read and checked against the weights; with
  `build_offline` a missing one is made from the shipped corpus (serve_app/quantization/calibration.py).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from models import Qwen3Embedder, Qwen3Reranker
from serve_app.config import ModelConfig, is_local_path
from serve_app.quantization.calibration import Calibration, CalibrationError, calibrate

logger = logging.getLogger("ray.serve")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENGINES = {"rerank": Qwen3Reranker, "embed": Qwen3Embedder}


class ModelLoadError(RuntimeError):
    """The weights could not be found or fetched; the message says what to do."""


def resolve_local_path(source: str) -> Path:
    path = Path(source).expanduser()
    if path.is_absolute():
        return path
    for base in (Path.cwd(), PROJECT_ROOT):
        if (base / path).exists():
            return (base / path).resolve()
    return (PROJECT_ROOT / path).resolve()


def fetch_weights(config: ModelConfig) -> Path:
    """A local directory holding the checkpoint named by the config."""
    if is_local_path(config.source):
        path = resolve_local_path(config.source)
        if not (path / "config.json").exists() and config.build_offline:
            from models.checkpoints import build_checkpoint

            logger.info("%s: building the offline %s checkpoint in %s", config.name, config.build_offline, path)
            build_checkpoint(path, config.task, config.build_offline)
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{config.name}: no checkpoint at {path} (config.json missing). Build the "
                                 "offline ones with `python -m models.checkpoints --out checkpoints`, or point "
                                 "source at a model directory or hub id")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    logger.info("%s: fetching %s%s from the Hugging Face Hub (cached after the first download)", config.name,
                config.source, f"@{config.revision}" if config.revision else "")
    try:
        return Path(snapshot_download(config.source, revision=config.revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(
            f"{config.name}: cannot download {config.source} - the Hugging Face Hub is unreachable from this "
            "machine and the weights are not in the local cache. Run the offline config instead: "
            "`serve run configs/tiny.yaml` (tiny random-weight models, no download), or put the weights in a "
            f"local directory and set source to it. ({type(exc).__name__})") from None
    except OSError as exc:
        raise ModelLoadError(f"{config.name}: cannot download {config.source}: {exc}. Offline? Use "
                             "`serve run configs/tiny.yaml`.") from None


def choose_device(config: ModelConfig) -> str:
    if config.device == "cpu" or torch.cuda.is_available():
        return config.device
    if config.device == "cuda" or config.deployment.num_gpus > 0:
        logger.warning("%s: asked for a GPU (num_gpus=%g, device=%s) but CUDA is not available here; running "
                       "on CPU", config.name, config.deployment.num_gpus, config.device)
    return "cpu"


def cpu_threads(config: ModelConfig) -> int:
    return config.cpu_threads or max(1, math.floor(config.deployment.num_cpus))


def load_engine(config: ModelConfig) -> tuple[Any, dict[str, Any]]:
    started = time.perf_counter()
    # Set explicitly: Ray's OMP_NUM_THREADS may come after torch has sized its pool (imported on unpickling).
    torch.set_num_threads(cpu_threads(config))
    path = fetch_weights(config)
    device = choose_device(config)
    if device != "cpu" and 0 < config.deployment.num_gpus < 1:
        # Fractional GPUs are a scheduling promise only; cap the caching allocator so the promise holds.
        torch.cuda.set_per_process_memory_fraction(config.deployment.num_gpus)
    logger.info("%s: loading %s weights from %s on %s", config.name, config.task, path, device)
    engine = ENGINES[config.task].from_pretrained(
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
                                 "serve_app.quantization.calibration --config <this config> --model "
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
