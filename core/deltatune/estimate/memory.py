"""``deltatune estimate``: parameters and peak memory per device, before buying hardware.

::

    deltatune estimate --base llama-65b --quantizer '{name: nf4, config: {double_quant: true}}' \\
        --delta '{name: lora, config: {r: 64, targets: all-linear}}' --trainable-dtype bf16 \\
        --batch 1 --seq 512 --gradient-checkpointing --device cuda

**Parameters** are counted exactly: the base model is built from its configuration on PyTorch's
``meta`` device (shapes, no memory), the delta methods' own ``apply`` runs on it, and the core's
:func:`deltatune.model.assembly.claim_parameters` decides what trains — so every installed delta method,
third-party ones included, is counted as it really behaves. ``--base`` is a built-in model name, a
known architecture (:data:`ARCHITECTURES`: ``llama-7b`` … ``llama-65b``, ``llama2-70b``, SmolLM2;
configurations stored here, nothing is downloaded), a local Hugging Face folder or a ``config.json``.

**Bytes** per device (DDP replicates everything; ``--batch`` is the per-device micro-batch):

* weights: quantized linear weights at the quantizer's bits per weight (NF4: ``4 + 32/64 = 4.5``,
  with double quantization ``4 + 8/64 + 32/(64*256) = 4.127``), other frozen weights in the base dtype
  (``auto``: bf16 where the hardware has it), trained weights in ``--trainable-dtype``;
* gradients of the trained weights (one parameter's worth for optimizers that update inside backward: LOMO, AdaLomo);
* optimizer state: AdamW two moments in the parameter dtype, LOMO none, AdaLomo factored row and
  column statistics; a third-party optimizer may declare ``state_bytes_per_param(cfg)``;
* activations kept for backward (:func:`activation_bytes`: a per-layer, per-token model of a
  Llama-style decoder as deltatune runs it — its fast path with grouped low-rank products, hand-written norm,
  attention and SiLU backward, and a chunked cross-entropy that keeps no logits — checked against
  the tensors autograd really keeps in ``tests/test_estimate.py``); with gradient checkpointing
  the layer inputs plus one recomputed layer;
* transients: the largest of one chunk of logits, one layer's attention backward and a dequantized
  weight, plus one layer's backward working set;
* the compute-dtype copies of LoRA weights the fast path caches, and DDP's gradient buckets (one
  more copy of the trained gradients) when ``--devices`` > 1;
* loading: deltatune loads a LoRA-style base straight in its compute dtype, but in fp32 when a
  quantizer reads it (4 bytes per parameter before quantizing) or for full fine-tuning;
* on the CPU only: the resident memory of the Python + PyTorch + Lightning process itself
  (:data:`CPU_RUNTIME_BYTES`); the heap glibc keeps around the activations
  (:data:`CPU_HEAP_RETAINED` of them, added to training); the checkpoint Lightning serializes in
  memory after training (trained tensors + optimizer state on top of what stays resident then:
  weights, optimizer state, gradients unless updated inside backward, the activations' heap); and, when the base is
  loaded in another dtype than its safetensors files hold (``config.dtype``), the mapped file.

``peak = max(loading, training, checkpoint) + runtime`` (``checkpoint`` and ``runtime`` are 0 on a GPU). The numbers are what ``torch.cuda.max_memory_allocated``
reports on a GPU (the CUDA context, ~0.5 GB, comes on top) and the peak resident set (``VmHWM``) on
the CPU. ``tests/test_estimate.py`` compares them with measured peaks of real runs and with published
figures (QLoRA's 65B on one 48 GB GPU; LitGPT's 7B LoRA / NF4 / NF4-DQ table).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deltatune.errors import ConfigError

GB = 1e9
GIB = 1024**3
MIB = 1024**2

CPU_RUNTIME_BYTES = 530 * MIB
"""Resident memory of a ``deltatune fit`` process without its model: the Python interpreter, PyTorch,
transformers, Lightning, bitsandbytes, the plugins, the Trainer and the data pipeline (the measured
peak of a run of the 110k-parameter ``tiny-llama``: 534 MiB on the reference machine, 501 MiB of it
before the model is built; see ``docs/scale-out.md``)."""

CPU_HEAP_RETAINED = 0.35
"""On the CPU, the share of the activation bytes that stays resident *on top of* the live tensors.
PyTorch's CPU tensors come from glibc ``malloc``; once a freed block of a few MB has raised its
dynamic mmap threshold, activations come from the heap, and the holes the freed intermediates of
every layer leave there are not given back to the system: resident memory grows by about 1.35 times
the bytes autograd keeps (measured: 1,672 MiB resident for 1,290 MiB of saved tensors on SmolLM2-135M,
8 x 256 tokens; with ``MALLOC_MMAP_THRESHOLD_=131072`` it is 1,319 MiB). The heap stays that large
after training, so a checkpoint saved then comes on top of it."""


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int | None = None,
           context: int = 2048, eps: float = 1e-6, vocab: int = 32000, tied: bool = False,
           head_dim: int | None = None) -> dict[str, Any]:
    """A Llama configuration from its published dimensions."""
    return dict(model_type="llama", hidden_act="silu", attention_bias=False, mlp_bias=False, hidden_size=hidden,
                intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads or heads, max_position_embeddings=context, rms_norm_eps=eps,
                vocab_size=vocab, tie_word_embeddings=tied, **({"head_dim": head_dim} if head_dim else {}))


ARCHITECTURES: dict[str, dict[str, Any]] = {
    # LLaMA (Touvron et al., 2023, table 2) and Llama 2 (Touvron et al., 2023b; GQA for 70B)
    "llama-7b": _llama(4096, 11008, 32, 32),
    "llama-13b": _llama(5120, 13824, 40, 40),
    "llama-33b": _llama(6656, 17920, 60, 52),
    "llama-65b": _llama(8192, 22016, 80, 64),
    "llama2-7b": _llama(4096, 11008, 32, 32, context=4096, eps=1e-5),
    "llama2-13b": _llama(5120, 13824, 40, 40, context=4096, eps=1e-5),
    "llama2-70b": _llama(8192, 28672, 80, 64, kv_heads=8, context=4096, eps=1e-5),
    # SmolLM2 model cards (config.json)
    "smollm2-135m": _llama(576, 1536, 30, 9, kv_heads=3, context=8192, eps=1e-5, vocab=49152, tied=True, head_dim=64),
    "smollm2-360m": _llama(960, 2560, 32, 15, kv_heads=5, context=8192, eps=1e-5, vocab=49152, tied=True, head_dim=64),
    "smollm2-1.7b": _llama(2048, 8192, 24, 32, context=8192, eps=1e-5, vocab=49152, tied=True, head_dim=64),
}
"""Configurations of known architectures (public model cards), by name."""
ALIASES = {"llama-30b": "llama-33b", "llama2-7b-hf": "llama2-7b", "smollm2-135m-instruct": "smollm2-135m"}


# -- the base model ---------------------------------------------------------------------------------
def load_config(base: str) -> Any:
    """The transformers configuration of ``base`` (never downloads anything)."""
    from transformers import AutoConfig, LlamaConfig

    from deltatune.model import loading as models

    name = ALIASES.get(base, base)
    if base in models.TINY_MODELS:
        return models.tiny_llama(tie_word_embeddings=base == "tiny-llama-tied").config
    if name in ARCHITECTURES:
        settings = dict(ARCHITECTURES[name])
        settings.pop("model_type")
        return LlamaConfig(**settings)
    path = Path(base).expanduser()
    if path.is_dir():
        return AutoConfig.from_pretrained(path, local_files_only=True)
    if path.suffix == ".json" and path.is_file():
        data = json.loads(path.read_text())
        if "model_type" not in data:
            raise ConfigError(f"{path} has no model_type; it is not a transformers config.json")
        return AutoConfig.for_model(**data)
    known = ", ".join([*models.TINY_MODELS, models.DEFAULT_MODEL, *ARCHITECTURES])
    raise ConfigError(f"--base '{base}' is not a known architecture ({known}), a local model folder or a config.json")


def meta_model(config: Any) -> Any:
    """The causal LM of ``config`` on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# -- what trains, what is quantized ---------------------------------------------------------------
