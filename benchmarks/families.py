"""Family conformance table: deltatune's training loss against each model's own Hugging Face loss.

For every tiny family model of ``deltatune.testing.families.TINY_FAMILIES`` and every method (full
fine-tuning, LoRA, DoRA, QLoRA = NF4 + LoRA, and LoRA on packed rows) it runs
``deltatune.testing.families.family_conformance`` (fp32, the path ``training_step`` takes) and prints,
per cell, the relative difference of the loss from ``model(**batch, labels=...).loss`` and, in a
second table, the largest relative gradient difference; a third table measures bf16 training
(``bf16_conformance``: LoRA and DoRA with the base in bf16, deltatune's and Hugging Face's own bf16
forward each against the fp32 forward of the same weights). The column ``head only`` is what the
labelled-positions-only head computed before logit transforms were declared: ``hidden @ Wᵀ`` fed to
the cross-entropy as if it were the logits.

Usage::

    python benchmarks/families.py        # prints the three markdown tables (a few minutes on 2 cores)
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from deltatune.data.packing import collate
from deltatune.testing.families import TINY_FAMILIES, bf16_conformance, conformance_rows, family_conformance

LORA = {"name": "lora", "config": {"targets": "all-linear", "r": 4, "alpha": 8}}
METHODS = {
    "full": (None, False),
    "LoRA": ({"delta": [LORA]}, False),
    "DoRA": ({"delta": [{"name": "dora", "config": {"targets": "all-linear", "r": 4, "alpha": 8}}]}, False),
    "QLoRA": ({"quantizer": {"name": "nf4", "config": {"compute_dtype": "fp32"}}, "delta": [LORA]}, False),
    "LoRA packed": ({"delta": [LORA]}, True),
}

BF16_METHODS = {name: METHODS[name] for name in ("LoRA", "DoRA", "LoRA packed")}


@torch.no_grad()
def head_only_difference(family: str) -> float:
    """Relative difference of the loss computed as ``CE(hidden @ Wᵀ)`` from the model's own loss."""
    model = TINY_FAMILIES[family]().eval()
    batch = collate(conformance_rows(), pad_id=0)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    head = F.cross_entropy(model.get_output_embeddings()(hidden[:, :-1][mask]).float(), labels[mask])
    own = model(**batch).loss
    return float((head - own).abs() / own)


def main() -> None:
    warnings.simplefilter("ignore")
    loss_rows, grad_rows = [], []
    for family, factory in TINY_FAMILIES.items():
        results = {name: family_conformance(factory, spec, packed) for name, (spec, packed) in METHODS.items()}
        how = results["full"].head
        loss_rows.append(f"| {family} | {how} | {head_only_difference(family):.1e} | "
                         + " | ".join(f"{r.loss:.1e}" for r in results.values()) + " |")
        grad_rows.append(f"| {family} | " + " | ".join(f"{r.gradient:.1e}" for r in results.values()) + " |")
    names = " | ".join(METHODS)
    print(f"| family | logits | head only | {names} |\n|---|---|---|" + "---|" * len(METHODS))
    print("\n".join(loss_rows))
    print(f"\n| family | {names} |\n|---|" + "---|" * len(METHODS))
    print("\n".join(grad_rows))
    print("\n| family | " + " | ".join(f"{name}: loss | {name}: gradient" for name in BF16_METHODS) + " |")
    print("|---|" + "---|---|" * len(BF16_METHODS))
    for family, factory in TINY_FAMILIES.items():
        cells = []
        for spec, packed in BF16_METHODS.values():
            r = bf16_conformance(factory, spec, packed)
            cells += [f"{r.loss:.1e} ({r.hf_loss:.1e})", f"{r.gradient:.1e} ({r.hf_gradient:.1e})"]
        print(f"| {family} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
