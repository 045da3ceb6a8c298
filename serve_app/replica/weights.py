"""Model weights, fetched before a replica needs them, and the command that fetches them for a whole config.

- Hub ids are downloaded with huggingface_hub (progress bars in the replica's log), so a slow download shows
  progress instead of a silent replica. The hub is asked about the repository with a short timeout first: an
  unreachable hub (offline, firewalled, HF_HUB_OFFLINE=1) falls back to the local cache at once instead of waiting
  on TCP retries, and weights that are neither reachable nor cached fail with one short message naming the
  offline config.
- `prefetch_weights` does the same for every model of a config file, several at once, before anything is started:
  `python -m serve_app.replica.weights --fetch FILE` (what `make serve` runs first) fills the cache the replicas read.
- Local paths resolve against the working directory, then the project root. `build_offline: tiny` builds the
  random-weight test checkpoint there when it is missing (configs/tiny.yaml).

torch is imported only to build an offline checkpoint, and huggingface_hub only to download: checking a config
(`python -m serve_app.replica.weights FILE`) loads neither.
"""

from __future__ import annotations

import argparse
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from serve_app import PROJECT_ROOT
from serve_app.config import ModelConfig, ServeConfigFile, is_local_path, load_config_file

logger = logging.getLogger("ray.serve")

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
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

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


def main(argv: list[str] | None = None) -> int:
    """`python -m serve_app.replica.weights [--fetch] FILE...`: check config files before deploying them."""
    parser = argparse.ArgumentParser(prog="python -m serve_app.replica.weights",
                                     description="Check Serve config files against the schema (exit 1 if any fails).")
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("--fetch", action="store_true",
                        help="also fetch every model's weights (hub ids into the Hugging Face cache the replicas "
                             "read, offline checkpoints built), several at once; exit 1, one line per model, if any "
                             "cannot be had. `make serve` runs this before Serve starts.")
    args = parser.parse_args(argv)
    status = 0
    for path in args.files:
        try:
            config = load_config_file(path)
        except (ValueError, OSError) as exc:
            print(exc, file=sys.stderr)
            status = 1
            continue
        print(f"{path}: ok ({', '.join(m.name for m in config.model_configs())})", flush=True)
        if args.fetch and not fetch_all_weights(path, config):
            status = 1
    return status


def fetch_all_weights(path: str | Path, config: ServeConfigFile) -> bool:
    models = config.model_configs()
    print(f"{path}: fetching the weights of {len(models)} models", flush=True)
    failures = [message for message in prefetch_weights(models).values() if message is not None]
    for message in failures:
        print(message, file=sys.stderr)
    if failures:
        print(f"{path}: {len(failures)} of {len(models)} models have no weights; not ready to serve", file=sys.stderr)
        return False
    print(f"{path}: weights ready for {', '.join(m.name for m in models)}")
    return True


if __name__ == "__main__":
    sys.exit(main())
