"""The fast training forward of the Llama-like families: the decoder computed on unpadded tokens.

It serves the dense decoders whose layers are Llama's (pre-norm RMSNorm, rotary grouped-query
attention, SiLU-gated MLP) as transformers defines them per family (:data:`FAMILY_PREFIXES`):
Llama with a rope type fixed when the model is built (:data:`STATIC_ROPE_TYPES`), Mistral and
Qwen 2 (biased q/k/v projections, which their grouped product adds), and Qwen 3 dense (QK-norm: each
query and key head normalized before the rotary embedding). Sliding-window attention is not
computed: a batch with an example longer than a layer's window (:func:`narrowest_window`) is
declined, and below it the window masks nothing.

Hugging Face's decoder forward, run on a padded batch under autocast, spends most of a CPU training
step outside the matrix products that do the work: on padding rows, on skinny low-rank products
(``x Aᵀ`` has 16 columns), on autocast re-casting the fp32 adapters at every op, on a chain of
small element-wise kernels per norm and per rotary embedding, and on a CPU bf16 attention kernel
that is slower than three plain batched products for sequences this short. This module computes
the *same function* (``plugins/families/tests/test_fast_paths.py`` checks loss and gradients against the plain
path) with these changes:

1. **Unpadded tokens** (:class:`~deltatune_families.fast.tokens.TokenLayout`). The real tokens of a
   batch — ``attention_mask == 1``, or every token of packed rows — are gathered into one
   ``(tokens x hidden)`` matrix, and every linear layer, norm and activation runs on those rows
   only. Examples are told apart as Hugging Face does (a new row, or ``position_ids`` not increasing
   by one: packing); only attention needs them, and it runs in an ``(examples x longest example)``
   layout. Examples without a labelled target are dropped before the first layer, and past its
   attention the last layer computes only the labelled positions: nothing else reaches the loss.
2. **Grouped products** (:class:`~deltatune.deltas.grouped.ProjectionGroup`). Linear layers that
   read the same input (q/k/v, gate/up) run as one grouped product when their deltas provide one
   (a low-rank pair's: its ``A`` products as one product, its ``B`` products as one block-diagonal product,
   with a hand-written backward); the products refresh what they keep between steps for the whole
   model at once, before the first layer.
3. **bf16 without autocast.** Frozen weights are held in bf16 (see
   :func:`deltatune.model.assembly.compute_dtype`); products run in bf16, norms and softmax accumulate in
   fp32 exactly where Hugging Face does.
4. **Hand-written backward** for RMSNorm, rotary embedding + attention and the SiLU gate
   (:mod:`deltatune_families.fast.kernels`): fewer saved tensors and fewer passes over memory than
   autograd's chain of small ops.

Anything not recognised is left to the module itself: a linear layer whose deltas provide no grouped
product (DoRA, VeRA, several deltas), a quantized base, dropout while training, or a forward hook runs
its own ``forward`` inside the fast forward; an unknown architecture or a hooked norm/attention/MLP
makes :func:`fast_forward_for` return ``None`` (so do a rope type recomputed from the sequence length,
``dynamic`` or ``longrope``, and a layer type other than full or sliding attention), and a batch whose
labelled positions follow padding, or with an example longer than a sliding window, makes the forward
return ``None``: the loss then uses the plain Hugging Face forward.
"""

from __future__ import annotations

import importlib
import weakref
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from deltatune.api import (
    HEAD_ROW_STEP,
    IGNORE_INDEX,
    ProjectionGroup,
    deferred_tied_head,
    head_loss,
    hooked,
    refresh_groups,
    round_up,
)
from deltatune_families.fast.kernels import FLASH_MIN_WIDTH, Attention, RMSNorm, SiluGate
from deltatune_families.fast.tokens import TokenLayout


def _only_input_grad_hooks(model: nn.Module, embedding: nn.Module) -> bool:
    """Whether the only hooks on ``embedding`` are the ones Hugging Face's
    ``gradient_checkpointing_enable`` adds (``enable_input_require_grads``: the embedding's output
    requires grad, which re-entrant checkpointing needs). The fast path checkpoints without re-entry,
    so they change nothing it computes."""
    handles = getattr(model, "_require_grads_hooks", None) or []
    ids = {handle.id for handle in handles}
    return (bool(ids) and set(embedding._forward_hooks) <= ids and not embedding._forward_pre_hooks
            and not embedding._backward_hooks and not getattr(embedding, "_backward_pre_hooks", None))