@dataclass
class Layout:
    """Parameters of the model as a run builds it, grouped by how they are held."""

    total: int = 0
    trainable: int = 0
    quantized: int = 0
    frozen: int = 0
    largest_trainable: int = 0
    largest_quantized: tuple[int, int] = (0, 0)
    factored_state: int = 0
    """AdaLomo-style state: rows + columns of each trained matrix, elements of each trained vector."""
    adapted: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per linear-layer suffix (q_proj, …) of the first decoder layer: input width and rank of its delta."""
    quantized_in_layer: dict[str, int] = field(default_factory=dict)
    """Quantized linear layers of the first decoder layer: suffix → input width."""
    trainable_embeddings: bool = False
    trainable_head: bool = False
    groups: dict[str, Group] | None = None
    """The first decoder layer's linear-layer groups when the fast path runs the model."""
    compute_copies: int = 0
    """Elements of the compute-dtype copies of trained weights the fast path's grouped products keep."""
    trains_base: bool = False
    """A trained tensor belongs to the base model (BitFit's biases, full fine-tuning)."""


def _bits_per_weight(quantizer: Any) -> float:
    """Storage bits per quantized weight (scales included) of a resolved quantizer."""
    declared = quantizer.optional("bits_per_weight")
    if declared is not None:
        return float(declared(quantizer.cfg))
    if quantizer.name == "nf4":
        block = int(getattr(quantizer.cfg, "blocksize", 64))
        if getattr(quantizer.cfg, "double_quant", True):
            return 4 + 8 / block + 32 / (block * 256)
        return 4 + 32 / block
    raise ConfigError(f"the estimator does not know quantizer '{quantizer.name}'; give it a "
                      "bits_per_weight(cfg) method (see docs/plugin-authoring.md)")


def _quantized_names(model: Any, quantizer: Any) -> set[str]:
    """Names of the linear layers ``quantizer`` would replace (its ``targets``/``skip`` when it has
    them; all linear layers but the LM head otherwise; never a tied layer)."""
    from collections import Counter

    from torch import nn

    from deltatune.deltas.targets import output_layer_names, target_matches

    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    heads = output_layer_names(model)
    targets = getattr(quantizer.cfg, "targets", "all-linear")
    skip = list(getattr(quantizer.cfg, "skip", []) or [])
    chosen = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not name or uses[id(module.weight)] > 1:
            continue
        if targets == "all-linear" or targets == ["all-linear"]:
            wanted = name not in heads
        else:
            wanted = any(target_matches(name, t) for t in targets)
        if wanted and not any(target_matches(name, s) for s in skip):
            chosen.add(name)
    return chosen


