"""The plugin API: everything a deltatune plugin may import from the core, and nothing else.

A plugin imports from ``deltatune.api`` only (a test fails when a package under ``plugins/`` or
``examples/`` imports another core module); its tests may also use ``deltatune.testing``. Every
other module of the core is internal and may change without notice. The names, by what they are for:

**Registering** — ``hookimpl`` marks a plugin module's hook implementations (the hooks are in
:mod:`deltatune.plugin.hookspecs`); ``Register`` is the type of the ``register`` callback they receive.

**Errors** — ``ConfigError`` (bad options or combinations), ``DataError`` (a bad data file, naming
file and line), both subclasses of ``DeltaTuneError``: the core shows their one-line message to
the user.

**Protocols** — ``DatasetBuilder``, ``DeltaMethod``, ``Quantizer``, ``Evaluator``,
``OptimizerFactory``, ``ModelFamily``: what a registered class must provide (structural: no base class needed), each
with its optional members (``optional_members(protocol)``: name, default, meaning). ``Row`` is one
tokenised example.

**Delta methods: the delta-layer seam** — ``DeltaLinear`` wraps a base linear layer (dense or
quantized) and holds named ``Delta`` modules (``WeightUpdateDelta`` when the merged form is a weight
update ``ΔW``); ``LayerDeltaMethod`` implements the whole ``DeltaMethod`` protocol for methods made of
such deltas (a subclass writes ``make_delta``). ``base_weight`` reads the dense weight of any
(quantized, wrapped) linear layer. Target selection, as PEFT does it: ``find_targets``,
``target_matches``, ``get_submodule_parent``, ``delta_layers``; besides PEFT's forms, ``targets`` takes the
role words ``TARGET_ROLES`` (``attention``, ``mlp``: the layers a model family places there, by default
``generic_target_roles``), and ``TARGETS_HELP`` describes the whole option for a method's ``Config``. The low-rank pair LoRA-style methods
share: ``LowRankConfig``, ``LowRankDelta``, ``LOW_RANK_PEFT_FIELDS``, and per expert of a 3-D expert
parameter ``LowRankExpertDelta``. PEFT checkpoint names:
``PEFT_PREFIX``, ``copy_named_tensors``.

**Delta methods: expert parameters** — ``DeltaExperts`` wraps a MoE experts module (3-D expert
weights, transformers 5) and holds per parameter an ``ExpertDelta`` (its layout: ``ExpertShape``);
``LayerDeltaMethod`` reaches them through ``cfg.target_parameters`` and a subclass's
``make_expert_delta``; ``find_expert_targets`` selects them as PEFT's ``target_parameters`` does, ``iter_expert_parameters``
lists them; a quantizer holds one quantized through ``wrap_experts`` and ``DeltaExperts.set_quantized``.

**Delta methods: the virtual-token seam** — ``VirtualTokens`` (tokens before every sequence: key/value
pairs per layer, as prefix-tuning, or input embeddings, as prompt tuning), attached to a model with
``add_virtual_tokens`` and found with ``virtual_tokens``; ``VirtualTokenMethod`` implements the ``DeltaMethod`` protocol for a
method made of one such module (a subclass writes ``make_tokens``); ``TokenStartOptions`` and
``start_token_ids`` give the tokens a method's virtual tokens start from (random, vocabulary, a text),
``own_key_values`` the base's keys and values of such tokens (a prefix's start); the core applies them to every forward of
the decoder (training, evaluation, generation). A method using it sets ``adds_virtual_tokens = True``.

**Delta methods: grouped products** — a ``Delta`` class may name a ``GroupedProduct`` that computes
linear layers reading one input (q/k/v, gate/up) as one product in a fast training forward; it gets
each layer as a ``Projection`` (frozen dense base, at most one delta) and may build on
``base_products`` / ``base_input_grad`` (the frozen bases' part), ``no_autocast`` and ``hooked``.

**Model families** — ``ModelFamily`` (the protocol) and ``LogitTransform`` (an element-wise map from the
LM head's output to the model's logits, with its derivative, which a family returns from
``logit_transform``): the training loss applies it inside its chunked LM head; a model no family serves
takes the generic exact path.

**Model families: fast training forwards** — what a family's ``fast_forward`` builds on: ``head_loss``
(the chunked LM-head cross-entropy every path to the loss ends in) with ``HEAD_ROW_STEP`` and
``SHAPE_STEPS`` (the steps to which it rounds its shapes) and ``round_up``; ``ProjectionGroup`` and
``refresh_groups`` (linear layers reading one input computed as one grouped product);
``deferred_tied_head`` (a tied head trained by an optimizer that updates inside backward).

**Model families: estimate terms** — what a family's ``activation_terms`` returns and builds on, for
``deltatune estimate``: ``ActivationTerms`` (the protocol of the returned object), ``INPUT_GROUPS``
(the linear layers of a Llama-style decoder layer reading one input), ``grouped_product_class`` (the
``GroupedProduct`` that would compute a group's projections (``Projection``) as one, or ``None``), ``delta_keeps`` and
``has_dropout`` (what a delta makes autograd keep), ``decoder_widths`` (a config's hidden, intermediate,
head and key/value widths) and ``plain_activation_bytes`` (the plain forward's terms, the fallback).

**Quantizers and evaluators: precision** — ``compute_dtype`` (the dtype an ``auto``/``bf16``/``fp32``
choice means on this machine), ``compute_context`` (the autocast a model of that dtype runs under).

**Dataset builders: reading and encoding** — ``read_records`` (JSON/JSONL/CSV records, errors naming
file and line), ``split_path``, ``encode_example`` / ``encode_records`` / ``encode_segments`` (prompt
masking and truncation, reported the same way by every builder through ``TruncationStats``),
``passthrough``, ``user_prompt``, ``chat_prompt`` and ``ChatMode`` (chat template or plain text),
``FileSourceOptions`` (the options every file-reading builder shares: the base of its ``Config``),
``ChatTemplateOptions`` (``chat_template_kwargs``, for a builder or evaluator that renders chat prompts),
``IGNORE_INDEX`` (the label of positions without loss) and ``collate`` (rows → padded batch).

**Evaluators** — ``EvaluatorOptions`` (batch size and row limit: the base of an evaluator's ``Config``),
``GenerationOptions`` (the options of evaluators that generate), ``answer_rows``,
``generate_answers``, ``length_batches`` (rows batched by length), ``normalize_answer``,
``sequence_logprobs``, ``summarize`` (per-family breakdowns), and ``token_loss`` (the training loss:
summed token cross-entropy and token count).

**Optimizers** — ``warmup_cosine`` (the shared learning-rate schedule), ``lr_groups`` (parameter
groups with the learning-rate factors delta methods declare, for ``honours_lr_multipliers``); ``InBackwardOptimizer``,
``InBackwardOptimizerConfig`` and ``InBackwardOptimizerFactory`` for optimizers that update each
parameter inside backward (LOMO): a plugin writes only the per-parameter update rule.

**Messages** — ``console``, the rich console deltatune prints to (for what a user must see).

**Files** — ``home`` (deltatune's cache folder, ``$DELTATUNE_HOME``: where a plugin keeps what it
caches) and ``atomic_file`` (write a file so that a reader never sees it half written).
"""

