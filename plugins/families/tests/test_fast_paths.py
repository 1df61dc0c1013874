"""The fast paths compute what the plain path computes.

Speed is measured by ``benchmarks/speed.py``, never asserted here. These tests check that every fast
path — the chunked LM-head cross-entropy, the unpadded decoder forward of
:mod:`deltatune_families.fast.llama` (Llama, Mistral, Qwen 2, Qwen 3) with LoRA's grouped low-rank
products, its gradient checkpointing and the layers it leaves to their own forward — gives the plain
path's loss and gradients (and the model's own Hugging Face loss): to 1e-5 in fp32, and close (bf16
rounding) in bf16. Every comparison asserts that the fast forward really computed its side
(:func:`fast_forward_runs`), so a silent fall-back to the plain path fails it; the batches it must
decline are checked to fall back, with the same loss.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deltatune.deltas.grouped import Projection, ProjectionGroup, grouped_product_class
from deltatune.model import loading as models
from deltatune.testing import fast_forward_runs
from deltatune.testing.families import TINY_FAMILIES, conformance_rows, family_conformance
from deltatune_families.fast.llama import fast_forward_for
from deltatune_families.fast.tokens import TokenLayout
from deltatune.train.head_loss import SHAPE_STEPS
from deltatune.train.head_loss import LOSS_CHUNK_BYTES, LinearCrossEntropy, loss_chunk_rows
from deltatune.train.loss import token_loss
from deltatune.data.packing import collate, collate_packed, pack_rows
from deltatune.cli.main import main
from deltatune.errors import ConfigError
from deltatune.train.module import DeltaTuneModule
from deltatune.model.assembly import build_model, compile_decoder_layers, compute_context, resolve_spec

TINY_CONFIG = Path(__file__).resolve().parents[3] / "tests" / "configs" / "tiny-lora.yaml"
LORA_ALL = {"name": "lora", "config": {"r": 4, "alpha": 8, "targets": "all-linear"}}


def make_model(base: str = "tiny-llama", delta: list | None = None, dtype: str = "fp32", seed: int = 0,
               family: str | None = None):
    """A tiny model (of ``base``, or ``TINY_FAMILIES[family]``) with its deltas, every LoRA ``B``
    random (so the deltas change the output)."""
    spec = resolve_spec({"base": base, "delta": [LORA_ALL] if delta is None else delta, "base_dtype": dtype})
    torch.manual_seed(seed)
    model = build_model(spec, TINY_FAMILIES[family](seed) if family else None)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.1)
    return model.train()


def make_rows(lengths=(7, 12, 5, 9, 11), seed: int = 1) -> list[dict]:
    """Rows whose first half is prompt (no loss) and second half response."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(0, 256, (n,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    return rows


def loss_and_grads(model, batch, fast: bool):
    """Loss, labelled tokens and gradients; with ``fast``, the fast forward must have computed them."""
    model.zero_grad(set_to_none=True)
    with compute_context(model), fast_forward_runs() as runs:
        total, count = token_loss(model, batch, fast=fast)
    assert runs == ([model.config.model_type] if fast else []), "the fast forward did not compute this loss"
    (total / count).backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(total), count, grads