def layout(config: Any, deltas: list[Any], quantizer: Any | None, fast_path: bool = True) -> Layout:
    """Count parameters of ``config`` with ``deltas`` applied on the meta device, and describe what
    its decoder layers keep for backward (``fast_path``: as the model's fast training forward,
    :mod:`deltatune.train.fast`, runs them)."""
    import torch

    from deltatune.deltas.layer import DeltaLinear
    from deltatune.model.assembly import ResolvedSpec, claim_parameters

    model = meta_model(config)
    quantized = _quantized_names(model, quantizer) if quantizer else set()
    quantized_weights = {f"{name}.weight" for name in quantized}
    with torch.device("meta"):
        for delta in deltas:
            delta.plugin.apply(model, delta.cfg)
    # the base weight of a wrapped layer moved under .base_layer
    moved = {n.replace(".weight", ".base_layer.weight") for n in quantized_weights}
    quantized_weights |= moved
    resolved = ResolvedSpec(spec=None, quantizer=quantizer, deltas=list(deltas))  # type: ignore[arg-type]
    claim_parameters(model, resolved)
    out = Layout()
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    for name, param in model.named_parameters():
        count = param.numel()
        out.total += count
        if param.requires_grad:
            out.trainable += count
            out.largest_trainable = max(out.largest_trainable, count)
            out.factored_state += sum(param.shape) if param.ndim >= 2 else count
            out.trainable_embeddings |= param is getattr(embeddings, "weight", None)
            out.trainable_head |= param is getattr(head, "weight", None)
            out.trains_base |= ".deltas." not in name
        elif name in quantized_weights:
            out.quantized += count
            if count > out.largest_quantized[0] * out.largest_quantized[1]:
                out.largest_quantized = tuple(param.shape)  # type: ignore[assignment]
        else:
            out.frozen += count
    layer_prefix = _first_layer_prefix(model)
    for name in quantized:
        if name.startswith(layer_prefix):
            out.quantized_in_layer[name[len(layer_prefix):]] = model.get_submodule(name).in_features
    for name, module in model.named_modules():
        if not name.startswith(layer_prefix):
            continue
        suffix = name[len(layer_prefix):]
        if isinstance(module, DeltaLinear) and module.deltas:
            kept = [_delta_keeps(d, module.in_features, module.out_features) for d in module.deltas.values()]
            dropout = any(_has_dropout(d) for d in module.deltas.values())
            out.adapted[suffix] = {"in": module.in_features, "out": module.out_features,
                                   "r": sum(extra for _, extra in kept), "dropout": dropout,
                                   "input": any(saves for saves, _ in kept)}
        elif hasattr(module, "weight") and getattr(module.weight, "requires_grad", False) and module.weight.ndim == 2:
            out.adapted[suffix] = {"in": module.weight.shape[1], "out": module.weight.shape[0], "r": 0,
                                   "dropout": False, "input": True}
    from deltatune.train.fast import fast_forward

    if fast_path and fast_forward(model) is not None:
        out.groups = _groups(model, quantized)
        if out.groups is not None:
            per_layer = sum(g.compute_copies for g in out.groups.values() if g.fused)
            out.compute_copies = per_layer * config.num_hidden_layers
    return out


def _first_layer_prefix(model: Any) -> str:
    layers = model.get_decoder().layers
    first = layers[0]
    return next(name for name, module in model.named_modules() if module is first) + "."


def _rank_of(delta: Any) -> int:
    """The inner width of a low-rank delta (LoRA/DoRA ``lora_A``, VeRA's vector ``d``), else 0."""
    lora_a = getattr(delta, "lora_A", None)
    if lora_a is not None and hasattr(lora_a, "weight"):
        return int(lora_a.weight.shape[0])
    for name in ("vera_lambda_d", "lambda_d", "d"):
        value = getattr(delta, name, None)
        if value is not None and hasattr(value, "numel"):
            return int(value.numel())
    return 0


def _has_dropout(delta: Any) -> bool:
    from torch import nn

    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in delta.modules())


def _delta_keeps(delta: Any, in_features: int, out_features: int) -> tuple[bool, int]:
    """What a delta makes autograd keep, per token: ``(the layer input, further elements)``.

    A trained matrix or vector applied to the input (LoRA's A, a feedforward IA3 vector) keeps the
    input; a low-rank inner product keeps its ``r`` elements (LoRA's A output, VeRA's scaled
    projection); a trained vector on the output (DoRA's magnitude, VeRA's b, IA3's output scale)
    keeps what it multiplies, ``out`` elements.
    """
    trained = [p for p in delta.parameters() if p.requires_grad]
    on_input = any((p.ndim >= 2 and p.shape[-1] == in_features and min(p.shape) > 1) or p.numel() == in_features
                   for p in trained)
    on_output = any(p.numel() == out_features for p in trained)
    return on_input, _rank_of(delta) + (out_features if on_output else 0)


# -- activations ----------------------------------------------------------------------------------
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qkv", ("q_proj", "k_proj", "v_proj")), ("o", ("o_proj",)), ("gate_up", ("gate_proj", "up_proj")),
    ("down", ("down_proj",)),
)
"""Linear layers of a Llama decoder layer that read the same input, in forward order."""