from __future__ import annotations

from deltatune import hookimpl
from deltatune.data.module import (
    ChatMode,
    TruncationStats,
    encode_example,
    encode_records,
    encode_segments,
    passthrough,
    read_records,
    split_path,
    user_prompt,
)
from deltatune.data.packing import IGNORE_INDEX, collate
from deltatune.data.sources import ChatTemplateOptions, FileSourceOptions
from deltatune.deltas.experts import DeltaExperts, ExpertDelta, ExpertShape, find_expert_targets, iter_expert_parameters, wrap_experts
from deltatune.deltas.grouped import (
    GroupedProduct,
    Projection,
    ProjectionGroup,
    base_input_grad,
    base_products,
    grouped_product_class,
    hooked,
    no_autocast,
    refresh_groups,
)
from deltatune.deltas.layer import Delta, DeltaLinear, WeightUpdateDelta, base_weight, delta_layers, get_submodule_parent
from deltatune.deltas.lowrank import LOW_RANK_PEFT_FIELDS, LowRankConfig, LowRankDelta, LowRankExpertDelta
from deltatune.deltas.method import LayerDeltaMethod
from deltatune.deltas.peft_names import PEFT_PREFIX, copy_named_tensors
from deltatune.deltas.targets import TARGET_ROLES, TARGETS_HELP, find_targets, generic_target_roles, target_matches
from deltatune.deltas.virtual import (
    TokenStartOptions,
    VirtualTokenMethod,
    VirtualTokens,
    add_virtual_tokens,
    own_key_values,
    start_token_ids,
    virtual_tokens,
)
from deltatune.errors import ConfigError, DataError, DeltaTuneError
from deltatune.io.atomic import atomic_file
from deltatune.evaluation.helpers import (
    EvaluatorOptions,
    GenerationOptions,
    answer_rows,
    generate_answers,
    length_batches,
    normalize_answer,
    sequence_logprobs,
    summarize,
)
from deltatune.estimate.activations import (
    INPUT_GROUPS,
    ActivationTerms,
    decoder_widths,
    delta_keeps,
    has_dropout,
    plain_activation_bytes,
)
from deltatune.model.assembly import compute_context, compute_dtype
from deltatune.model.generation import chat_prompt
from deltatune.model.loading import home
from deltatune.model.logits import LogitTransform
from deltatune.plugin.hookspecs import Register
from deltatune.plugin.protocols import (
    DatasetBuilder,
    DeltaMethod,
    Evaluator,
    ModelFamily,
    OptimizerFactory,
    Quantizer,
    Row,
    optional_members,
)
from deltatune.train.head_loss import HEAD_ROW_STEP, SHAPE_STEPS, head_loss, round_up
from deltatune.train.loss import token_loss
from deltatune.train.schedules import lr_groups, warmup_cosine
from deltatune.train.update_in_backward import (
    InBackwardOptimizer,
    deferred_tied_head,
    InBackwardOptimizerConfig,
    InBackwardOptimizerFactory,
)
from deltatune.ui.console import console

