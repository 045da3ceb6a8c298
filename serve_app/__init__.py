"""The Ray Serve application: one deployment per model behind one HTTP gateway (the package map is in README.md,
"Development")."""

from pathlib import Path

# The repository root: relative paths in configs (checkpoints, the SQLite file, calibration files, the KubeRay CRD)
# resolve against it when they do not exist under the working directory.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