@dataclass
class Group:
    """What one group of linear layers (of the first decoder layer) makes autograd keep."""

    in_features: int
    out_features: int
    fused: bool = True
    """The fast path computes it as one grouped product (:mod:`deltatune.deltas.grouped`)."""
    grouped_kept: int = 0
    """Elements per token the grouped product keeps for backward (its input included)."""
    compute_copies: int = 0
    """Elements the grouped product holds in the compute dtype between steps."""
    trains: bool = False
    keeps_input: bool = False
    extra: int = 0
    dropout_copies: int = 0
    weight_copies: int = 0
    """Elements of trained base weights cast to the compute dtype (autocast keeps the copy)."""
    delta_copies: int = 0
    """Elements of trained delta weights; an unfused group casts them under autocast (kept for backward)."""


def _groups(model: Any, quantized: set[str]) -> dict[str, Group] | None:
    """The groups of the first decoder layer of ``model`` (after deltas), or ``None`` when the
    decoder is not Llama-shaped."""
    from deltatune.deltas.grouped import Projection, grouped_product_class
    from deltatune.deltas.layer import DeltaLinear

    decoder = model.get_decoder()
    first = decoder.layers[0]
    prefix = next(name for name, module in model.named_modules() if module is first) + "."
    out: dict[str, Group] = {}
    for key, members in GROUPS:
        modules = []
        for member in members:
            parent = first.self_attn if member.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else first.mlp
            module = getattr(parent, member, None)
            if module is None:
                return None
            modules.append(module)
        group = Group(in_features=modules[0].in_features, out_features=sum(m.out_features for m in modules))
        projections = [None if prefix + ("self_attn." if parent_of(name) == "attn" else "mlp.") + name in quantized
                       else Projection.of(module) for name, module in zip(members, modules)]
        product = grouped_product_class(projections) if all(p is not None for p in projections) else None
        group.fused = product is not None
        if product is not None:
            group.grouped_kept = product.kept_per_token(projections)
            group.compute_copies = product.compute_copies(projections)
        for module in modules:
            base = module.base_layer if isinstance(module, DeltaLinear) else module
            if base.weight.requires_grad:
                group.trains = group.keeps_input = True
                group.weight_copies += base.weight.numel()
            if isinstance(module, DeltaLinear):
                for key_, delta in module.deltas.items():
                    saves_input, extra = _delta_keeps(delta, module.in_features, module.out_features)
                    trained = any(p.requires_grad for p in delta.parameters())
                    group.delta_copies += sum(p.numel() for p in delta.parameters() if p.requires_grad)
                    dropout = _has_dropout(delta)
                    group.trains |= trained
                    group.keeps_input |= saves_input and not dropout  # dropout keeps its own copy
                    group.extra += extra
                    group.dropout_copies += int(dropout)
        out[key] = group
    return out


def parent_of(member: str) -> str:
    """``attn`` for the attention projections, ``mlp`` for the others."""
    return "attn" if member in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


def _widths(config: Any) -> tuple[int, int, int, int, int, int]:
    """``(hidden, intermediate, heads, head_dim, query width, key/value width)`` of a decoder."""
    h, i = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    return h, i, heads, head_dim, heads * head_dim, kv


