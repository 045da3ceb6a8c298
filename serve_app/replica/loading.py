"""Turn a ModelConfig into a loaded engine, with the start-up messages an operator needs.

- Hub ids are downloaded first with huggingface_hub (progress bars in the replica's log), so a slow download
  shows progress instead of a silent replica. The hub is asked about the repository with a short timeout first: an
  unreachable hub (offline, firewalled, HF_HUB_OFFLINE=1) falls back to the local cache at once instead of waiting
  on TCP retries, and weights that are neither reachable nor cached fail with one short message naming the
  offline config.
- `prefetch_weights` does the same for every model of a config file, several at once, before anything is started:
  `python -m serve_app.config --fetch FILE` (what `make serve` runs first) fills the cache the replicas read.
- Local paths resolve against the working directory, then the project root. `build_offline: tiny` builds the
  random-weight test checkpoint there when it is missing (configs/tiny.yaml).
- A GPU fraction on a machine without CUDA (Ray hands out logical GPUs) falls back to CPU with a warning.
- One log line per model when ready: device, dtype, parameters, memory, token budget, load time.
- An embedder's `calibration` file (its fixed int8/uint8 ranges) is read and checked against the weights; with
  `build_offline` a missing one is made from the shipped corpus (serve_app/replica/quantization/calibration.py).

torch and the engines are imported where they are used, so fetching weights (the config CLI) never loads them.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from serve_app.config import ModelConfig, is_local_path
from serve_app.replica.quantization.calibration import Calibration, CalibrationError, calibrate

logger = logging.getLogger("ray.serve")

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
OFFLINE_HINT = "configs/tiny.yaml runs offline (make serve CONFIG=configs/tiny.yaml)"
# The repository lookup that tells a reachable hub from an unreachable one. huggingface_hub itself sets no timeout
# on it, so a network that drops packets held each replica (and each retry) for minutes of TCP retries.
HUB_LOOKUP_TIMEOUT_S = 10
HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]
PREFETCH_PARALLEL = 4  # models downloaded at once


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


def fetch_weights(config: ModelConfig, progress: type | None = None) -> Path:
    """A local directory holding the checkpoint named by the config. `progress`: the tqdm class for the download's
    progress bars (huggingface_hub's own when None)."""
    if is_local_path(config.source):
        path = resolve_local_path(config.source)
        if not (path / "config.json").exists() and config.build_offline:
            from models.checkpoints import build_checkpoint

            logger.info("%s: building the offline %s checkpoint in %s", config.name, config.build_offline, path)
            build_checkpoint(path, config.task, config.build_offline)
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{config.name}: no checkpoint at {path} (config.json missing). Build the "
                                 "offline ones with `python -m models.checkpoints --out checkpoints`, or point "
                                 f"source at a model directory or hub id; {OFFLINE_HINT}")
        return path
    return _fetch_from_hub(config, progress)


def _fetch_from_hub(config: ModelConfig, progress: type | None) -> Path:
    import httpx2  # huggingface_hub's HTTP client: its transport errors mean "the hub cannot be reached"
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    what = f"{config.source}{f'@{config.revision}' if config.revision else ''}"
    unreachable = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    if unreachable is None:
        try:
            HfApi().repo_info(config.source, revision=config.revision, timeout=HUB_LOOKUP_TIMEOUT_S)
        except GatedRepoError:
            raise ModelLoadError(f"{config.name}: {what} is gated on the Hugging Face Hub: accept its terms and set "
                                 f"HF_TOKEN; {OFFLINE_HINT}") from None
        except RepositoryNotFoundError:
            raise ModelLoadError(f"{config.name}: {config.source} does not exist on the Hugging Face Hub (or is "
                                 f"private: set HF_TOKEN); check source; {OFFLINE_HINT}") from None
        except RevisionNotFoundError:
            raise ModelLoadError(f"{config.name}: {config.source} has no revision {config.revision!r} on the "
                                 f"Hugging Face Hub; {OFFLINE_HINT}") from None
        except (httpx2.TransportError, OfflineModeIsEnabled, HfHubHTTPError) as exc:
            unreachable = f"{type(exc).__name__}"  # the hub is down or cannot be reached: the cache may do
    logger.info("%s: fetching %s from the Hugging Face Hub%s", config.name, what,
                f" (unreachable: {unreachable}; trying the local cache)" if unreachable else
                " (cached after the first download)")
    try:
        return Path(snapshot_download(config.source, revision=config.revision, allow_patterns=HUB_FILE_PATTERNS,
                                      local_files_only=unreachable is not None, tqdm_class=progress))
    except LocalEntryNotFoundError:
        reason = f"the Hugging Face Hub is unreachable ({unreachable})" if unreachable else "the download failed"
        raise ModelLoadError(f"{config.name}: cannot download {what}: {reason} and the weights are not in the local "
                             f"cache ({constants.HF_HUB_CACHE}); {OFFLINE_HINT}") from None
    except (OSError, httpx2.HTTPError) as exc:
        raise ModelLoadError(f"{config.name}: cannot download {what}: {type(exc).__name__}: {exc}; "
                             f"{OFFLINE_HINT}") from None


def labelled_progress(label: str) -> type:
    """huggingface_hub's tqdm with every bar's description prefixed by `label`: several models download at once,
    and each bar says which one it counts."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    def labelled(desc: str | None) -> str:
        return f"{label}: {desc}" if desc else label

    class LabelledProgress(hub_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["desc"] = labelled(kwargs.get("desc"))
            super().__init__(*args, **kwargs)

        def set_description(self, desc=None, refresh=True):
            super().set_description(labelled(desc), refresh)

        def set_description_str(self, desc=None, refresh=True):
            super().set_description_str(labelled(desc), refresh)

    return LabelledProgress


def prefetch_weights(configs: list[ModelConfig], parallel: int = PREFETCH_PARALLEL) -> dict[str, str | None]:
    """Fetch (or build) every model's weights, `parallel` at once, with labelled progress bars: {model name: None
    when its weights are ready, else one line saying what failed}. Models with the same source and revision share
    one download."""
    def fetch(config: ModelConfig) -> str | None:
        try:
            fetch_weights(config, labelled_progress(config.name))
        except ModelLoadError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - one line per model, whatever went wrong
            return f"{config.name}: cannot fetch {config.source}: {type(exc).__name__}: {exc}; {OFFLINE_HINT}"
        return None

    firsts: dict[tuple[str, str | None], ModelConfig] = {}
    for config in configs:
        firsts.setdefault((config.source, config.revision), config)
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(firsts)))) as pool:
        outcomes = dict(zip(firsts, pool.map(fetch, firsts.values())))
    results = {}
    for config in configs:
        outcome = outcomes[(config.source, config.revision)]
        first = firsts[(config.source, config.revision)]
        if outcome is not None and first is not config:
            outcome = f"{config.name}: same weights as {first.name}, which could not be fetched; {OFFLINE_HINT}"
        results[config.name] = outcome
    return results


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