def assert_close_grads(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        scale = a[name].abs().max().clamp_min(1e-12)
        assert float((a[name] - b[name]).abs().max() / scale) < rtol, name


ALSO_QWEN3 = pytest.mark.parametrize("family", [None, "qwen3"], ids=["llama", "qwen3 (QK-norm)"])
"""Runs a test on the tiny Llama and on a tiny Qwen 3, whose QK-norm the fast forward computes itself."""

BATCHES = {
    "padded": lambda: collate(make_rows(), pad_id=0),
    "packed": lambda: collate_packed(pack_rows(make_rows(), 24), pad_id=0),
    "row without labels": lambda: collate(make_rows() + [{"input_ids": [5, 6, 7, 8], "labels": [-100] * 4}], pad_id=0),
}


# -- the chunked LM head ----------------------------------------------------------------------------------
@pytest.mark.parametrize("trainable_head", [False, True])
def test_chunked_cross_entropy_equals_full_logits(trainable_head: bool):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=generator, requires_grad=True)
    head = torch.nn.Linear(16, 300, bias=trainable_head)
    head.requires_grad_(trainable_head)
    targets = torch.randint(0, 300, (50,), generator=generator)
    targets[::7] = -100  # ignored rows: no loss, zero gradient (as F.cross_entropy's ignore_index)

    full = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    grads_full = torch.autograd.grad(full, [hidden, *(p for p in head.parameters() if p.requires_grad)])
    chunked = LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, 16)  # 4 chunks
    grads_chunked = torch.autograd.grad(chunked, [hidden, *(p for p in head.parameters() if p.requires_grad)])

    assert abs(float(full.detach()) - float(chunked.detach())) < 1e-5 * abs(float(full.detach()))
    for a, b in zip(grads_full, grads_chunked):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_keeps_no_logits():
    """Backward keeps the gradient of the hidden states only — no chunk of logits survives forward."""
    hidden = torch.randn(40, 16, requires_grad=True)
    weight = torch.randn(1000, 16)
    loss = LinearCrossEntropy.apply(hidden, weight, None, torch.randint(0, 1000, (40,)), 8)
    saved = loss.grad_fn.saved_tensors
    assert sum(t.numel() for t in saved) == hidden.numel()


def test_chunk_rows_bound_logit_memory():
    rows = loss_chunk_rows(49152)
    assert rows * 49152 * 4 <= LOSS_CHUNK_BYTES and rows >= 16


# -- the fast decoder forward -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", BATCHES)
def test_fast_path_equals_plain_fp32(kind: str):
    model = make_model()
    batch = BATCHES[kind]()
    assert fast_forward_for(model) is not None
    plain = loss_and_grads(model, batch, fast=False)
    fast = loss_and_grads(model, batch, fast=True)
    assert plain[1] == fast[1]
    assert abs(plain[0] - fast[0]) <= 1e-5 * abs(plain[0])
    assert_close_grads(plain[2], fast[2], 1e-5)


@pytest.mark.parametrize("setup", [
    {"base": "tiny-llama-tied", "delta": None},
    {"base": "tiny-llama", "delta": [{"name": "lora", "config": {"r": 2, "targets": ["q_proj", "v_proj", "down_proj"]}}]},
    {"base": "tiny-llama", "delta": []},  # full fine-tuning: every layer runs its own forward
    {"base": "tiny-llama", "delta": [{"name": "dora", "config": {"r": 2, "targets": ["q_proj", "v_proj"]}},
                                     {"name": "lora", "config": {"r": 2, "targets": ["o_proj", "gate_proj"]}}]},
], ids=["tied head", "some targets", "full fine-tune", "dora + lora"])
def test_fast_path_equals_plain_for_other_setups(setup: dict):
    model = make_model(setup["base"], setup["delta"])
    batch = collate(make_rows(), pad_id=0)
    plain = loss_and_grads(model, batch, fast=False)
    fast = loss_and_grads(model, batch, fast=True)
    assert abs(plain[0] - fast[0]) <= 1e-5 * abs(plain[0])
    assert_close_grads(plain[2], fast[2], 1e-5)