# -- the decoder ---------------------------------------------------------------------------------------------
FAMILY_PREFIXES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
"""The model types this forward serves → the prefix of their classes in transformers' ``modeling_<type>``."""

STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
"""Rope types whose ``inv_freq`` and ``attention_scaling`` are fixed when the model is built (the dynamic
ones, ``dynamic`` and ``longrope``, recompute them from the sequence length in the rotary forward)."""


@dataclass(frozen=True)
class DecoderClasses:
    """The module classes of one Llama-like family's decoder, as transformers defines them."""

    model: type
    layer: type
    attention: type
    mlp: type
    norm: type
    rotary: type
    qk_norm: bool
    """Whether attention normalizes each query and key head before the rotary embedding (Qwen 3)."""


@lru_cache(maxsize=None)
def decoder_classes(model_type: str) -> DecoderClasses:
    """The classes of ``model_type``'s decoder (one of :data:`FAMILY_PREFIXES`)."""
    prefix = FAMILY_PREFIXES[model_type]
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return DecoderClasses(*(getattr(modeling, f"{prefix}{part}") for part in
                            ("Model", "DecoderLayer", "Attention", "MLP", "RMSNorm", "RotaryEmbedding")),
                          qk_norm=model_type == "qwen3")


def attention_windows(config: Any) -> list[int | None] | None:
    """The sliding window of each layer's attention (``None``: full causal attention), as the model's
    masks apply it: every layer gets ``config.sliding_window`` without ``layer_types`` (Mistral), the
    layers of type ``sliding_attention`` with them (Qwen 2/3). ``None`` for a layer type other than
    these two."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is None:
        return [window] * config.num_hidden_layers
    if not set(types) <= {"full_attention", "sliding_attention"}:
        return None
    return [window if kind == "sliding_attention" else None for kind in types[: config.num_hidden_layers]]


def narrowest_window(config: Any) -> int | None:
    """The narrowest sliding window of any layer (:func:`attention_windows`), or ``None``: a batch with a
    longer example (:func:`longest_span`) is declined, the window would mask some of its attention."""
    windows = [w for w in attention_windows(config) or [] if w is not None]
    return min(windows) if windows else None


def longest_span(layout: TokenLayout) -> int:
    """The most input positions any computed example spans in its row (from its first token to its
    last): a sliding window at least this wide masks nothing in it."""
    if layout.real == 0:
        return 0
    index = layout.index[: layout.real]
    offsets = layout.slots % layout.width
    first = index[torch.arange(layout.real, device=index.device) - offsets]
    return int((index - first).max()) + 1


def _static_rotary(decoder: nn.Module, rotary_cls: type) -> bool:
    """Whether the decoder's rotary embedding is its family's, with a rope type of
    :data:`STATIC_ROPE_TYPES` rotating every dimension of a head."""
    rotary = decoder.rotary_emb
    if type(rotary) is not rotary_cls or getattr(rotary, "rope_type", None) not in STATIC_ROPE_TYPES:
        return False
    head_dim = decoder.layers[0].self_attn.head_dim if len(decoder.layers) else None
    return head_dim is None or rotary.inv_freq.numel() * 2 == head_dim


def _recognised_layer(layer: nn.Module, classes: DecoderClasses) -> bool:
    """Whether ``layer`` is its family's decoder layer, made of its family's modules, none hooked."""
    attention = layer.self_attn
    if type(layer) is not classes.layer or type(attention) is not classes.attention or type(layer.mlp) is not classes.mlp:
        return False
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    if classes.qk_norm:
        norms += [attention.q_norm, attention.k_norm]
        if attention.q_norm.variance_epsilon != attention.k_norm.variance_epsilon:
            return False
    return (all(type(norm) is classes.norm for norm in norms)
            and not any(hooked(part) for part in (layer, attention, layer.mlp, *norms)))


class DecoderFastForward:
    """The fast training forward of one recognised Llama-like decoder (Llama, Mistral, Qwen 2,
    Qwen 3 dense): its pieces, checked once and re-checked cheaply at every call; calling it computes a
    batch's loss."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        decoder = model.get_decoder()
        self.decoder = decoder
        self.config = decoder.config
        self.classes = decoder_classes(self.config.model_type)
        self.layers = list(decoder.layers[: self.config.num_hidden_layers])
        self.groups = [
            (ProjectionGroup([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj]),
             ProjectionGroup([l.self_attn.o_proj]), ProjectionGroup([l.mlp.gate_proj, l.mlp.up_proj]),
             ProjectionGroup([l.mlp.down_proj]))
            for l in self.layers
        ]
        self.heads = self.config.num_attention_heads
        self.kv_heads = self.config.num_key_value_heads
        self.head_dim = self.layers[0].self_attn.head_dim if self.layers else 0

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Whether ``model`` is a decoder this path computes exactly (checked module by module)."""
        getter = getattr(model, "get_decoder", None)
        config = getattr(model, "config", None)
        if not callable(getter) or config is None or getattr(config, "model_type", None) not in FAMILY_PREFIXES:
            return False
        try:
            decoder = getter()
        except Exception:  # noqa: BLE001 - an unusual model: use the plain path
            return False
        classes = decoder_classes(config.model_type)
        if type(decoder) is not classes.model or config.hidden_act != "silu" or attention_windows(config) is None:
            return False
        if type(decoder.embed_tokens) is not nn.Embedding or type(decoder.norm) is not classes.norm:
            return False
        if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
            return False
        for module in (model, decoder, decoder.norm, decoder.rotary_emb):
            if hooked(module):
                return False
        if hooked(decoder.embed_tokens) and not _only_input_grad_hooks(model, decoder.embed_tokens):
            return False
        return (all(_recognised_layer(layer, classes) for layer in decoder.layers)
                and _static_rotary(decoder, classes.rotary))

    def current(self) -> bool:
        """Whether the model still has the modules this forward was made for."""
        if self.model.get_decoder() is not self.decoder:
            return False
        for layer, (qkv, o, gate_up, down) in zip(self.layers, self.groups):
            attn, mlp = layer.self_attn, layer.mlp
            if (qkv.modules != [attn.q_proj, attn.k_proj, attn.v_proj] or o.modules[0] is not attn.o_proj
                    or gate_up.modules != [mlp.gate_proj, mlp.up_proj] or down.modules[0] is not mlp.down_proj):
                return False
        return True

    def layer(self, index: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: TokenLayout,
              autocast: tuple[bool, torch.dtype], rows: torch.Tensor | None = None) -> torch.Tensor:
        """One decoder layer on the token rows ``hidden``; with ``rows``, only those rows' outputs are
        computed (keys and values still come from every row) and returned, in that order."""
        layer = self.layers[index]
        qkv, o, gate_up, down = self.groups[index]
        attn = layer.self_attn
        x = RMSNorm.apply(hidden, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        projected = qkv(x, autocast)
        if self.classes.qk_norm:
            projected = self.normed_heads(projected, attn)
        heads = Attention.apply(projected, cos, sin, layout, self.heads, self.kv_heads, self.head_dim, attn.scaling)
        if rows is not None:
            hidden, heads = hidden[rows], heads[rows]
        hidden = hidden + o(heads, autocast)
        x = RMSNorm.apply(hidden, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        return hidden + down(SiluGate.apply(gate_up(x, autocast)), autocast)

    def normed_heads(self, qkv: torch.Tensor, attention: nn.Module) -> torch.Tensor:
        """``[q | k | v]`` with each query head normalized by ``q_norm`` and each key head by ``k_norm``
        (Qwen 3's QK-norm, before the rotary embedding): one RMSNorm over the ``heads + kv_heads``
        head vectors of a token, with the two weights stacked per head."""
        tokens, qk_end = qkv.shape[0], (self.heads + self.kv_heads) * self.head_dim
        weight = torch.cat([attention.q_norm.weight.expand(self.heads, self.head_dim),
                            attention.k_norm.weight.expand(self.kv_heads, self.head_dim)])
        qk = RMSNorm.apply(qkv[:, :qk_end].view(tokens, self.heads + self.kv_heads, self.head_dim), weight,
                           attention.q_norm.variance_epsilon)
        return torch.cat([qk.view(tokens, qk_end), qkv[:, qk_end:]], dim=1)

    def refresh_products(self, dtype: torch.dtype) -> None:
        """Let the grouped products refresh what they keep, for every group of the model at once
        (:func:`deltatune.deltas.grouped.refresh_groups`)."""
        refresh_groups((g for layer_groups in self.groups for g in layer_groups), dtype)

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``, ``sin`` of ``positions`` (``tokens x 1 x head_dim``), as the model's rotary embedding
        computes them: from its ``inv_freq``, scaled by its ``attention_scaling`` (yarn's), in fp32."""
        rotary = self.decoder.rotary_emb
        freqs = positions[:, None].float() * rotary.inv_freq.float()[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos() * rotary.attention_scaling, emb.sin() * rotary.attention_scaling
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int] | None:
        """``(summed cross-entropy, labelled tokens)`` of ``batch``, or ``None`` (use the plain path)."""
        embed = self.decoder.embed_tokens
        dtype = embed.weight.dtype
        if not dtype.is_floating_point or self.config.attention_dropout and self.model.training:
            return None
        layout = TokenLayout.build(batch)
        window = narrowest_window(self.config)
        if layout is None or window is not None and longest_span(layout) > window:
            return None
        if layout.width >= FLASH_MIN_WIDTH and embed.weight.device.type != "cpu":
            return None  # the memory-efficient attention of long examples is the CPU's; elsewhere the model's own runs
        head = self.model.get_output_embeddings()
        if layout.count == 0:
            return embed.weight.new_zeros((), dtype=torch.float32), 0
        device = embed.weight.device
        autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        with torch.autocast(device.type, enabled=False):
            deferred = deferred_tied_head(self.model)  # a tied head trained by LOMO/AdaLomo
            weight = embed.weight if deferred is None else deferred.attach()
            hidden = F.embedding(batch["input_ids"].reshape(-1)[layout.index], weight, embed.padding_idx,
                                 sparse=deferred is not None)
            cos, sin = self.rotary(layout.positions, dtype)
            self.refresh_products(dtype)
            checkpoint = self.decoder.gradient_checkpointing and self.model.training and torch.is_grad_enabled()
            # the last layer computes only the labelled rows past its attention (padded to the head's
            # row step with row 0, whose target is ignored): nothing else reaches the loss
            labelled = (layout.targets != IGNORE_INDEX).nonzero().squeeze(1)
            filler = round_up(len(labelled), HEAD_ROW_STEP) - len(labelled)
            targets = F.pad(layout.targets[labelled], (0, filler), value=IGNORE_INDEX)
            labelled = F.pad(labelled, (0, filler))
            last = len(self.layers) - 1
            for index in range(len(self.layers)):
                rows = labelled if index == last else None
                if checkpoint:
                    hidden = torch.utils.checkpoint.checkpoint(self.layer, index, hidden, cos, sin, layout, autocast,
                                                               rows, use_reentrant=False)
                else:
                    hidden = self.layer(index, hidden, cos, sin, layout, autocast, rows)
            if last < 0:  # a decoder without layers
                hidden = hidden[labelled]
            norm = self.decoder.norm
            hidden = RMSNorm.apply(hidden, norm.weight, norm.variance_epsilon)
            total = head_loss(head, hidden, targets, deferred)
        return total, layout.count


_FORWARDS: weakref.WeakKeyDictionary[nn.Module, DecoderFastForward] = weakref.WeakKeyDictionary()


def fast_forward_for(model: nn.Module) -> DecoderFastForward | None:
    """The fast forward of ``model`` (made once, re-checked at every call), or ``None`` when this module
    does not compute it exactly (the ``fast_forward`` of the Llama, Mistral, Qwen 2 and Qwen 3 families)."""
    forward = _FORWARDS.get(model)
    if forward is not None and forward.current() and DecoderFastForward.supports(model):
        return forward
    if not DecoderFastForward.supports(model):
        _FORWARDS.pop(model, None)
        return None
    forward = DecoderFastForward(model)
    _FORWARDS[model] = forward
    return forward

