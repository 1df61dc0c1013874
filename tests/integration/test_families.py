"""Every causal-LM family deltatune accepts trains on the model's own Hugging Face loss.

The table: tiny random-weight models of each family no model-family plugin serves (the generic path;
the served ones pass the family contract) × full fine-tuning, LoRA, DoRA and QLoRA (NF4 + LoRA), and
LoRA on packed rows — deltatune's training loss and every trainable gradient against
``model(**batch, labels=...)`` in fp32. Then the pieces that make
it hold: the logit transforms inside the chunked head, the exact fallback on the model's own logits, the
refusal of models that are not causal decoders, and GPT-2's ``Conv1D`` layers behind the delta seam.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import LlamaForCausalLM

from adapter_cases import ids, trained_adapter
from deltatune.data.packing import collate
from deltatune.deltas.layer import DeltaLinear, base_weight
from deltatune.deltas.targets import find_targets
from deltatune.errors import ConfigError
from deltatune.evaluation.helpers import sequence_logprobs
from deltatune.io.peft import export_peft
from deltatune.model.assembly import build_model, resolve_spec
from deltatune.model.families import installed_families
from deltatune.model.loading import load_model, tiny_tokenizer
from deltatune.model.logits import head_plan
from deltatune.testing import max_relative_difference as rel
from deltatune.testing.families import TINY_FAMILIES, assert_bf16_conformance, assert_family_conformance, conformance_rows, family_conformance
from deltatune.train.head_loss import LinearCrossEntropy, head_weight_grad

LORA = {"name": "lora", "config": {"targets": "all-linear", "r": 4, "alpha": 8}}
METHODS = {
    "full": None,
    "lora": {"delta": [LORA]},
    "dora": {"delta": [{"name": "dora", "config": {"targets": "all-linear", "r": 4, "alpha": 8}}]},
    "qlora": {"quantizer": {"name": "nf4", "config": {"compute_dtype": "fp32"}}, "delta": [LORA]},
}


def generic_path_families() -> list[str]:
    """The tiny models no installed model family serves: they train on the generic path. (The served
    ones pass the family contract, ``plugins/families/tests/test_contract.py``, which runs the same
    methods on them, padded and packed.)"""
    served = {t for family in installed_families() for t in family.model_types}
    return [name for name, factory in TINY_FAMILIES.items() if factory().config.model_type not in served]


GENERIC = generic_path_families()


def test_the_generic_path_is_tested_on_families_no_plugin_serves() -> None:
    assert {"olmo2", "starcoder2", "falcon", "gpt_neox"} <= set(GENERIC)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", GENERIC)
def test_training_loss_and_gradients_equal_the_hugging_face_loss(family, method) -> None:
    assert_family_conformance(TINY_FAMILIES[family], METHODS[method])


@pytest.mark.parametrize("family", GENERIC)
def test_packed_rows_train_on_the_loss_of_the_same_examples_unpacked(family) -> None:
    assert_family_conformance(TINY_FAMILIES[family], METHODS["lora"], packed=True)


@pytest.mark.parametrize("family, packed", [("mixtral", False), ("olmo2", True)])
def test_bf16_training_on_the_generic_path_is_as_close_to_fp32_as_the_hugging_face_forward(family, packed) -> None:
    result = assert_bf16_conformance(TINY_FAMILIES[family], METHODS["lora"], packed)
    assert result.loss > 0 and result.hf_gradient > 0  # bf16 really rounded: the comparison is not vacuous


def test_bitfit_trains_gpt2_on_its_own_loss() -> None:
    assert_family_conformance(TINY_FAMILIES["gpt2"], {"delta": ["bitfit"]})


# -- the logit transforms -------------------------------------------------------------------------------
@pytest.mark.parametrize("family, transform", [
    ("gemma2", "soft-capping at 3"), ("gemma3", "soft-capping at 3"), ("granite", "division by 8"),
    ("cohere", "multiplication by 0.0625"), ("llama", None), ("gpt2", None),
])
def test_the_head_applies_the_declared_transform_which_the_loss_would_otherwise_miss(family, transform) -> None:
    model = TINY_FAMILIES[family]()
    plan = head_plan(model)
    assert plan.exact and (plan.transform.name if plan.transform else None) == transform
    if transform is None:
        return
    batch = {"input_ids": ids() % 300 + 3, "attention_mask": torch.ones(2, 23, dtype=torch.long)}
    with torch.no_grad():
        hidden = model.get_decoder()(**batch).last_hidden_state
        untransformed = F.cross_entropy(model.get_output_embeddings()(hidden)[:, :-1].flatten(0, 1),
                                        batch["input_ids"][:, 1:].flatten())
        own = model(**batch, labels=batch["input_ids"]).loss
    assert abs(float(untransformed / own) - 1) > 0.02  # what the head computed before the transforms


def test_the_chunked_head_differentiates_through_the_transform() -> None:
    """Gradients of hidden states and head weight (also the deferred one of a tied head trained in
    backward) through soft-capping equal autograd's, chunk boundaries and ignored rows included."""
    plan = head_plan(TINY_FAMILIES["gemma2"]())
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=generator).requires_grad_()
    weight = (torch.randn(50, 16, generator=generator) * 2).requires_grad_()
    targets = torch.randint(0, 50, (40,), generator=generator)
    targets[::7] = -100
    ours = LinearCrossEntropy.apply(hidden, weight, None, targets, 16, None, plan.transform)
    ours_h, ours_w = torch.autograd.grad(ours, (hidden, weight))
    reference = F.cross_entropy(plan.transform.apply(hidden @ weight.t()), targets, reduction="sum")
    ref_h, ref_w = torch.autograd.grad(reference, (hidden, weight))
    assert rel(ours, reference) < 1e-6 and rel(ours_h, ref_h) < 1e-5 and rel(ours_w, ref_w) < 1e-5
    deferred = head_weight_grad(hidden.detach(), weight.detach(), None, targets, 16, torch.tensor(1.0), plan.transform)
    assert rel(deferred, ref_w) < 1e-5


