"""The Qwen3 backbone's forward pass, computing the last layer only where its output is read.

Both engines read one hidden state per sequence: its last token's. Every layer but the last must run at every
position (later positions attend to them), but the last layer's output is read at one position per sequence:
there it needs keys and values everywhere and queries, attention output, o_proj and MLP only at those
positions. That is about 1/num_layers of the work (1/28 for the 0.6B), and the same cut a decoder serving stack
makes when it computes logits only for the tokens it samples.

Layers 1..N-1 run transformers' own modules, with the model's attention implementation; the last layer is
recomposed here from that layer's own submodules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Cache
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen3.modeling_qwen3 import repeat_kv, rotate_half


def last_token_forward(backbone, ids: torch.Tensor, positions: torch.Tensor, ends: torch.Tensor,
                       cache: Cache | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Final-norm hidden state at position ends[b] of each right-padded row b: [batch, hidden].

    `positions` is one row [1, width] shared by every row of the batch, or one per row [batch, width]. With
    `cache`, the rows continue the cached prefix (and the cache is updated as transformers' layers update it).
    `key_mask` [batch, prefix + width] marks the keys each row may see (False: another row's padding in the
    prefix); without it every row sees the whole prefix. Packed rows (flash-attention varlen) keep transformers'
    full forward: there one row holds many sequences, and gathering each one's keys would cost more than the cut
    saves.
    """
    hidden = backbone.embed_tokens(ids)
    # A key mask becomes transformers' own mask for the attention implementation in use (a padded causal mask
    # for SDPA, unpadded varlen rows for flash-attention); without one SDPA keeps its is_causal path.
    mask = create_causal_mask(config=backbone.config, inputs_embeds=hidden, attention_mask=key_mask,
                              past_key_values=cache, position_ids=positions)
    position_embeddings = backbone.rotary_emb(hidden, positions)
    *layers, last_layer = backbone.layers[:backbone.config.num_hidden_layers]
    for layer in layers:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                       position_ids=positions, past_key_values=cache, use_cache=cache is not None)
    return backbone.norm(_last_layer_at(last_layer, hidden, position_embeddings, ends, cache, key_mask))


def _last_layer_at(layer, hidden: torch.Tensor, position_embeddings, ends: torch.Tensor,
                   cache: Cache | None, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Qwen3DecoderLayer.forward with its output only at (row b, position ends[b]): [batch, hidden]."""
    attention = layer.self_attn
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    normed = layer.input_layernorm(hidden)
    per_head = (*hidden.shape[:-1], -1, attention.head_dim)
    cos, sin = position_embeddings  # [1 or batch, width, head_dim]

    # Keys and values at every position: each sequence's last token attends to all of them.
    keys = attention.k_norm(attention.k_proj(normed).view(per_head)).transpose(1, 2)
    keys = keys * cos.unsqueeze(1) + rotate_half(keys) * sin.unsqueeze(1)
    values = attention.v_proj(normed).view(per_head).transpose(1, 2)
    if cache is not None:
        keys, values = cache.update(keys, values, attention.layer_idx)
    prefix = keys.shape[2] - hidden.shape[1]  # cached positions in front of the batch's own

    # Queries only at the last tokens: [batch, heads, 1, head_dim].
    queries = attention.q_norm(attention.q_proj(normed[rows, ends]).view(len(rows), 1, -1, attention.head_dim))
    cos_last = cos.expand(len(rows), -1, -1)[rows, ends][:, None, None, :]
    sin_last = sin.expand(len(rows), -1, -1)[rows, ends][:, None, None, :]
    queries = (queries * cos_last + rotate_half(queries) * sin_last).transpose(1, 2)

    # Row b's query sees the prefix (where the key mask allows) and its own positions up to ends[b] (padding
    # lies beyond).
    visible = torch.arange(keys.shape[2], device=keys.device) <= (ends + prefix)[:, None]
    if key_mask is not None:
        visible &= key_mask
    groups = attention.num_key_value_groups
    attended = F.scaled_dot_product_attention(queries, repeat_kv(keys, groups), repeat_kv(values, groups),
                                              attn_mask=visible[:, None, None, :], scale=attention.scaling)
    out = hidden[rows, ends] + attention.o_proj(attended.reshape(len(rows), -1))
    return out + layer.mlp(layer.post_attention_layernorm(out))