def randomize_biases(model: torch.nn.Module, seed: int = 2) -> torch.nn.Module:
    """Every bias of ``model`` drawn from U(-0.5, 0.5) (transformers initializes them to zero, which
    would hide a bias left out)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.rand(param.shape, generator=generator) - 0.5)
    return model


def test_fast_path_equals_plain_with_biased_base_layers():
    """Frozen biases on q/k/v, o and the MLP (``attention_bias``/``mlp_bias``): each product of a group
    is written into its columns of the group's output with its bias."""
    spec = resolve_spec({"base": "tiny-llama", "delta": [LORA_ALL], "base_dtype": "fp32"})
    base = randomize_biases(models.tiny_llama(attention_bias=True, mlp_bias=True))
    model = build_model(spec, base).train()
    assert model.model.layers[0].self_attn.k_proj.base_layer.bias is not None
    batch = collate(make_rows(), pad_id=0)
    plain, fast = loss_and_grads(model, batch, fast=False), loss_and_grads(model, batch, fast=True)
    assert fast_forward_for(model) is not None
    assert abs(plain[0] - fast[0]) <= 1e-5 * abs(plain[0])
    assert_close_grads(plain[2], fast[2], 1e-4)


def test_fast_path_equals_plain_when_a_group_mixes_scalings():
    # q/k/v share one grouped product; each member's own LoRA scaling must reach its output and gradients
    model = make_model()
    attention = model.get_decoder().layers[0].self_attn
    for module, scaling in ((attention.q_proj, 0.5), (attention.v_proj, 3.0)):
        (delta,) = module.deltas.values()
        delta.scaling = scaling
    batch = collate(make_rows(), pad_id=0)
    plain = loss_and_grads(model, batch, fast=False)
    fast = loss_and_grads(model, batch, fast=True)
    assert abs(plain[0] - fast[0]) <= 1e-5 * abs(plain[0])
    assert_close_grads(plain[2], fast[2], 1e-5)


@ALSO_QWEN3
def test_bf16_path_close_to_fp32(family: str | None):
    batch = collate(make_rows(), pad_id=0)
    reference = loss_and_grads(make_model(dtype="fp32", family=family), batch, fast=False)
    for fast in (False, True):
        loss, count, grads = loss_and_grads(make_model(dtype="bf16", family=family), batch, fast=fast)
        assert count == reference[1]
        assert abs(loss - reference[0]) < 1e-2 * abs(reference[0])
        for name, grad in grads.items():
            cosine = F.cosine_similarity(grad.flatten(), reference[2][name].flatten(), dim=0)
            assert cosine > 0.99, name


def test_bf16_fast_path_keeps_fp32_masters_and_no_fp32_base():
    model = make_model(dtype="bf16")
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name
    loss_and_grads(model, collate(make_rows(), pad_id=0), fast=True)
    trained = {n: p for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n for n in trained)
    assert all(p.grad.dtype == torch.float32 for p in trained.values())  # fp32 gradients reach the masters