class _DoubledLogits(LlamaForCausalLM):
    """A causal LM that changes its logits after the head and declares nothing."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        if out.loss is not None:
            labels = kwargs["labels"][:, 1:]
            out.loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels.flatten())
        return out


def _doubled(seed: int = 0) -> LlamaForCausalLM:
    model = TINY_FAMILIES["llama"](seed)
    doubled = _DoubledLogits(model.config)
    doubled.load_state_dict(model.state_dict())
    return doubled


def test_a_model_whose_logits_the_head_does_not_compute_trains_on_its_own_logits() -> None:
    with pytest.warns(UserWarning, match="own logits .* differs from its own logits"):
        result = assert_family_conformance(_doubled, METHODS["lora"])
    assert result.head.startswith("own logits")


def test_an_undeclared_logit_field_takes_the_exact_path_and_says_why() -> None:
    model = TINY_FAMILIES["llama"]()
    model.config.logit_bias_shift = 0.5
    with pytest.warns(UserWarning, match="logit_bias_shift may change the logits"):
        plan = head_plan(model)
    assert not plan.exact


# -- causal decoders only ----------------------------------------------------------------------------------
def test_a_model_that_is_not_a_causal_decoder_is_refused_by_its_numbers() -> None:
    """A folder is refused from its config before loading (``deltatune.model.loading.check_causal_decoder``);
    a model handed over in code, or one whose config says nothing, is refused by the probe."""
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64))
    with pytest.raises(ConfigError, match="BertLMHeadModel .bert. is not a causal decoder"):
        family_conformance(lambda: model, METHODS["lora"])


# -- GPT-2: Conv1D layers behind the delta seam --------------------------------------------------------------
def test_all_linear_selects_gpt2_conv1d_layers_and_merging_is_exact() -> None:
    model = TINY_FAMILIES["gpt2"]()
    names = find_targets(model, "all-linear", "test")
    assert [n.rsplit(".", 1)[-1] for n in names[:4]] == ["c_attn", "c_proj", "c_fc", "c_proj"] and len(names) == 8
    for method in ("lora", "dora"):
        built = build_model(resolve_spec({**METHODS[method], "base_dtype": "fp32"}), TINY_FAMILIES["gpt2"]())
        with torch.no_grad():
            for param in built.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.05)
        built.eval()
        before = built(input_ids=ids() % 300).logits
        for module in built.modules():
            if isinstance(module, DeltaLinear):
                module.merge_delta(method)
        merged = built(input_ids=ids() % 300).logits
        assert rel(merged, before) < 1e-5, method


def test_a_gpt2_lora_exports_to_peft_with_equal_logits(tmp_path) -> None:
    base = tmp_path / "gpt2"
    TINY_FAMILIES["gpt2"]().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    model, _ = trained_adapter(tmp_path / "adapter", [LORA], str(base))
    out = export_peft(tmp_path / "adapter", tmp_path / "peft")
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    peft = PeftModel.from_pretrained(load_model(str(base)), out).eval()
    with torch.no_grad():
        assert rel(peft(input_ids=ids()).logits, model(input_ids=ids()).logits) <= 1e-6


def test_nf4_quantizes_gpt2_conv1d_weights_in_their_orientation() -> None:
    dense = TINY_FAMILIES["gpt2"]().eval()
    quantized = build_model(resolve_spec({**METHODS["qlora"], "base_dtype": "fp32"}), TINY_FAMILIES["gpt2"]()).eval()
    for name in ("attn.c_attn", "mlp.c_fc", "mlp.c_proj"):  # square and non-square weights
        layer = quantized.transformer.h[0].get_submodule(name)
        assert type(layer.base_layer).__name__ == "Linear4bit"
        reference = dense.transformer.h[0].get_submodule(name).weight.detach().t()  # Conv1D stores in x out
        dequantized = base_weight(layer).detach()
        assert dequantized.shape == reference.shape
        assert float((dequantized - reference).norm() / reference.norm()) < 0.15  # NF4's error, not a transpose's


def test_a_bf16_model_keeps_the_transform_in_its_head() -> None:
    """The probe compares in the precision the model computes its logits in (bf16 here)."""
    plan = head_plan(TINY_FAMILIES["gemma2"]().to(torch.bfloat16))
    assert plan.exact and plan.transform is not None


def test_log_likelihoods_of_evaluators_are_those_of_the_models_own_logits() -> None:
    model = TINY_FAMILIES["gemma2"]().eval()
    rows = conformance_rows()
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                     .logits[:, :-1].float(), dim=-1)
    labels = batch["labels"][:, 1:]
    picked = logprobs.gather(2, labels.clamp_min(0)[..., None]).squeeze(2) * (labels != -100)
    assert torch.allclose(torch.tensor(sequence_logprobs(model, rows, pad_id=0), dtype=torch.float64), picked.sum(1).double(), rtol=1e-5)


def test_a_linear_subclass_with_its_own_forward_is_not_a_target() -> None:
    """Llama 4's router subclasses ``nn.Linear`` but returns (scores, logits): ``all-linear`` leaves it
    to the model (PEFT-style wrapping would add a delta to a tuple), and the model trains on its own loss."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    def factory(seed: int = 0) -> torch.nn.Module:
        config = Llama4TextConfig(vocab_size=320, hidden_size=64, intermediate_size=96, intermediate_size_mlp=96,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  num_local_experts=4, max_position_embeddings=256, pad_token_id=0)
        torch.manual_seed(seed)
        return Llama4ForCausalLM(config).float()

    model = factory()
    routers = [name for name, module in model.named_modules() if type(module).__name__ == "Llama4Router"]
    assert routers and isinstance(model.get_submodule(routers[0]), torch.nn.Linear)
    chosen = find_targets(model, "all-linear", "lora")
    assert chosen and not set(routers) & set(chosen)
    assert_family_conformance(factory, METHODS["qlora"])


