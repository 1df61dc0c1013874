"""``deltatune estimate``: parameters and peak memory per device, before buying hardware.

This module adds the bytes up; :mod:`deltatune.estimate.counting` counts the parameters,
:mod:`deltatune.estimate.activations` models what autograd keeps, :mod:`deltatune.cli.estimate` is
the command and ``benchmarks/estimate_accuracy.py`` measures real runs against it.

::

    deltatune estimate --base llama-65b --quantizer '{name: nf4, config: {double_quant: true}}' \\
        --delta '{name: lora, config: {r: 64, targets: all-linear}}' --trainable_dtype bf16 \\
        --batch 1 --seq 512 --gradient_checkpointing --device cuda

**Parameters** are counted exactly: the base model is built from its configuration on PyTorch's
``meta`` device (shapes, no memory), the delta methods' own ``apply`` runs on it, and the core's
:func:`deltatune.model.assembly.claim_parameters` decides what trains — so every installed delta method,
third-party ones included, is counted as it really behaves. ``--base`` is a built-in model name, a
known architecture (:data:`ARCHITECTURES`: ``llama-7b`` … ``llama-65b``, ``llama2-70b``, SmolLM2,
``mixtral-8x7b``, ``qwen3-30b-a3b``;
configurations stored here, nothing is downloaded), a local Hugging Face folder or a ``config.json``.

**Bytes** per device (DDP replicates everything; ``--batch`` is the per-device micro-batch):

* weights: the layers the quantizer replaces (its ``layers_to_quantize``) at its ``bits_per_weight``,
  other frozen weights in the base dtype
  (``auto``: bf16 where the hardware has it), trained weights in ``--trainable_dtype``;
* gradients of the trained weights (one parameter's worth for optimizers that update inside backward);
* optimizer state: what the optimizer declares per trained tensor (``state_bytes_per_param``; two
  moments per element in the parameter dtype when it declares nothing, with a note);
* activations kept for backward (:func:`activation_bytes`: a per-layer, per-token model of the decoder
  as deltatune runs it — where the fast training forward of the model's family runs it, the terms the
  family declares (``activation_terms``: the Llama family's grouped low-rank products, hand-written norm,
  attention and SiLU backward, and a chunked cross-entropy that keeps no logits), else the plain
  forward's — checked against the tensors autograd really keeps in ``tests/unit/estimate/test_estimate.py``);
  with gradient checkpointing the layer inputs plus one recomputed layer;
* transients: the largest of one chunk of logits, one layer's attention backward and a dequantized
  weight (for a MoE layer, :func:`expert_transient`: all the expert weights one experts module computes
  with, dequantized or changed by a delta, computed again in backward rather than kept, and their
  gradient when a delta trains through them), plus one layer's backward working set;
* the compute-dtype copies of trained weights the fast path's grouped products keep, and DDP's gradient buckets (one
  more copy of the trained gradients) when ``--devices`` > 1;
* loading: deltatune loads a base under delta layers straight in its compute dtype, but in fp32 when a
  quantizer reads it (4 bytes per parameter before quantizing) or for full fine-tuning;
* on the CPU only: the resident memory of the Python + PyTorch + Lightning process itself
  (:data:`CPU_RUNTIME_BYTES`); the heap glibc keeps around the activations
  (:data:`CPU_HEAP_RETAINED` of them, added to training); the checkpoint Lightning serializes in
  memory after training (trained tensors + optimizer state on top of what stays resident then:
  weights, optimizer state, gradients unless updated inside backward, the activations' heap); and,
  when the base is loaded in another dtype than its safetensors files hold (``config.dtype``), the mapped file.

``peak = max(loading, training, checkpoint) + runtime`` (``checkpoint`` and ``runtime`` are 0 on a
GPU). The numbers are what ``torch.cuda.max_memory_allocated`` reports on a GPU (the CUDA context
comes on top) and the peak resident set (``VmHWM``) on the CPU. ``tests/unit/estimate/test_estimate.py`` compares them with measured peaks of real runs and with published
figures (QLoRA's 65B on one 48 GB GPU; LitGPT's 7B LoRA / NF4 / NF4-DQ table).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from deltatune.errors import ConfigError
from deltatune.estimate.activations import activation_bytes, mlp_width
from deltatune.estimate.counting import Layout, bits_per_weight, layout, load_config

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


def expert_transient(lay: Layout, compute: int) -> int:
    """Bytes of the MoE expert weights one experts module computes with, at their largest (in backward,
    where they are computed again): the weights in the compute dtype (dequantized, or ``W + ΔW``), the
    fp32 weights dequantization produces first, and the dense gradient of the weights through which a
    delta trains (autograd sums the experts' slices into it)."""
    per_element = compute + (4 if lay.experts_quantized else 0) + (compute if lay.experts_trained else 0)
    return lay.expert_weights * per_element


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
        return float(sum(declared(optimizer.cfg, shape, param_bytes) for shape in lay.trainable_shapes)), in_backward, ""
    return 2.0 * param_bytes * lay.trainable, in_backward, (
        f"optimizer '{optimizer.name}' declares no state_bytes_per_param; assumed two moments per element "
        "in the parameter dtype")


def estimate(
    base: str,
    delta: list[Any] | None = None,
    quantizer: Any = None,
    optimizer: Any = None,
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
    """Estimate parameters and peak memory per device of a run (see the module docstring); without
    ``optimizer``, the run's default optimizer."""
    from deltatune.plugin.resolve import coerce_ref, default_name, resolve
    from deltatune.io.peft import resolve_with_peft_init
    from deltatune.train.head_loss import loss_chunk_rows

    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda, not {device!r}")
    if min(batch, seq, devices) < 1 or not 0 < labelled <= 1:
        raise ConfigError("batch, seq and devices must be positive and labelled in (0, 1]")
    resolved = resolve_with_peft_init({"base": base, "delta": delta or [], "quantizer": quantizer,
                                       "base_dtype": base_dtype, "trainable_dtype": trainable_dtype}, manager)
    opt = resolve("optimizer", coerce_ref(optimizer or default_name("optimizer", manager)), manager)
    config = load_config(base)
    lay = layout(config, resolved.deltas, resolved.quantizer, fast_path)
    trained = 4 if trainable_dtype == "fp32" else 2
    frozen_bytes = _dtype_bytes(base_dtype, device)
    # the core computes in the frozen base's dtype; with nothing frozen (full fine-tuning) in the
    # trained weights' dtype
    compute = frozen_bytes if lay.frozen or lay.quantized else trained
    bits = bits_per_weight(resolved.quantizer) if resolved.quantizer else 16
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
                            quantized_saves_input and resolved.quantizer is not None, device=device)
    tokens = batch * seq
    heads = config.num_attention_heads
    # one chunk of logits of the chunked cross-entropy (fp32, its compute-dtype copy, its gradient)
    rows = loss_chunk_rows(config.vocab_size)
    logits = min(tokens * labelled, rows) * config.vocab_size * (4 + compute + 4)
    # attention of one layer in backward: fp32 score gradients and probabilities, per example (or what
    # the family's fast forward says it holds instead)
    attention = acts.get("attention_transient", batch * heads * seq * seq * (4 + 4 + compute))
    dequantized = math.prod(lay.largest_quantized) * compute if resolved.quantizer else 0
    dequantized = max(dequantized, expert_transient(lay, compute))
    # the backward of one layer: the gradient of the residual stream and of the widest activation
    layer_backward = tokens * compute * (2 * config.hidden_size + 3 * mlp_width(config))
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