@ALSO_QWEN3
def test_gradient_checkpointing_gives_the_same_gradients(family: str | None):
    batch = collate(make_rows(), pad_id=0)
    model = make_model(family=family)
    expected = loss_and_grads(model, batch, fast=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Hugging Face hooks the embedding when checkpointing is enabled; the fast path must still apply
    assert model.get_input_embeddings()._forward_hooks
    assert fast_forward_for(model) is not None
    calls = []
    original = torch.utils.checkpoint.checkpoint
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
        got = loss_and_grads(model, batch, fast=True)
    assert len(calls) == model.config.num_hidden_layers  # every layer was checkpointed by the fast path
    assert abs(expected[0] - got[0]) <= 1e-6 * abs(expected[0])
    assert_close_grads(expected[2], got[2], 1e-6)


def test_no_grad_evaluation_matches():
    model = make_model().eval()
    batch = collate(make_rows(), pad_id=0)
    with torch.no_grad():
        plain, _ = token_loss(model, batch, fast=False)
        with fast_forward_runs() as runs:
            fast, _ = token_loss(model, batch, fast=True)
    assert runs == ["llama"]
    assert abs(float(plain) - float(fast)) <= 1e-5 * abs(float(plain))


# -- the families: Llama's rope types, Mistral, Qwen 2, Qwen 3 ----------------------------------------------
def family_variant(name: str, **settings):
    """A factory of ``TINY_FAMILIES[name]`` with config ``settings`` changed (the same seeded weights
    where the shapes agree)."""
    base = TINY_FAMILIES[name]()

    def factory(seed: int = 0) -> torch.nn.Module:
        config = type(base.config)(**{**base.config.to_dict(), **settings})
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return type(base)(config).float()

    return factory


def biased(factory):
    """``factory`` with every bias of its models random (:func:`randomize_biases`)."""
    return lambda seed=0: randomize_biases(factory(seed))


WIDE_WINDOW = max(len(row["input_ids"]) for row in conformance_rows())
"""A sliding window exactly as wide as the longest conformance example: it masks nothing (a query
attends to keys less than a window behind it)."""

FAST_FAMILIES = {
    "llama": TINY_FAMILIES["llama"],
    "llama3 rope": TINY_FAMILIES["llama3"],
    "yarn rope": family_variant("llama", rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral, window wider than the examples": family_variant("mistral", sliding_window=WIDE_WINDOW),
    "qwen2 (random q/k/v biases)": biased(TINY_FAMILIES["qwen2"]),
    "qwen3": TINY_FAMILIES["qwen3"],
}
"""Tiny models (hidden 64, 2 layers, 4 query / 2 key-value heads) the fast forward computes."""

DECLINING_FAMILIES = {
    "mistral, window narrower than the examples": TINY_FAMILIES["mistral"],
    "qwen2 with a sliding layer": family_variant("qwen2", use_sliding_window=True, sliding_window=16,
                                                 layer_types=["full_attention", "sliding_attention"]),
}
"""Tiny models whose sliding window is narrower than the conformance examples: their batches are declined."""


@pytest.mark.parametrize(("name", "packed"), [*((name, False) for name in FAST_FAMILIES),
                                              ("mistral, window wider than the examples", True), ("qwen3", True)])
def test_family_fast_forward_equals_the_hugging_face_loss(name: str, packed: bool):
    """LoRA on every linear layer, fp32: deltatune's loss through the fast forward (on padded or packed
    rows) and every trainable gradient equal ``model(**batch, labels=...)``'s on the padded rows."""
    with fast_forward_runs() as runs:
        result = family_conformance(FAST_FAMILIES[name], {"delta": [LORA_ALL]}, packed)
    assert runs, "the fast forward did not compute this loss"
    assert result.loss <= 1e-5 and result.gradient <= 1e-5, result


@pytest.mark.parametrize("name", DECLINING_FAMILIES)
def test_a_batch_longer_than_a_sliding_window_is_declined(name: str):
    factory = DECLINING_FAMILIES[name]
    assert fast_forward_for(build_model(resolve_spec({"delta": [LORA_ALL]}), factory())) is not None
    with fast_forward_runs() as runs:
        result = family_conformance(factory, {"delta": [LORA_ALL]})
    assert runs == []  # the plain path computed it, the window applied
    assert result.loss <= 1e-5 and result.gradient <= 1e-5, result


@pytest.mark.parametrize(("family", "settings"), [
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}}),
    ("qwen2", {"layer_types": ["full_attention", "chunked_attention"]}),
], ids=["dynamic rope", "unknown layer type"])
def test_a_model_the_forward_does_not_compute_is_declined(family: str, settings: dict):
    assert fast_forward_for(family_variant(family, **settings)()) is None


# -- what the fast path leaves alone --------------------------------------------------------------------------
def test_hooked_linear_layer_runs_its_own_forward():
    model = make_model()
    calls = []
    layer = model.model.layers[0].self_attn.k_proj
    layer.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    batch = collate(make_rows(), pad_id=0)
    plain = loss_and_grads(model, batch, fast=False)
    fast = loss_and_grads(model, batch, fast=True)
    assert len(calls) == 2  # the hook ran on both paths
    assert abs(plain[0] - fast[0]) <= 1e-5 * abs(plain[0])
    assert_close_grads(plain[2], fast[2], 1e-5)


def test_unrecognised_model_uses_the_plain_path():
    model = make_model()
    model.model.layers[1].mlp.register_forward_hook(lambda *args: None)
    assert fast_forward_for(model) is None