def activation_bytes(config: Any, lay: Layout, batch: int, seq: int, compute: int,
                     checkpointing: bool = False, labelled: float = 1.0,
                     quantized_saves_input: bool = False) -> dict[str, float]:
    """Bytes autograd keeps for backward for one micro-batch of ``batch`` rows of ``seq`` tokens.

    Per decoder layer and token, with ``c`` the compute dtype's bytes (2 for bf16, 4 for fp32),
    ``h`` hidden, ``i`` intermediate, ``q``/``kv`` the query and key/value widths, ``H`` heads and
    ``W`` the sequence length, on deltatune's fast path (:mod:`deltatune.train.fast.llama`: Llama decoders):

    * each RMSNorm keeps its input and 1/rms: ``c h + 4`` (twice);
    * each group of linear layers sharing an input (q/k/v, o, gate/up, down) keeps what its grouped
      product says (:meth:`deltatune.deltas.grouped.GroupedProduct.kept_per_token`): LoRA's keeps the
      input (``c h``, ``c q``, ``c h``, ``c i``) and its ``A`` output (``c r``), frozen bases alone nothing;
    * attention keeps q, k, v and the softmax probabilities: ``c (q + 2 kv) + c H W`` per row of its
      ``(examples x width)`` layout (width rounded up, as the token rows are: :class:`TokenLayout`);
    * the SiLU gate keeps gate and up: ``2 c i``.

    A group the fast path does not run as a grouped product (a quantized base, dropout, DoRA/VeRA, several deltas, a
    trained weight) runs its modules under autocast: it keeps its input only when a delta or a
    trained weight needs it, what each delta keeps (:func:`_delta_keeps`), a dropped copy and a
    scaled noise mask per dropout (``2 c in``), and the compute-dtype copy of a trained weight. With
    ``quantized_saves_input`` (older bitsandbytes, e.g. 0.41 of the 2023 published runs, kept the
    input of every 4-bit matmul; 0.50 keeps only the packed weight), a quantized group keeps its input.

    Nothing is kept before the first trained tensor of the first layer. The head keeps the final
    norm's input and the gradient of the hidden states of every labelled token (``2 c h + 4``; the
    chunked cross-entropy keeps no logits). With gradient checkpointing each layer keeps only its
    input (``c h``) and one layer is recomputed at a time. Off the fast path (another architecture),
    :func:`plain_activation_bytes` applies.
    """
    if lay.groups is None:
        return plain_activation_bytes(config, lay, batch, seq, compute, checkpointing, labelled)
    from deltatune.train.fast.tokens import SHAPE_STEPS
    from deltatune.train.head_loss import HEAD_ROW_STEP, round_up

    h, i, heads, head_dim, q, kv = _widths(config)
    # the fast path rounds its shapes up (deltatune.train.fast.tokens.TokenLayout): token rows, attention
    # width (one example per row here), and the head's labelled rows
    tokens_step, width_step = SHAPE_STEPS
    tokens = round_up(batch * seq, tokens_step)
    width = round_up(seq, width_step)
    attention_rows = batch * width
    labelled_tokens = round_up(math.ceil(batch * seq * labelled), HEAD_ROW_STEP)

    def group_bytes(group: Group, grad: bool) -> float:
        if group.fused:
            return compute * group.grouped_kept
        # dropout keeps its scaled noise (when its input needs a gradient) and the dropped copy
        kept = compute * group.extra + group.dropout_copies * compute * group.in_features * (2 if grad else 1)
        if group.keeps_input or quantized_saves_input:
            kept += compute * group.in_features
        copies = group.weight_copies + (0 if group.fused else group.delta_copies)
        return kept + (compute * copies / tokens if compute != 4 else 0)

    def layer(grad: bool) -> tuple[float, bool]:
        kept = 0.0
        groups = lay.groups
        kept += (compute * h + 4) if grad else 0  # input norm
        for key in ("qkv", "attention", "o", "norm", "gate_up", "silu", "down"):
            if key == "attention":
                kept += compute * (q + 2 * kv + heads * width) * attention_rows / tokens if grad else 0
            elif key == "norm":
                kept += (compute * h + 4) if grad else 0
            elif key == "silu":
                kept += 2 * compute * i if grad else 0
            else:
                group = groups[key]
                if grad or group.trains:
                    kept += group_bytes(group, grad)
                grad = grad or group.trains
        return kept, grad

    first, grad = layer(lay.trainable_embeddings)
    steady, _ = layer(True) if grad else (0.0, False)
    layers = config.num_hidden_layers
    if checkpointing:
        kept_layers = (layers * compute * h + max(first, steady)) * tokens
    else:
        kept_layers = (first + (layers - 1) * steady) * tokens
    head = 0.0
    if grad or lay.trainable_head:
        head = tokens + labelled_tokens * (2 * compute * h + 4)
    if lay.trainable_head:
        head += 4 * config.vocab_size * h
    rope = 2 * tokens * head_dim * compute
    return {"per_layer_per_token": steady, "layers": kept_layers, "head": head + rope,
            "total": kept_layers + head + rope}


def plain_activation_bytes(config: Any, lay: Layout, batch: int, seq: int, compute: int,
                           checkpointing: bool = False, labelled: float = 1.0) -> dict[str, float]:
    """Activations of the plain Hugging Face forward (architectures the fast path does not know).

    Per layer and token: two fp32 RMSNorm inputs and 1/rms ``2 (4h + 4)``; SDPA attention's q, k, v,
    output and log-sum-exp ``c (2q + 2kv) + 4H``; the MLP's gate, silu(gate) and up ``3 c i``; the
    input of every group of linear layers (:data:`GROUPS`, layers reading one input share it) in
    which a delta or a weight trains, and each delta's inner ``r`` elements. The head keeps the
    final hidden state of every labelled token ``c h``; under bf16 autocast every trained tensor is
    cast once and its copy kept."""
    h, i, heads, head_dim, q, kv = _widths(config)
    tokens = batch * seq
    per_layer = 2 * (4 * h + 4) + compute * (2 * q + 2 * kv) + 4 * heads + 3 * compute * i
    for _, members in GROUPS:
        adapted = [lay.adapted[m] for m in lay.adapted if m.rsplit(".", 1)[-1] in members]
        if any(a["input"] for a in adapted):
            per_layer += compute * adapted[0]["in"]
        per_layer += sum(compute * a["r"] for a in adapted)
    if checkpointing:
        kept = config.num_hidden_layers * compute * h * tokens + per_layer * tokens
    else:
        kept = config.num_hidden_layers * per_layer * tokens
    head = tokens * labelled * compute * h
    copies = lay.trainable * compute if compute != 4 else 0
    return {"per_layer_per_token": per_layer, "layers": kept, "head": head + copies,
            "total": kept + head + copies}


# -- the estimate ---------------------------------------------------------------------------------
@dataclass
class Estimate:
    """Parameter counts and bytes per device of one run configuration."""

    base: str
    devices: int
    device: str
    batch: int
    seq: int
    total_params: int
    trainable_params: int
    quantized_params: int
    weights_quantized: float
    weights_frozen: float
    weights_trainable: float
    gradients: float
    optimizer: float
    activations: float
    transient: float
    ddp_buckets: float
    loading: float
    checkpoint: float
    """CPU only: resident memory while Lightning serializes the last checkpoint (0 on a GPU)."""
    runtime: float
    training: float
    peak: float
    notes: list[str] = field(default_factory=list)

    @property
    def weights(self) -> float:
        """All weight bytes."""
        return self.weights_quantized + self.weights_frozen + self.weights_trainable

    def as_dict(self) -> dict[str, Any]:
        """Every field (bytes as numbers), for ``--json``."""
        return {**asdict(self), "weights": self.weights}


