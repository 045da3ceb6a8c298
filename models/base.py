"""What every Qwen3 engine shares: device and dtype choice, loading, and the batched forward pass.

The contract each engine implements is narrow (LitServe/Infinity style):

    job = engine.tokenize(...)        # text -> token ids, validation, token counts (cheap, no model)
    results = engine.run([job, ...])  # one or many jobs -> micro-batched forward -> per-job results

so a serving layer can tokenize before its batch queue (to count tokens) and hand whole batches of jobs to
`run`. Everything model-specific (prompt templates, pooling, scoring) stays inside the engine classes.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch
from transformers import AutoTokenizer, Cache, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from models.batching import plan_micro_batches
from models.forward import last_token_forward

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 8192
DEFAULT_MAX_BATCH_ITEMS = 64
# Texts per tokenizer call. The tokenizer keeps offsets and token strings for every token of a call, and Python
# lists cost ~40 bytes a token: one 32 MiB request (2048 inputs of 8192 tokens) took a replica from 0.5 to
# 3.9 GB in one call. In calls of 16, each kept as int32, the same request peaks at +86 MB (and tokenizes faster).
ENCODE_CHUNK_TEXTS = 16

# A token sequence: 1-D int32 array (4 bytes a token, however many requests wait in a replica's queues).
TokenIds = np.ndarray


def join_ids(*parts) -> TokenIds:
    """Concatenate token sequences (arrays or lists) into one int32 sequence."""
    return np.concatenate([np.asarray(part, dtype=np.int32) for part in parts])


@dataclass(frozen=True)
class Runtime:
    """Where and how the forward pass runs."""

    device: torch.device
    dtype: torch.dtype
    attn_implementation: str
    # Concatenate a micro-batch into one row (no padding) with restarting position ids. Pays only with
    # flash-attention's varlen kernel; under SDPA transformers builds a dense block mask, which is slower.
    pack_sequences: bool

    @property
    def default_token_budget(self) -> int:
        # CPU: small micro-batches keep the memory-bound steps (norms, RoPE, SiLU, residuals) in cache; on the
        # 2-core machine 1024 slots were fastest of 256..16384 (shape-true 0.6B layers: 1.34-1.43x the FLOP
        # floor at 1024, 1.49-1.85x at 4096, 2.87x at 16384; BENCHMARKS.md). GPU: large batches fill the SMs; 32k slots of a 0.6B
        # model take well under 1 GiB of activations.
        return 32768 if self.device.type == "cuda" else 1024


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_runtime(device: str = "auto", dtype: str = "auto", attn_implementation: str = "auto") -> Runtime:
    """Turn user settings into a concrete runtime. Auto: CUDA -> bf16, CPU -> fp32 (bf16 is 0.59x on CPU)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved_device = torch.device(device)
    if resolved_device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available on this machine")
    if dtype == "auto":
        resolved_dtype = torch.bfloat16 if resolved_device.type == "cuda" else torch.float32
    else:
        try:
            resolved_dtype = _DTYPES[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(_DTYPES))}") from None
    if attn_implementation == "auto":
        has_flash = importlib.util.find_spec("flash_attn") is not None
        use_flash = resolved_device.type == "cuda" and has_flash and resolved_dtype != torch.float32
        attn_implementation = "flash_attention_2" if use_flash else "sdpa"
    return Runtime(resolved_device, resolved_dtype, attn_implementation,
                   pack_sequences=attn_implementation.startswith("flash_attention"))


def load_pretrained(model_class: type[PreTrainedModel], source: str, revision: str | None,
                    runtime: Runtime) -> PreTrainedModel:
    """Load a published checkpoint (hub id or local directory) as stored, in the runtime's dtype.

    transformers 5 keeps a checkpoint's stored dtype (bf16 for Qwen3) unless told otherwise, so the dtype is
    always passed explicitly.
    """
    model = model_class.from_pretrained(source, revision=revision, dtype=runtime.dtype,
                                        attn_implementation=runtime.attn_implementation)
    return model.to(runtime.device).eval()