def test_lora_dropout_in_training_is_left_to_the_layer():
    model = make_model(delta=[{"name": "lora", "config": {"r": 4, "dropout": 0.5, "targets": "all-linear"}}])
    layer = model.model.layers[0].self_attn.q_proj
    assert grouped_product_class([Projection.of(layer)]) is None
    assert ProjectionGroup([layer]).grouped(torch.float32) is None
    model.eval()
    assert grouped_product_class([Projection.of(layer)]) is not None
    assert ProjectionGroup([layer]).grouped(torch.float32) is not None


def test_merged_delta_is_read_from_the_base_weight():
    model = make_model()
    batch = collate(make_rows(), pad_id=0)
    plain = loss_and_grads(model, batch, fast=False)
    for module in model.modules():
        if hasattr(module, "merge_delta") and "lora" in getattr(module, "deltas", {}):
            module.merge_delta("lora")
    with torch.no_grad(), fast_forward_runs() as runs:
        merged, _ = token_loss(model, batch, fast=True)
    assert runs == ["llama"]
    assert abs(plain[0] - float(merged)) <= 1e-4 * abs(plain[0])


@pytest.mark.parametrize("optimizer_class", [partial(torch.optim.SGD, lr=0.5),
                                             partial(torch.optim.AdamW, lr=0.01, fused=True)])
def test_adapter_update_is_seen_by_the_next_step(optimizer_class):
    """The compute-dtype copies of the LoRA weights follow the optimizer's in-place updates — also a
    fused kernel's, which does not bump the parameters' version counters."""
    model = make_model()
    batch = collate(make_rows(), pad_id=0)
    optimizer = optimizer_class([p for p in model.parameters() if p.requires_grad])
    for _ in range(2):
        loss_and_grads(model, batch, fast=True)
        optimizer.step()
    plain = loss_and_grads(model, batch, fast=False)
    fast = loss_and_grads(model, batch, fast=True)
    assert abs(plain[0] - fast[0]) <= 1e-5 * abs(plain[0])


@pytest.mark.parametrize("optimizer_class", [partial(torch.optim.SGD, lr=0.5),
                                             partial(torch.optim.AdamW, lr=0.01, fused=True)])
def test_a_graph_older_than_the_refreshed_lora_copies_refuses_backward(optimizer_class):
    """The compute-dtype LoRA copies are refreshed in place: a graph built before an optimizer step
    must fail loudly rather than backpropagate through the new weights."""
    model = make_model()
    batch = collate(make_rows(), pad_id=0)
    optimizer = optimizer_class([p for p in model.parameters() if p.requires_grad])
    with compute_context(model):
        stale, count = token_loss(model, batch)
    loss_and_grads(model, batch, fast=True)
    optimizer.step()  # the weights move: the copies are due for a refresh
    with compute_context(model):
        token_loss(model, batch)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale.backward()


def test_layout_of_packed_rows_separates_examples():
    batch = collate_packed(pack_rows(make_rows((3, 4)), 10), pad_id=0)
    layout = TokenLayout.build(batch)
    assert layout.real == 7  # the padding segment has no label: dropped
    assert layout.positions[:7].tolist() == [0, 1, 2, 0, 1, 2, 3]
    # shapes are rounded up: filler rows (no target, outside attention), a wider attention layout
    tokens_step, width_step = SHAPE_STEPS
    assert len(layout.index) == len(layout.positions) == len(layout.targets) == tokens_step
    assert (layout.targets[7:] == -100).all()
    assert layout.examples == 2 and layout.width == width_step
    assert layout.slots.tolist() == [0, 1, 2, width_step, width_step + 1, width_step + 2, width_step + 3]
    rows = torch.arange(len(layout.index), dtype=torch.float32)[:, None] + 1
    back = layout.to_tokens(layout.to_examples(rows))
    assert back[:7].equal(rows[:7]) and not back[7:].any()  # filler rows come back as zeros