def _dtype_bytes(name: str, device: str) -> int:
    if name == "fp32":
        return 4
    if name == "bf16":
        return 2
    if device == "cuda":
        return 2
    from deltatune.model.assembly import cpu_supports_bf16

    return 2 if cpu_supports_bf16() else 4


def _checkpoint_dtype_bytes(config: Any) -> int:
    """Bytes per weight of the model's safetensors files (the config's ``dtype``; fp32 if unknown)."""
    import torch

    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 4


def _optimizer_bytes(optimizer: Any, lay: Layout, param_bytes: int) -> tuple[float, bool, str]:
    """``(state bytes, updates in backward, note)`` of a resolved optimizer."""
    in_backward = optimizer.optional("updates_in_backward")
    declared = optimizer.optional("state_bytes_per_param")
    if declared is not None:
        return float(declared(optimizer.cfg)) * lay.trainable, in_backward, ""
    name = optimizer.name
    if name in ("adamw", "adam"):
        return 2.0 * param_bytes * lay.trainable, in_backward, ""
    if name == "lomo":
        return 0.0, True, ""
    if name == "adalomo":
        return 4.0 * lay.factored_state, True, ""
    return 2.0 * param_bytes * lay.trainable, in_backward, (
        f"optimizer '{name}' declares no state_bytes_per_param; assumed two moments like AdamW")


def estimate(
    base: str,
    delta: list[Any] | None = None,
    quantizer: Any = None,
    optimizer: Any = "adamw",
    batch: int = 1,
    seq: int = 512,
    devices: int = 1,
    device: str = "cpu",
    gradient_checkpointing: bool = False,
    base_dtype: str = "auto",
    trainable_dtype: str = "fp32",
    labelled: float = 1.0,
    quantized_saves_input: bool = False,
    fast_path: bool = True,
    manager: Any = None,
) -> Estimate:
    """Estimate parameters and peak memory per device of a run (see the module docstring)."""
    from deltatune.plugin.resolve import coerce_ref, resolve
    from deltatune.io.export import resolve_with_peft_init
    from deltatune.train.head_loss import loss_chunk_rows

    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda, not {device!r}")
    if min(batch, seq, devices) < 1 or not 0 < labelled <= 1:
        raise ConfigError("batch, seq and devices must be positive and labelled in (0, 1]")
    resolved = resolve_with_peft_init({"base": base, "delta": delta or [], "quantizer": quantizer,
                                       "base_dtype": base_dtype, "trainable_dtype": trainable_dtype}, manager)
    opt = resolve("optimizer", coerce_ref(optimizer), manager)
    config = load_config(base)
    lay = layout(config, resolved.deltas, resolved.quantizer, fast_path)
    trained = 4 if trainable_dtype == "fp32" else 2
    frozen_bytes = _dtype_bytes(base_dtype, device)
    # the core computes in the frozen base's dtype; with nothing frozen (full fine-tuning) in the
    # trained weights' dtype
    compute = frozen_bytes if lay.frozen or lay.quantized else trained
    bits = _bits_per_weight(resolved.quantizer) if resolved.quantizer else 16
    notes: list[str] = []

    weights_quantized = lay.quantized * bits / 8
    weights_frozen = lay.frozen * frozen_bytes
    weights_trainable = lay.trainable * trained + lay.compute_copies * compute
    state, in_backward, note = _optimizer_bytes(opt, lay, trained)
    if note:
        notes.append(note)
    gradients = (lay.largest_trainable if in_backward else lay.trainable) * trained
    ddp_buckets = lay.trainable * trained if devices > 1 and not in_backward else 0.0
    acts = activation_bytes(config, lay, batch, seq, compute, gradient_checkpointing, labelled,
                            quantized_saves_input and resolved.quantizer is not None)
    tokens = batch * seq
    heads = config.num_attention_heads
    # one chunk of logits of the chunked cross-entropy (fp32, its compute-dtype copy, its gradient)
    rows = loss_chunk_rows(config.vocab_size)
    logits = min(tokens * labelled, rows) * config.vocab_size * (4 + compute + 4)
    # attention of one layer in backward: fp32 score gradients and probabilities, per example
    attention = batch * heads * seq * seq * (4 + 4 + compute)
    dequantized = math.prod(lay.largest_quantized) * compute if resolved.quantizer else 0
    # the backward of one layer: the gradient of the residual stream and of the widest activation
    layer_backward = tokens * compute * (2 * config.hidden_size + 3 * config.intermediate_size)
    recompute = acts["per_layer_per_token"] * tokens if gradient_checkpointing else 0
    transient = max(logits, attention, dequantized) + layer_backward + recompute
    training = (weights_quantized + weights_frozen + weights_trainable + gradients + state
                + acts["total"] + transient + ddp_buckets)
    # deltatune loads a LoRA-style base straight in its compute dtype; it loads fp32 for a quantizer
    # (which reads fp32 weights) and for full fine-tuning; methods that train base tensors (BitFit)
    # start from fp32 after a compute-dtype load
    direct = frozen_bytes < 4 and resolved.deltas and not resolved.quantizer
    trains_base = lay.trains_base
    loaded = frozen_bytes if direct else 4
    loading = (loaded + (4 if direct and trains_base else 0)) * lay.total
    runtime = CPU_RUNTIME_BYTES if device == "cpu" else 0.0
    checkpoint = 0.0
    if device == "cpu":
        # the safetensors file is mapped into the process: loading in another dtype reads (and keeps
        # resident while it converts) every page of it besides the converted copy
        stored = _checkpoint_dtype_bytes(config)
        if stored != loaded:
            loading += stored * lay.total
        # glibc keeps the heap the activations grew (CPU_HEAP_RETAINED) ...
        heap = CPU_HEAP_RETAINED * acts["total"]
        training += heap
        # ... and Lightning's checkpoint at the end of training (save_last) serializes the trained
        # tensors and the optimizer state into memory (an io.BytesIO) before writing the file
        steady = (weights_quantized + weights_frozen + weights_trainable + state + ddp_buckets
                  + (0 if in_backward else gradients) + acts["total"] + heap)
        checkpoint = steady + lay.trainable * trained + state
    if loading > training:
        notes.append(f"loading peaks above training: deltatune loads the base at {loaded} bytes per parameter"
                     f"{' (fp32 before quantizing)' if resolved.quantizer else ''} before it casts or quantizes it")
    if checkpoint > max(training, loading):
        notes.append("the checkpoint Lightning writes after training (trained tensors and optimizer state, "
                     "serialized in memory) peaks above training on the CPU")
    if device == "cuda":
        notes.append("GPU bytes are torch.cuda.max_memory_allocated; the CUDA context (~0.5 GB) comes on top")
    return Estimate(
        base=base, devices=devices, device=device, batch=batch, seq=seq,
        total_params=lay.total, trainable_params=lay.trainable, quantized_params=lay.quantized,
        weights_quantized=weights_quantized, weights_frozen=weights_frozen, weights_trainable=weights_trainable,
        gradients=gradients, optimizer=state, activations=acts["total"], transient=transient,
        ddp_buckets=ddp_buckets, loading=loading, checkpoint=checkpoint, runtime=runtime, training=training,
        peak=max(loading, training, checkpoint) + runtime, notes=notes,
    )


