"""A clean start: `python -m serve_app.replica.weights --fetch` (what `make serve` runs before Serve) fetches every model's
weights and, when some cannot be had, prints one short line per model and exits 1, fast, without Ray or torch.

The unreachable hub is a real one: HF_ENDPOINT points at a port on this machine where nothing listens, so every
request to it is refused at once, whatever the machine's own network."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

from serve_app.replica.weights import main
from tests.serving import free_port

REPO = Path(__file__).resolve().parent.parent
UNREACHABLE_HUB_ID = "qwen3-serve-tests/unreachable-reranker"


def config_with(tmp_path: Path, models: dict[str, str]) -> Path:
    """configs/tiny.yaml with its models replaced by {name: source} (rerankers)."""
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    template = config["applications"][1]
    config["applications"] = [config["applications"][0]]
    for name, source in models.items():
        application = {**template, "name": name, "args": {**template["args"], "name": name, "aliases": [],
                                                          "source": source}}
        application["args"].pop("build_offline")
        config["applications"].append(application)
    path = tmp_path / "fetch.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fetch_fails_with_one_line_per_missing_model_and_nothing_imported(tmp_path, tiny_reranker_path):
    path = config_with(tmp_path, {"present": str(tiny_reranker_path), "from-hub": UNREACHABLE_HUB_ID,
                                  "missing": str(tmp_path / "no-checkpoint")})
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_OFFLINE", None)  # the hub must be asked, and found unreachable
    # The module's main, as `python -m serve_app.replica.weights --fetch` runs it, then which heavy modules it imported.
    code = ("import sys; from serve_app.replica.weights import main; status = main(sys.argv[1:]); "
            "print('imported:', [m for m in ('ray', 'torch') if m in sys.modules], file=sys.stderr); sys.exit(status)")
    result = subprocess.run([sys.executable, "-c", code, "--fetch", str(path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    failures = [line for line in lines if line.startswith(("from-hub:", "missing:"))]
    assert len(failures) == 2 and all("configs/tiny.yaml" in line for line in failures), lines
    assert not any(line.startswith("present:") for line in lines)
    hub_line = next(line for line in failures if line.startswith("from-hub:"))
    assert UNREACHABLE_HUB_ID in hub_line and "unreachable" in hub_line and "not in the local cache" in hub_line
    assert f"{path}: 2 of 3 models have no weights" in result.stderr
    assert "imported: []" in lines[-1]  # the check starts nothing: no Ray, no torch


def test_fetch_succeeds_when_every_model_has_its_weights(tmp_path, tiny_reranker_path, capsys):
    path = config_with(tmp_path, {"first": str(tiny_reranker_path), "second": str(tiny_reranker_path)})
    assert main(["--fetch", str(path)]) == 0
    assert f"{path}: weights ready for first, second" in capsys.readouterr().out


def test_make_serve_fetches_before_it_starts_serve():
    """make stops at the first failing command, so a failed fetch never reaches `qwen3-serve` (serve run)."""
    result = subprocess.run(["make", "-n", "serve", "CONFIG=configs/some.yaml"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    commands = result.stdout.splitlines()
    fetch = next(i for i, line in enumerate(commands) if "-m serve_app.replica.weights --fetch configs/some.yaml" in line)
    serve = next(i for i, line in enumerate(commands) if "qwen3-serve configs/some.yaml" in line)
    assert fetch < serve