class _SharedPrefixLayer(DynamicLayer):
    """One layer's cached keys/values of a prefix shared by every row of a batch, read but never grown.

    Each forward returns [prefix ; new] for attention and forgets the new part, so one prefix serves any
    number of micro-batches without copies, and memory holds one layer's expanded keys at a time instead of
    the whole batch's cache.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, *args, **kwargs):
        batch = key_states.shape[0]
        keys = torch.cat([self.keys.expand(batch, -1, -1, -1), key_states], dim=-2)
        values = torch.cat([self.values.expand(batch, -1, -1, -1), value_states], dim=-2)
        return keys, values


def shared_prefix_cache(prefix_cache: Cache) -> Cache:
    """Freeze a batch-1 cache (from a forward with use_cache=True) into a read-only shared prefix."""
    return Cache(layers=[_SharedPrefixLayer(layer.keys, layer.values) for layer in prefix_cache.layers])


@dataclass
class WorkCounters:
    """Cumulative forward-pass work of an engine. real_tokens / computed_slots is the padding efficiency."""

    real_tokens: int = 0
    computed_slots: int = 0
    micro_batches: int = 0

    def add(self, lengths: list[int], packed: bool) -> None:
        self.real_tokens += sum(lengths)
        self.computed_slots += sum(lengths) if packed else len(lengths) * max(lengths)
        self.micro_batches += 1


class Qwen3Engine:
    """Holds a Qwen3 backbone (`Qwen3Model`, final norm included) and runs token sequences through it."""

    task: ClassVar[str]
    auto_model_class: ClassVar[type]  # how the published checkpoint loads (AutoModelForCausalLM / AutoModel)

    def __init__(self, backbone: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, runtime: Runtime, *,
                 source: str, max_length: int = DEFAULT_MAX_LENGTH, token_budget: int | None = None,
                 max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS):
        if max_length < 16:
            raise ValueError("max_length must be at least 16 tokens")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.runtime = runtime
        self.source = source
        self.max_length = max_length
        self.token_budget = token_budget or runtime.default_token_budget
        self.max_batch_items = max_batch_items
        self.vocab_size = backbone.get_input_embeddings().weight.shape[0]
        # Padding value for right-padded batches; padded positions are never attended to by real tokens
        # (causal attention), and never read, so any valid id works.
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # Running totals for serving metrics: real tokens vs token slots computed (padding included).
        self.work = WorkCounters()
        # Compute the last layer only at the tokens whose state is read (models/forward.py); transformers' full
        # forward when off (kept for comparison) and for packed rows.
        self.cut_last_layer = True

    @classmethod
    def from_pretrained(cls, source: str, *, revision: str | None = None, device: str = "auto",
                        dtype: str = "auto", attn_implementation: str = "auto", **options):
        """Load a published checkpoint (hub id or local directory) as is; `options` go to the engine."""
        runtime = resolve_runtime(device, dtype, attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        model = load_pretrained(cls.auto_model_class, source, revision, runtime)
        return cls(model, tokenizer, runtime, source=source, **options)

    @property
    def hidden_size(self) -> int:
        return self.backbone.config.hidden_size

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.backbone.parameters())

    def describe(self) -> dict:
        """Facts for a start-up log line and the models endpoint."""
        return {"task": self.task, "source": self.source, "device": str(self.runtime.device),
                "dtype": str(self.runtime.dtype).removeprefix("torch."),
                "attention": self.runtime.attn_implementation, "parameters": self.parameter_count(),
                "max_length": self.max_length, "token_budget": self.token_budget}

    def encode_text(self, text: str) -> TokenIds:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False), dtype=np.int32)

    def encode_texts(self, texts: list[str], fit: Callable[[int, list[int]], TokenIds], *,
                     add_special_tokens: bool) -> list[TokenIds]:
        """Tokenize many texts a few at a time; `fit(position, ids)` checks, cuts and stores each one at once,
        so a request's memory holds its kept tokens as int32 rather than every token as Python objects."""
        sequences = []
        for start in range(0, len(texts), ENCODE_CHUNK_TEXTS):
            encoded = self.tokenizer(texts[start:start + ENCODE_CHUNK_TEXTS], add_special_tokens=add_special_tokens,
                                     return_attention_mask=False)["input_ids"]
            sequences.extend(fit(start + offset, ids) for offset, ids in enumerate(encoded))
        return sequences

    # ---- forward passes -------------------------------------------------------------------------------

    @torch.inference_mode()
    def last_token_states(self, sequences: list[TokenIds], prefix: Cache | None = None) -> torch.Tensor:
        """Final-norm hidden state of each sequence's last token, fp32, in input order: [N, hidden].

        Sequences are length-sorted into micro-batches under the token budget. With `prefix`, every sequence
        continues that shared cached prefix (the reranker's query head).
        """
        out = torch.empty(len(sequences), self.hidden_size, dtype=torch.float32, device=self.runtime.device)
        lengths = [len(s) for s in sequences]
        for group in plan_micro_batches(lengths, self.token_budget, self.max_batch_items):
            batch = [sequences[i] for i in group]
            packed = prefix is None and self.runtime.pack_sequences
            states = self._forward_packed(batch) if packed else self._forward_padded(batch, prefix)
            self.work.add([len(seq) for seq in batch], packed)
            out[torch.tensor(group, device=out.device)] = states.float()
        return out

    def _forward_padded(self, batch: list[TokenIds], prefix: Cache | None) -> torch.Tensor:
        # Right padding and no attention mask: under causal attention a real token only sees earlier
        # positions, which are all real, so the result at each sequence's last token is exact, and SDPA
        # keeps its fast is_causal path.
        device = self.runtime.device
        lengths = torch.tensor([len(s) for s in batch], device=device)
        width = int(lengths.max())
        padded = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        for row, seq in enumerate(batch):
            padded[row, :len(seq)] = seq
        ids = torch.from_numpy(padded).to(device)
        offset = 0 if prefix is None else prefix.get_seq_length()
        positions = torch.arange(offset, offset + width, device=device).unsqueeze(0)
        if self.cut_last_layer:
            return last_token_forward(self.backbone, ids, positions, lengths - 1, cache=prefix)
        hidden = self.backbone(input_ids=ids, position_ids=positions, past_key_values=prefix,
                               use_cache=prefix is not None).last_hidden_state
        return hidden[torch.arange(len(batch), device=device), lengths - 1]

    def _forward_packed(self, batch: list[TokenIds]) -> torch.Tensor:
        # One row, position ids restarting per sequence: transformers detects the packing and calls
        # flash-attention's varlen kernel, so no padded slot is computed.
        device = self.runtime.device
        ids = torch.from_numpy(join_ids(*batch)).long().to(device).unsqueeze(0)
        positions = torch.cat([torch.arange(len(seq)) for seq in batch]).to(device).unsqueeze(0)
        hidden = self.backbone(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state[0]
        ends = torch.tensor([len(seq) for seq in batch], device=device).cumsum(0) - 1
        return hidden[ends]

    @torch.inference_mode()
    def prefix_cache(self, prefix_ids: TokenIds) -> Cache:
        """Run a shared prefix once and keep its keys/values for the sequences that continue it."""
        device = self.runtime.device
        ids = torch.from_numpy(join_ids(prefix_ids)).long().to(device).unsqueeze(0)
        if self.cut_last_layer:
            cache = DynamicCache(config=self.backbone.config)
            positions = torch.arange(len(prefix_ids), device=device).unsqueeze(0)
            last_token_forward(self.backbone, ids, positions, torch.tensor([len(prefix_ids) - 1], device=device),
                               cache=cache)
        else:
            cache = self.backbone(input_ids=ids, use_cache=True).past_key_values
        self.work.add([len(prefix_ids)], packed=True)
        return shared_prefix_cache(cache)