# -- measuring real runs --------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """A short ``deltatune fit`` whose peak resident memory is measured in a fresh process."""

    name: str
    base: str
    delta: tuple[dict[str, Any], ...] = ({"name": "lora", "config": {"r": 8, "targets": "all-linear"}},)
    quantizer: dict[str, Any] | None = None
    batch: int = 4
    seq: int = 128
    steps: int = 2
    base_dtype: str = "auto"
    optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "adamw", "config": {"lr": 1e-3}})

    def estimate(self) -> Estimate:
        """The estimate of this run on this machine's CPU."""
        # the text builder labels every token of a row but the first (next-token prediction)
        return estimate(self.base, list(self.delta), self.quantizer, self.optimizer, self.batch, self.seq, 1,
                        "cpu", base_dtype=self.base_dtype, labelled=(self.seq - 1) / self.seq)


_LORA16 = ({"name": "lora", "config": {"r": 16, "targets": "all-linear"}},)
VALIDATION_RUNS = (
    Run("LoRA r=16 all-linear, bf16 base, AdamW, 4 x 256", "smollm2-135m-instruct", delta=_LORA16, seq=256),
    Run("QLoRA: NF4-DQ + LoRA r=16 all-linear, AdamW, 4 x 256", "smollm2-135m-instruct", delta=_LORA16,
        quantizer={"name": "nf4"}, seq=256),
    Run("full fine-tune, fp32, AdamW, 2 x 128", "smollm2-135m-instruct", delta=(), batch=2),
    Run("full fine-tune, fp32, LOMO, 2 x 128", "smollm2-135m-instruct", delta=(), batch=2,
        optimizer={"name": "lomo", "config": {"lr": 1e-2}}),
)
"""SmolLM2-135M runs whose measured peaks ``tests/test_estimate.py`` and ``docs/scale-out.md`` compare
the estimator with (``python -m deltatune.estimate.memory`` prints the table)."""

_DRIVER = """
import sys
from deltatune.cli.main import main
code = main(["fit", "--config", sys.argv[1]])
status = open("/proc/self/status").read().split("\\n")
peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
print(f"VmHWM {peak}")
sys.exit(code)
"""


def _text(words: int, seed: int = 0) -> str:
    """Deterministic English-like text for the ``text`` builder."""
    import random

    vocabulary = ("the quick brown fox jumps over a lazy dog while seven wizards quietly mix bright potions "
                  "in old copper kettles near the river bank under grey autumn skies").split()
    rng = random.Random(seed)
    return " ".join(rng.choice(vocabulary) for _ in range(words)) + "\n"