def test_a_moe_router_auxiliary_loss_is_trained_as_the_model_weighs_it() -> None:
    """With ``output_router_logits`` a Mixtral's own loss is its cross-entropy plus
    ``router_aux_loss_coef`` x the load-balancing loss: deltatune trains that sum (from the model's own
    forward), not the cross-entropy alone."""
    from transformers import MixtralConfig, MixtralForCausalLM

    def factory(seed: int = 0) -> torch.nn.Module:
        config = MixtralConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                               max_position_embeddings=256, pad_token_id=0, output_router_logits=True,
                               router_aux_loss_coef=0.5)
        torch.manual_seed(seed)
        return MixtralForCausalLM(config).float()

    result = assert_family_conformance(factory, METHODS["lora"])
    assert "auxiliary loss" in result.head
    model = factory()
    batch = collate(conformance_rows(), pad_id=0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        out = model(**inputs)
        mask = batch["labels"][:, 1:] != -100
        cross_entropy = F.cross_entropy(out.logits[:, :-1][mask], batch["labels"][:, 1:][mask])
        own = model(**inputs, labels=batch["labels"]).loss
    assert float(out.aux_loss) > 0.1  # the auxiliary term is not negligible, so the conformance above sees it
    assert abs(float(own) - float(cross_entropy + 0.5 * out.aux_loss)) < 1e-5