def test_lora_copies_are_not_refreshed_while_the_weights_stand_still():
    """Forwards without a gradient in between (evaluation, accumulation's later micro-batches read the
    same weights) reuse the compute-dtype copies instead of copying every pair again."""
    model = make_model().eval()
    batch = collate(make_rows(), pad_id=0)
    forward = fast_forward_for(model)
    product, _ = forward.groups[0][0].grouped(torch.float32)
    with torch.no_grad():
        forward(batch)
        key = product.copies.key
        buffer = product.copies.a
        forward(batch)
    assert product.copies.key == key and product.copies.a is buffer
    loss_and_grads(model.train(), batch, fast=True)  # a gradient reached the masters: refreshed next time
    with torch.no_grad():
        forward(batch)
    assert product.copies.key != key


def test_plain_loss_imports_no_fast_forward_and_the_fast_forward_no_global_hook():
    """The plain path of any model leaves the Llama forward unimported, and importing it (with LoRA's
    grouped product) registers nothing process-wide."""
    code = (
        "import sys\n"
        "from torch.optim import optimizer\n"
        "import deltatune.train.loss\n"
        "assert 'deltatune_families.fast.llama' not in sys.modules\n"
        "import deltatune_families.fast.llama, deltatune_lora\n"
        "assert not optimizer._global_optimizer_pre_hooks and not optimizer._global_optimizer_post_hooks\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- model.compile: compiled decoder layers ----------------------------------------------------------------
DORA = [{"name": "dora", "config": {"r": 4, "alpha": 8, "targets": "all-linear"}}]


def test_compiled_layers_give_the_same_loss_and_gradients():
    """DoRA (left to the plain forward by the fast path) on packed rows (several examples per row, the
    position ids restarting), fp32: to 1e-5. One batch shape: each shape is a compilation of its own, and
    ``test_fit_with_compile_trains`` runs the compiled layers on a real run's padded batches."""
    plain, compiled = make_model(delta=DORA), make_model(delta=DORA)
    assert compile_decoder_layers(compiled) == len(compiled.model.layers)
    assert compiled.state_dict().keys() == plain.state_dict().keys()  # saving and loading are unchanged
    batch = BATCHES["packed"]()
    loss_a, count_a, grads_a = loss_and_grads(plain, batch, fast=False)
    loss_b, count_b, grads_b = loss_and_grads(compiled, batch, fast=False)
    assert count_a == count_b
    assert abs(loss_a - loss_b) <= 1e-5 * abs(loss_a)
    assert_close_grads(grads_a, grads_b, 1e-4)
    assert all(layer._compiled_call_impl is not None for layer in compiled.model.layers)


def test_a_model_without_decoder_layers_is_a_clear_error():
    with pytest.raises(ConfigError, match="no decoder layers to compile"):
        compile_decoder_layers(torch.nn.Linear(4, 4))


def test_fit_with_compile_trains(tmp_path):
    """A real ``deltatune fit`` with ``model.compile: true`` (DoRA through the compiled plain
    forward): the validation loss falls and the adapter is written."""
    code = main(["fit", "--config", str(TINY_CONFIG), f"--trainer.default_root_dir={tmp_path}",
                 f"--model.delta={json.dumps(DORA)}", "--model.compile=true", "--model.samples=0",
                 "--trainer.max_steps=8"])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tuned_metrics"]["validation"]["perplexity/loss"] < report["base_metrics"]["validation"]["perplexity/loss"]
    assert (tmp_path / "adapter" / "deltatune.json").is_file()


def test_compile_option_compiles_the_decoder_layers():
    module = DeltaTuneModule(base="tiny-llama", delta=DORA, compile=True, compare_base=False, samples=0)
    module.configure_model()
    assert all(layer._compiled_call_impl is not None for layer in module.model.model.layers)
    assert not module.uses_fast_path  # training runs the compiled layers, not the fast forward
