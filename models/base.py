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
from dataclasses import dataclass, replace
from typing import Callable, ClassVar

import numpy as np
import torch
from transformers import AutoTokenizer, Cache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from models.batching import plan_micro_batches
from models.errors import EngineInputError
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
    # A micro-batch whose rows all continue one query head reads it through `expand` (one copy of the head's
    # slots per layer, one positions row, no key mask) instead of each row gathering its own copy behind a key
    # mask, as rows of different heads must. Measured on the 2-core CPU (shape-true 0.6B widths, 4 layers, budget
    # 1024, micro-batches alternated; BENCHMARKS.md "Cross-request packing"): for a 2055-token query x 32 short
    # documents gathering took 1.103x the time of the engine before issue 14, expand 1.009x; for rerank 1x32
    # (76-token head) both were within 0.6% of it. Not measured on a GPU (none lent yet); expand copies less on
    # any device, so it is on everywhere, and False keeps the gather path checkable there.
    expand_shared_head: bool = True

    @property
    def default_token_budget(self) -> int:
        # CPU: small micro-batches keep the memory-bound steps (norms, RoPE, SiLU, residuals) in cache; on the
        # 2-core machine 1024 slots were fastest of 256..16384 (shape-true 0.6B layers: 1.34-1.43x the FLOP
        # floor at 1024, 1.49-1.85x at 4096, 2.87x at 16384; BENCHMARKS.md). GPU: large batches fill the SMs; 32k slots of a 0.6B
        # model take well under 1 GiB of activations.
        return 32768 if self.device.type == "cuda" else 1024

    @property
    def default_max_batch_items(self) -> int:
        # Rows per micro-batch. On a GPU the passes are what cost: at budget 32768, 64 concurrent 8-document rerank
        # requests take 1 head pass + 512/64 = 8 document passes at 64 rows, 1 + 6 at 96 with 1.181x the useful
        # token slots (bench/packing_bench.py, BENCHMARKS.md "Cross-request packing"). CPU keeps 64 (its budget of
        # 1024 slots binds first).
        return 96 if self.device.type == "cuda" else DEFAULT_MAX_BATCH_ITEMS


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


class _HeadStoreLayer(DynamicLayer):
    """One layer's cache during a pass over right-padded heads: writes their keys/values into the store.

    The pass attends only to its own tokens (there is no past); its rows land in the store's slots
    [offset, offset + batch x width), row after row, padding slots included (masked when read).
    """

    def __init__(self, keys_store: torch.Tensor, values_store: torch.Tensor, offset: int):
        super().__init__()
        self.keys_store, self.values_store, self.offset = keys_store, values_store, offset

    def get_seq_length(self) -> int:
        return 0

    def update(self, key_states, value_states, *args, **kwargs):
        batch, heads, width, head_dim = key_states.shape
        slots = slice(self.offset, self.offset + batch * width)
        self.keys_store[:, slots].view(heads, batch, width, head_dim).copy_(key_states.transpose(0, 1))
        self.values_store[:, slots].view(heads, batch, width, head_dim).copy_(value_states.transpose(0, 1))
        return key_states, value_states


