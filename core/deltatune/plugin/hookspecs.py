"""The hook specifications of deltatune: the plugin author's manual.

A plugin is a Python module exposed through the entry-point group ``deltatune``::

    [project.entry-points.deltatune]
    myplugin = "deltatune_myplugin"

and that module implements one or more of the hooks below with ``@hookimpl`` (from
:mod:`deltatune.api`, the plugin API: the only core module a plugin imports). Every hook
receives a ``register`` callback; call it once per class the plugin provides. A plugin may register
several classes, of several kinds. Each class must have:

* ``name: ClassVar[str]`` — the name users write in their YAML (``delta: [lora]``); lower case, unique
  across installed plugins of the same kind (two distributions registering one name is an error);
* ``Config: ClassVar[type[pydantic.BaseModel]]`` — its options, with ``extra="forbid"`` so that a
  misspelt option is an error naming the plugin and the field before any weight is loaded;
* the methods of its protocol in :mod:`deltatune.plugin.protocols` (and, if it likes, the protocol's
  optional members, declared there with their defaults).

The core instantiates each class with no arguments and passes the validated ``Config`` instance to
every method, so plugin classes hold no per-run state of their own unless they say so.
"""

from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("deltatune")

Register = Callable[[type], None]


@hookspec
def deltatune_register_dataset_builders(register: Register) -> None:
    """Register dataset builders (:class:`deltatune.api.DatasetBuilder`).

    A builder turns files into tokenised rows for one split (``"train"``, ``"validation"``,
    ``"test"``): each row a dict with ``input_ids`` and ``labels`` (lists of ints of equal length,
    ``-100`` where no loss is taken) and optionally ``prompt`` / ``response`` (text, for evaluators
    that generate) and ``choices`` / ``answer_index`` (for multiple-choice evaluators). It returns
    ``None`` for a split it has no data for; the core then holds out part of ``train`` for
    validation. A malformed row must raise :class:`deltatune.api.DataError` naming file and line.
    Use :func:`deltatune.api.encode_example` for masking and truncation so every builder reports
    cut responses the same way.

    Example::

        @hookimpl
        def deltatune_register_dataset_builders(register):
            register(AlpacaBuilder)
    """


@hookspec
def deltatune_register_delta_methods(register: Register) -> None:
    """Register delta methods (:class:`deltatune.api.DeltaMethod`).

    A delta method changes a loaded (and possibly quantized) base model in place in ``apply``:
    usually by wrapping ``nn.Linear`` layers in :class:`deltatune.api.DeltaLinear` and adding a
    :class:`deltatune.api.Delta` module to it (MoE expert weights, 3-D parameters: wrapping the experts
    module in :class:`deltatune.api.DeltaExperts` with an :class:`deltatune.api.ExpertDelta`), or by
    marking existing parameters (BitFit). It then
    claims its trainable parameters through ``trainable(name, param)``; the core freezes everything no
    method claims and raises a configuration error when two methods claim one parameter or one
    module. Methods that need the base weight (DoRA norms, merging) must read it with
    :func:`deltatune.api.base_weight`, which dequantizes through the active quantizer, and set
    ``supports_quantized = False`` when they cannot work on a quantized base at all.
    """


@hookspec
def deltatune_register_quantizers(register: Register) -> None:
    """Register quantizers (:class:`deltatune.api.Quantizer`).

    A quantizer replaces base-model layers by quantized ones in ``quantize`` before any delta method
    runs, and gives back a dense weight with ``dequantize_weight(module)`` so that merging and
    weight-dependent delta methods work on any quantized base. ``is_quantized(module)`` tells the core
    which modules it owns.
    """


@hookspec
def deltatune_register_evaluators(register: Register) -> None:
    """Register evaluators (:class:`deltatune.api.Evaluator`).

    ``evaluate(model, tokenizer, rows, cfg)`` returns a flat ``dict[str, float]`` of metrics (for
    example ``{"loss": 1.9, "perplexity": 6.7}``); keys are reported prefixed by the evaluator name.
    It must not train: the core calls it in eval mode under ``torch.no_grad``.
    """


@hookspec
def deltatune_register_optimizers(register: Register) -> None:
    """Register optimizer factories (:class:`deltatune.api.OptimizerFactory`).

    ``create(named_params, cfg, total_steps)`` returns ``(optimizer, scheduler_or_None)``. An
    optimizer whose update happens inside backward (LOMO) subclasses
    :class:`deltatune.api.InBackwardOptimizer` and its factory sets ``updates_in_backward = True``
    (as :class:`deltatune.api.InBackwardOptimizerFactory` does); the core then switches Lightning to
    manual optimisation and calls ``optimizer.step(closure=lambda: optimizer.backward_and_update(loss))``
    instead of ``backward`` + ``step``; trainer settings it cannot honour (gradient accumulation,
    trainer-side clipping, data parallelism, ``16-mixed``) are refused before training by
    ``InBackwardOptimizer.check_trainer_compatible``.
    """


@hookspec
def deltatune_register_model_families(register: Register) -> None:
    """Register model families (:class:`deltatune.api.ModelFamily`).

    A family tells the core what it needs to train one family of causal decoders exactly and fast:
    ``model_types`` (the ``config.model_type`` values it serves), ``unhandled(config)`` (why a config of
    those types is beyond it — an unknown rope type, say — or ``None``), ``logit_transform(config)``
    (what the model does to its LM head's output: soft-capping, scaling), and optionally a fast training
    forward. The core
    asks the family serving a model; a model none serves (or one its family does not handle) takes the
    generic path: the model's own forward, exact for every causal LM, with one line saying why.
    """