__all__ = [
    # registering
    "Register",
    "hookimpl",
    # errors
    "ConfigError",
    "DataError",
    "DeltaTuneError",
    # protocols
    "DatasetBuilder",
    "DeltaMethod",
    "Evaluator",
    "OptimizerFactory",
    "Quantizer",
    "Row",
    "optional_members",
    # delta methods: the delta-layer seam
    "Delta",
    "DeltaLinear",
    "DeltaExperts",
    "ExpertDelta",
    "ExpertShape",
    "find_expert_targets",
    "iter_expert_parameters",
    "wrap_experts",
    "LOW_RANK_PEFT_FIELDS",
    "LayerDeltaMethod",
    "LowRankConfig",
    "LowRankDelta",
    "LowRankExpertDelta",
    "PEFT_PREFIX",
    "WeightUpdateDelta",
    "base_weight",
    "copy_named_tensors",
    "delta_layers",
    "find_targets",
    "get_submodule_parent",
    "target_matches",
    "TARGETS_HELP",
    "TARGET_ROLES",
    "generic_target_roles",
    # delta methods: the virtual-token seam
    "TokenStartOptions",
    "VirtualTokenMethod",
    "VirtualTokens",
    "add_virtual_tokens",
    "own_key_values",
    "start_token_ids",
    "virtual_tokens",
    # delta methods: grouped products
    "GroupedProduct",
    "Projection",
    "base_input_grad",
    "base_products",
    "hooked",
    "no_autocast",
    # model families: logits
    "LogitTransform",
    "ModelFamily",
    # model families: fast training forwards
    "HEAD_ROW_STEP",
    "ProjectionGroup",
    "SHAPE_STEPS",
    "deferred_tied_head",
    "head_loss",
    "refresh_groups",
    "round_up",
    # model families: estimate terms
    "ActivationTerms",
    "INPUT_GROUPS",
    "decoder_widths",
    "delta_keeps",
    "grouped_product_class",
    "has_dropout",
    "plain_activation_bytes",
    # precision
    "compute_context",
    "compute_dtype",
    # dataset builders
    "ChatMode",
    "ChatTemplateOptions",
    "FileSourceOptions",
    "IGNORE_INDEX",
    "TruncationStats",
    "chat_prompt",
    "collate",
    "encode_example",
    "encode_records",
    "encode_segments",
    "passthrough",
    "read_records",
    "split_path",
    "user_prompt",
    # evaluators
    "EvaluatorOptions",
    "GenerationOptions",
    "answer_rows",
    "generate_answers",
    "length_batches",
    "normalize_answer",
    "sequence_logprobs",
    "summarize",
    "token_loss",
    # optimizers
    "InBackwardOptimizer",
    "InBackwardOptimizerConfig",
    "InBackwardOptimizerFactory",
    "warmup_cosine",
    "lr_groups",
    # messages
    "console",
    # files
    "atomic_file",
    "home",
]