class _GatheredPrefixLayer(DynamicLayer):
    """One layer's cached head keys/values in front of a micro-batch's own, read but never grown.

    Row b's prefix is the store's slots `slots[b]` ([rows, width]; a single row serves every row of the batch
    through `expand`). Each forward returns [prefix ; new] for attention and forgets the new part, so one store
    serves any number of micro-batches, and memory holds one layer's gathered keys at a time.
    """

    def __init__(self, keys_store: torch.Tensor, values_store: torch.Tensor, slots: torch.Tensor):
        super().__init__()
        self.keys_store, self.values_store, self.slots = keys_store, values_store, slots

    def get_seq_length(self) -> int:
        return self.slots.shape[1]

    def update(self, key_states, value_states, *args, **kwargs):
        return self._after_prefix(self.keys_store, key_states), self._after_prefix(self.values_store, value_states)

    def _after_prefix(self, store: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        rows, width = self.slots.shape
        heads, _, head_dim = store.shape
        prefix = store.index_select(1, self.slots.flatten()).view(heads, rows, width, head_dim).transpose(0, 1)
        return torch.cat([prefix.expand(states.shape[0], -1, -1, -1), states], dim=-2)


@dataclass
class HeadStore:
    """Keys/values of many heads, per layer [kv_heads, slots, head_dim]: head i fills slots
    starts[i] .. starts[i] + lengths[i] - 1 (slots after it, up to the next head, are padding)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    starts: torch.Tensor
    lengths: torch.Tensor

    def cache(self, heads: torch.Tensor, width: int) -> Cache:
        """A read-only cache putting head heads[b] in front of row b (one head: in front of every row), padded to
        `width` slots. Padding slots repeat the head's last slot, so they are valid indices; masks hide them."""
        columns = torch.arange(width, device=heads.device)
        slots = self.starts[heads, None] + torch.minimum(columns, self.lengths[heads, None] - 1)
        return Cache(layers=[_GatheredPrefixLayer(keys, values, slots) for keys, values in zip(self.keys, self.values)])


@dataclass
class TextTokens:
    """One text's tokens as the engine computes them, for clients that count or inspect tokens (TEI's and vLLM's
    /tokenize): `text` is the string the offsets index (the text inside its prompt when one was asked for)."""

    text: str
    ids: list[int]
    pieces: list[str]  # each token's vocabulary string (the tokenizer's convert_ids_to_tokens)
    offsets: list[tuple[int, int] | None]  # [start, stop) in `text`, in characters; None for a special token
    special: list[bool]  # added by the tokenizer's template or the engine (e.g. the end token), not read from text


@dataclass
class WorkCounters:
    """Cumulative forward-pass work of an engine. real_tokens / computed_slots is the padding efficiency.

    micro_batches counts forward passes, the reranker's query-head passes included; computed_slots counts the
    token slots each pass computes (batch x longest row when padded), real_tokens the real tokens among them
    (each query head once). For one `run`: `before = work.snapshot(); engine.run(jobs); work.since(before)`.
    """

    real_tokens: int = 0
    computed_slots: int = 0
    micro_batches: int = 0

    def add(self, lengths: list[int], packed: bool) -> None:
        self.real_tokens += sum(lengths)
        self.computed_slots += sum(lengths) if packed else len(lengths) * max(lengths)
        self.micro_batches += 1

    def snapshot(self) -> WorkCounters:
        return replace(self)

    def since(self, earlier: WorkCounters) -> WorkCounters:
        """The work done after `earlier` (a snapshot of these counters)."""
        return WorkCounters(self.real_tokens - earlier.real_tokens, self.computed_slots - earlier.computed_slots,
                            self.micro_batches - earlier.micro_batches)

    @property
    def tokens_per_pass(self) -> float:
        return self.real_tokens / self.micro_batches if self.micro_batches else 0.0

    @property
    def slots_per_pass(self) -> float:
        return self.computed_slots / self.micro_batches if self.micro_batches else 0.0


class Qwen3Engine:
    """Holds a Qwen3 backbone (`Qwen3Model`, final norm included) and runs token sequences through it."""

    task: ClassVar[str]
    auto_model_class: ClassVar[type]  # how the published checkpoint loads (AutoModelForCausalLM / AutoModel)

    def __init__(self, backbone: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, runtime: Runtime, *,
                 source: str, max_length: int = DEFAULT_MAX_LENGTH, token_budget: int | None = None,
                 max_batch_items: int | None = None):
        if max_length < 16:
            raise ValueError("max_length must be at least 16 tokens")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.runtime = runtime
        self.source = source
        self.max_length = max_length
        self.token_budget = token_budget or runtime.default_token_budget
        self.max_batch_items = max_batch_items or runtime.default_max_batch_items
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

    def text_tokens_of(self, segments: list[tuple[str, bool]], appended: list[int] = ()) -> TextTokens:
        """The tokens of a prompt made of segments, each tokenized on its own (`(text, add_special_tokens)`, as the
        engine's tokenize joins them), then `appended` ids (special). Offsets are characters of the joined text."""
        text, ids, offsets, special = "", [], [], []
        for segment, add_special_tokens in segments:
            encoded = self.tokenizer(segment, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                                     return_special_tokens_mask=True, return_attention_mask=False)
            ids.extend(encoded["input_ids"])
            special.extend(bool(flag) for flag in encoded["special_tokens_mask"])
            offsets.extend((start + len(text), stop + len(text)) for start, stop in encoded["offset_mapping"])
            text += segment
        ids.extend(appended)
        special.extend(True for _ in appended)
        offsets.extend((0, 0) for _ in appended)
        return TextTokens(text=text, ids=[int(token) for token in ids],
                          pieces=list(self.tokenizer.convert_ids_to_tokens(ids)),
                          offsets=[None if flag else span for flag, span in zip(special, offsets)], special=special)

    def decode(self, sequences: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        """Token ids back to text, one string per sequence."""
        known = len(self.tokenizer)
        for position, ids in enumerate(sequences):
            for token in ids:
                if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < known:
                    raise EngineInputError(f"ids[{position}] holds {token!r}, not a token id in [0, {known})",
                                           param="ids")
        return list(self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens))

    # ---- forward passes -------------------------------------------------------------------------------

    @torch.inference_mode()
    def last_token_states(self, sequences: list[TokenIds]) -> torch.Tensor:
        """Final-norm hidden state of each sequence's last token, fp32, in input order: [N, hidden].

        Sequences are length-sorted into micro-batches under the token budget.
        """
        out = torch.empty(len(sequences), self.hidden_size, dtype=torch.float32, device=self.runtime.device)
        lengths = [len(s) for s in sequences]
        packed = self.runtime.pack_sequences
        for group in plan_micro_batches(lengths, self.token_budget, self.max_batch_items):
            batch = [sequences[i] for i in group]
            states = self._forward_packed(batch) if packed else self._forward_padded(batch)
            self.work.add([len(seq) for seq in batch], packed)
            out[torch.tensor(group, device=out.device)] = states.float()
        return out

    @torch.inference_mode()
    def last_token_states_after_heads(self, heads: list[TokenIds], tails: list[TokenIds],
                                      owners: list[int]) -> torch.Tensor:
        """Final-norm hidden state of the last token of each `head[owners[i]] + tails[i]`, fp32: [N, hidden].

        Each head runs once (heads share right-padded passes) and its keys/values serve every tail that continues
        it: exact under causal attention. Tails of all heads are length-sorted together into micro-batches under
        the token budget, each row reading its own head's keys/values.
        """
        out = torch.empty(len(tails), self.hidden_size, dtype=torch.float32, device=self.runtime.device)
        # Heads are held in waves of at most max_length padded slots (or a single head), so a run of many
        # requests holds no more head keys/values than one max-length query did when heads ran one at a time.
        for wave in plan_micro_batches([len(h) for h in heads], self.max_length, max(len(heads), 1)):
            store = self._head_store([heads[h] for h in wave])
            wave_head = {head: position for position, head in enumerate(wave)}
            members = [i for i, owner in enumerate(owners) if owner in wave_head]
            for group in plan_micro_batches([len(tails[i]) for i in members], self.token_budget,
                                            self.max_batch_items):
                rows = [members[g] for g in group]
                batch = [tails[i] for i in rows]
                states = self._forward_after_heads(batch, store, [wave_head[owners[i]] for i in rows])
                self.work.add([len(seq) for seq in batch], packed=False)
                out[torch.tensor(rows, device=out.device)] = states.float()
        return out

    def _right_padded(self, batch: list[TokenIds]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [batch, longest] padded on the right, and each row's length."""
        device = self.runtime.device
        lengths = torch.tensor([len(s) for s in batch], device=device)
        padded = np.full((len(batch), int(lengths.max())), self.pad_id, dtype=np.int64)
        for row, seq in enumerate(batch):
            padded[row, :len(seq)] = seq
        return torch.from_numpy(padded).to(device), lengths

    def _forward_padded(self, batch: list[TokenIds], cache: Cache | None = None) -> torch.Tensor:
        # Right padding and no attention mask: under causal attention a real token only sees earlier
        # positions, which are all real, so the result at each sequence's last token is exact, and SDPA
        # keeps its fast is_causal path. With `cache` (a head store's writer), the keys/values are kept.
        ids, lengths = self._right_padded(batch)
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        if self.cut_last_layer:
            return last_token_forward(self.backbone, ids, positions, lengths - 1, cache=cache)
        hidden = self.backbone(input_ids=ids, position_ids=positions, past_key_values=cache,
                               use_cache=cache is not None).last_hidden_state
        return hidden[torch.arange(len(batch), device=ids.device), lengths - 1]

    def _head_store(self, heads: list[TokenIds]) -> HeadStore:
        """Run heads in right-padded micro-batches and keep their keys/values, every layer's, in one store."""
        device, config = self.runtime.device, self.backbone.config
        lengths = [len(h) for h in heads]
        groups = plan_micro_batches(lengths, self.token_budget, self.max_batch_items)
        widths = [max(lengths[i] for i in group) for group in groups]
        shape = (config.num_key_value_heads, sum(len(g) * w for g, w in zip(groups, widths)), config.head_dim)
        store = HeadStore(keys=[torch.empty(shape, dtype=self.backbone.dtype, device=device)
                                for _ in range(config.num_hidden_layers)],
                          values=[torch.empty(shape, dtype=self.backbone.dtype, device=device)
                                  for _ in range(config.num_hidden_layers)],
                          starts=torch.empty(len(heads), dtype=torch.long), lengths=torch.tensor(lengths))
        offset = 0
        for group, width in zip(groups, widths):
            batch = [heads[i] for i in group]
            self._forward_padded(batch, Cache(layers=[_HeadStoreLayer(keys, values, offset)
                                                      for keys, values in zip(store.keys, store.values)]))
            self.work.add([len(h) for h in batch], packed=False)
            store.starts[group] = offset + width * torch.arange(len(group))
            offset += len(group) * width
        store.starts, store.lengths = store.starts.to(device), store.lengths.to(device)
        return store

    def _forward_after_heads(self, batch: list[TokenIds], store: HeadStore, heads: list[int]) -> torch.Tensor:
        # Row b continues head heads[b]: positions restart after each row's own head, and heads are padded to the
        # longest of the batch (RoPE is relative, so the padded slots move nothing), where a key mask hides them.
        # Rows that all continue one head share it: one positions row and no key mask, so transformers builds
        # one causal mask broadcast over the rows.
        ids, lengths = self._right_padded(batch)
        device = ids.device
        shared = self.runtime.expand_shared_head and len(set(heads)) == 1
        head_index = torch.tensor(heads[:1] if shared else heads, device=device)
        head_lengths = store.lengths[head_index]
        width = int(head_lengths.max())
        cache = store.cache(head_index, width)
        positions = head_lengths[:, None] + torch.arange(ids.shape[1], device=device)
        key_mask = None if shared else torch.cat([torch.arange(width, device=device) < head_lengths[:, None],
                                                  torch.ones(ids.shape, dtype=torch.bool, device=device)], dim=1)
        if self.cut_last_layer:
            return last_token_forward(self.backbone, ids, positions, lengths - 1, cache=cache, key_mask=key_mask)
        hidden = self.backbone(input_ids=ids, attention_mask=key_mask, position_ids=positions,
                               past_key_values=cache, use_cache=True).last_hidden_state
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