def run_config(run: Run, folder: Path) -> Path:
    """Write the data and the YAML of ``run`` under ``folder``; return the YAML."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "train.txt"
    rows = run.batch * (run.steps + 2)  # every row exactly seq tokens (byte-level: more words than needed)
    data.write_text(_text(rows * run.seq))
    config = {
        "seed_everything": 0,
        "model": {"base": run.base, "base_dtype": run.base_dtype, "delta": list(run.delta),
                  "quantizer": run.quantizer, "optimizer": run.optimizer,
                  "compare_base": False, "samples": 0},
        "data": {"builder": {"name": "text", "config": {"path": str(data), "max_length": run.seq,
                                                        "drop_last": True, "limit": rows}},
                 "batch_size": run.batch, "eval_batch_size": run.batch, "val_fraction": 0.1},
        "trainer": {"max_steps": run.steps, "accelerator": "cpu", "devices": 1, "logger": False,
                    "default_root_dir": str(folder / "run")},
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def measure(run: Run, folder: Path, timeout: float = 600) -> int:
    """Peak resident memory (``VmHWM``, bytes) of ``deltatune fit`` on ``run`` in a fresh process."""
    import os
    import subprocess
    import sys

    config = run_config(run, folder)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", _DRIVER, str(config)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    found = [line for line in done.stdout.splitlines() if line.startswith("VmHWM ")]
    if done.returncode != 0 or not found:
        raise RuntimeError(f"run '{run.name}' failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return int(found[-1].split()[1])


# -- command line ---------------------------------------------------------------------------------
def _plugin_ref(text: str) -> Any:
    """``lora`` or a YAML/JSON mapping ``{name: lora, config: {r: 16}}``."""
    import yaml

    value = yaml.safe_load(text)
    return value if isinstance(value, (str, dict)) else text


def _size(value: float) -> str:
    return f"{value / GIB:,.2f} GiB" if value >= GIB else f"{value / MIB:,.1f} MiB"


def print_estimate(result: Estimate) -> None:
    """A table of the estimate."""
    from deltatune.ui.console import console, print_table

    share = 100 * result.trainable_params / max(result.total_params, 1)
    rows = [
        ["parameters", f"{result.total_params:,}", f"{result.trainable_params:,} trainable ({share:.3f} %)"],
        ["weights: quantized", _size(result.weights_quantized), f"{result.quantized_params:,} parameters"],
        ["weights: frozen", _size(result.weights_frozen), ""],
        ["weights: trained", _size(result.weights_trainable), ""],
        ["gradients", _size(result.gradients), ""],
        ["optimizer state", _size(result.optimizer), ""],
        ["activations", _size(result.activations), f"batch {result.batch} x seq {result.seq}"],
        ["transient", _size(result.transient), "logit chunk / dequantized weight / recomputed layer"],
        ["DDP buckets", _size(result.ddp_buckets), f"{result.devices} device(s)"],
        ["training", _size(result.training), ""],
        ["loading", _size(result.loading), "base as loaded, before cast/quantize"],
        ["checkpoint", _size(result.checkpoint), "CPU: resident while the last checkpoint is serialized"],
        ["runtime", _size(result.runtime), "CPU process (Python, PyTorch, Lightning)" if result.device == "cpu" else ""],
        ["peak per device", _size(result.peak), f"{result.peak / GB:,.2f} GB"],
    ]
    print_table(f"estimate: {result.base} on {result.devices} x {result.device}", ["", "bytes", "note"], rows)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)


def cmd_estimate(args: argparse.Namespace) -> None:
    """``deltatune estimate``."""
    result = estimate(
        base=args.base, delta=[_plugin_ref(d) for d in args.delta], quantizer=_plugin_ref(args.quantizer)
        if args.quantizer else None, optimizer=_plugin_ref(args.optimizer), batch=args.batch, seq=args.seq,
        devices=args.devices, device=args.device, gradient_checkpointing=args.gradient_checkpointing,
        base_dtype=args.base_dtype, trainable_dtype=args.trainable_dtype, labelled=args.labelled,
        quantized_saves_input=args.quantized_saves_input,
    )
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print_estimate(result)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``estimate`` to the ``deltatune`` command's subparsers."""
    parser = sub.add_parser("estimate", help="parameter counts and peak memory per device of a run, before running it")
    parser.add_argument("--base", required=True, help="built-in name, known architecture (llama-7b …), HF folder or config.json")
    parser.add_argument("--delta", action="append", default=[], help="delta method: a name or '{name: lora, config: {r: 16}}' (repeatable)")
    parser.add_argument("--quantizer", help="quantizer: a name or '{name: nf4, config: {double_quant: true}}'")
    parser.add_argument("--optimizer", default="adamw", help="optimizer: a name or a mapping (default adamw)")
    parser.add_argument("--batch", type=int, default=1, help="micro-batch per device (data.batch_size)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--devices", type=int, default=1, help="processes (DDP replicates the model on each)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--base-dtype", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--trainable-dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--labelled", type=float, default=1.0, help="fraction of tokens that carry a label (the loss)")
    parser.add_argument("--quantized-saves-input", action="store_true",
                        help="4-bit layers keep their input for backward (older bitsandbytes, e.g. 0.41 of 2023 runs)")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON (bytes)")
    parser.set_defaults(func=cmd_estimate)


def validation_table(folder: Path) -> str:
    """Measure every run of :data:`VALIDATION_RUNS` and return a markdown table against the estimates."""
    import platform

    import torch

    lines = [
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"runtime overhead in the estimate: {CPU_RUNTIME_BYTES / MIB:.0f} MiB.",
        "",
        "| run | estimated peak | measured peak (VmHWM) | error | of which activations | loading |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for index, run in enumerate(VALIDATION_RUNS):
        predicted = run.estimate()
        measured = measure(run, folder / f"run{index}")
        error = (predicted.peak - measured) / measured
        lines.append(f"| {run.name} | {predicted.peak / MIB:,.0f} MiB | {measured / MIB:,.0f} MiB | {error:+.1%} | "
                     f"{predicted.activations / MIB:,.0f} MiB | {predicted.loading / MIB:,.0f} MiB |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m deltatune.estimate.memory: measure this machine (docs/scale-out.md)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(validation_table(Path(tmp)))
