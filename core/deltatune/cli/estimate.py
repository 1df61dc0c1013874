"""``deltatune estimate``: the command line of :mod:`deltatune.estimate.memory` (arguments, table)."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deltatune.estimate.memory import Estimate


def _plugin_ref(text: str) -> Any:
    """A plugin name, or a YAML/JSON mapping ``{name: NAME, config: {OPTION: VALUE}}``."""
    import yaml

    value = yaml.safe_load(text)
    return value if isinstance(value, (str, dict)) else text


def _size(value: float) -> str:
    from deltatune.estimate.memory import GIB, MIB

    return f"{value / GIB:,.2f} GiB" if value >= GIB else f"{value / MIB:,.1f} MiB"


def print_estimate(result: Estimate) -> None:
    """A table of the estimate."""
    from deltatune.estimate.memory import GB
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
    from deltatune.estimate.memory import estimate

    result = estimate(
        base=args.base, delta=[_plugin_ref(d) for d in args.delta], quantizer=_plugin_ref(args.quantizer)
        if args.quantizer else None, optimizer=_plugin_ref(args.optimizer) if args.optimizer else None, batch=args.batch, seq=args.seq,
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
    parser.add_argument("--delta", action="append", default=[], help="delta method: a name or '{name: NAME, config: {OPTION: VALUE}}' (repeatable)")
    parser.add_argument("--quantizer", help="quantizer: a name or '{name: NAME, config: {OPTION: VALUE}}'")
    parser.add_argument("--optimizer", help="optimizer: a name or a mapping (default: the installed default optimizer)")
    parser.add_argument("--batch", type=int, default=1, help="micro-batch per device (data.batch_size)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--devices", type=int, default=1, help="processes (DDP replicates the model on each)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the run trains (default: cpu)")
    parser.add_argument("--gradient_checkpointing", "--gradient-checkpointing", action="store_true",
                        help="recompute each layer's activations in backward (model.gradient_checkpointing)")
    parser.add_argument("--base_dtype", "--base-dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="dtype of the frozen base weights (model.base_dtype; default: auto)")
    parser.add_argument("--trainable_dtype", "--trainable-dtype", choices=["fp32", "bf16"], default="fp32",
                        help="dtype of the trained parameters (default: fp32)")
    parser.add_argument("--labelled", type=float, default=1.0, help="fraction of tokens that carry a label (the loss)")
    parser.add_argument("--quantized_saves_input", "--quantized-saves-input", action="store_true",
                        help="4-bit layers keep their input for backward (older bitsandbytes, e.g. 0.41 of 2023 runs)")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON (bytes)")
    parser.set_defaults(func=cmd_estimate)
