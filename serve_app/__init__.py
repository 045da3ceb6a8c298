"""The Ray Serve application: one deployment per model behind one HTTP gateway (the package map is in README.md,
"Development")."""

from importlib import metadata
from pathlib import Path

# The repository root: relative paths in configs (checkpoints, the SQLite file, calibration files, the KubeRay CRD)
# resolve against it when they do not exist under the working directory.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

# What the API reports as its version (OpenAPI, TEI's /info): pyproject.toml's, as installed.
try:
    SERVICE_VERSION = metadata.version("qwen3-serve")
except metadata.PackageNotFoundError:  # run from a checkout that was never pip-installed
    SERVICE_VERSION = "0+unknown"
