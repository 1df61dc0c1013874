"""The virtual-token seam: tokens a delta method puts before every sequence (prefix-tuning, prompt tuning).

A method that changes the attention inputs instead of a linear layer builds a :class:`VirtualTokens`
module and attaches it with :func:`add_virtual_tokens`. The module gives, for a batch, either the
key/value pairs of every decoder layer for its ``length`` positions (prefix-tuning) or their input
embeddings (prompt tuning, P-tuning). The core applies them in one place: a forward pre-hook and a
forward hook on the model's decoder (``model.get_decoder()``), so every forward of the model — the
training loss, evaluation, ``model(...)`` and every step of ``model.generate`` — sees them:

* the first forward of a sequence starts its KV cache with the virtual tokens (a new cache, or the
  empty one ``generate`` passes; the cache is marked so later steps do not add them again);
* a 2-D attention mask gets ``length`` ones in front, and given ``cache_position`` / ``position_ids``
  move by ``length``: the real tokens sit at positions ``length, length + 1, …`` exactly as in PEFT;
* input embeddings are prepended to the sequence, and the decoder's output drops their positions, so
  outside the decoder (logits, labels, the loss) nothing changes shape: the virtual tokens carry no
  label and no logit.

Packed rows restart their positions per document, which a prefix shared by the whole row cannot
follow: a run with virtual tokens refuses packing before any weight loads (``adds_virtual_tokens`` of
the delta-method protocol), and no fast training forward takes such a model.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from deltatune.errors import ConfigError

HOLDER = "virtual_tokens"
"""The decoder's attribute holding the virtual tokens (an ``nn.ModuleDict`` by method name)."""

MARK = "deltatune_virtual_tokens"
"""The attribute of a KV cache that holds its virtual tokens' count (set when the seam filled it)."""


class VirtualTokens(nn.Module):
    """Tokens before every sequence, as one table ``length x width`` (:meth:`table`).

    The table is a parameter, or — with an ``encoder`` (prefix-tuning's reparameterisation MLP,
    P-tuning's prompt encoder) — computed from a ``length x encoder_width`` embedding by the encoder
    while training. A saved adapter holds the computed table only (under the key ``table``), and
    loading a table into a module with an encoder drops the encoder: a reloaded model uses the table,
    as PEFT does in inference mode. A subclass turns the table into what the decoder takes by
    overriding exactly one of :meth:`key_values` and :meth:`embeddings`; it is a submodule of the
    decoder, under ``virtual_tokens.<method name>``.
    """

    def __init__(self, length: int, width: int, encoder: nn.Module | None = None, encoder_width: int = 0) -> None:
        super().__init__()
        self.length = length
        self.width = width
        self.encoder = encoder
        if encoder is None:
            self.table_weight = nn.Parameter(torch.randn(length, width))
        else:
            self.embedding = nn.Parameter(torch.randn(length, encoder_width))

    def table(self) -> torch.Tensor:
        """The ``length x width`` table of the virtual tokens."""
        return self.table_weight if self.encoder is None else self.encoder(self.embedding)

    def load_table(self, table: torch.Tensor) -> None:
        """Hold ``table`` as the tokens' parameter from now on (an encoder is dropped)."""
        if tuple(table.shape) != (self.length, self.width):
            raise ConfigError(f"virtual-token table of shape {tuple(table.shape)}, expected {(self.length, self.width)}")
        device = (self.table_weight if self.encoder is None else self.embedding).device
        if self.encoder is not None:
            del self.encoder, self.embedding
            self.encoder = None
        self.table_weight = nn.Parameter(table.detach().to(device=device, dtype=torch.float32).clone())

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        if self.encoder is not None and prefix + "table_weight" in state_dict:
            self.load_table(state_dict[prefix + "table_weight"])
        super()._load_from_state_dict(state_dict, prefix, *args)

    @property
    def enters_as_key_values(self) -> bool:
        """Whether these tokens enter as key/value pairs (a prefix in the KV cache) rather than as input
        embeddings."""
        return type(self).key_values is not VirtualTokens.key_values

    def key_values(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per decoder layer, ``(keys, values)`` of shape ``batch x kv_heads x length x head_dim``, or
        ``None`` when these tokens enter as embeddings."""
        return None

    def embeddings(self, batch_size: int) -> torch.Tensor | None:
        """Input embeddings ``batch x length x hidden``, or ``None`` when these tokens enter as keys
        and values."""
        return None


class TokenStartOptions(BaseModel):
    """Where virtual tokens start, an option set a virtual-token method's config inherits: at random,
    from the base's own representation of tokens drawn from its vocabulary (``vocab``), or of a text's
    tokens (``text``: ``init_text``, tokenized by ``tokenizer`` or the base's own). :func:`start_token_ids`
    gives the tokens; what the method takes of them (embeddings, keys and values) is its own."""

    model_config = ConfigDict(extra="forbid")

    init: Literal["random", "vocab", "text"] = Field("random", description="where the virtual tokens start: at "
                                                     "random, from tokens drawn from the vocabulary, or from init_text's tokens")
    init_text: str | None = Field(None, description="with init: text, the text whose tokens start the virtual tokens")
    tokenizer: str | None = Field(None, description="with init: text, the tokenizer (folder or name) of init_text; "
                                  "unset: the base model's folder")

    @model_validator(mode="after")
    def _text_given(self) -> TokenStartOptions:
        if self.init == "text" and not self.init_text:
            raise ValueError("init: text needs init_text")
        return self


def start_token_ids(model: nn.Module, cfg: TokenStartOptions, length: int, method: str) -> torch.Tensor | None:
    """The ``length`` token ids virtual tokens of ``method`` start from (``cfg.init``): ``init_text``'s
    tokens repeated or cut to ``length`` (as PEFT's ``prompt_tuning_init_text``), or ids drawn uniformly
    from the vocabulary with torch's generator (seeded runs draw the same); ``None`` for ``init: random``."""
    if cfg.init == "random":
        return None
    if cfg.init == "vocab":
        return torch.randint(0, model.get_input_embeddings().num_embeddings, (length,))
    from transformers import AutoTokenizer

    source = cfg.tokenizer or getattr(model.config, "_name_or_path", "")
    if not source:
        raise ConfigError(f"{method}: init: text needs a tokenizer; set the option tokenizer (a folder or name)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{method}: cannot load the tokenizer {source!r} for init_text ({exc}); set the "
                          "option tokenizer") from None
    ids = tokenizer(cfg.init_text)["input_ids"]
    return torch.tensor((ids * -(-length // len(ids)))[:length])


def own_key_values(model: nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per decoder layer of ``model``, the keys and values (``kv_heads x len(ids) x head_dim``, fp32) its
    frozen decoder computes for tokens ``ids`` at positions ``0, 1, …``: a prefix holding them makes
    every sequence read as if it followed those tokens (Li & Liang's initialisation from real words'
    activations). ``None`` on a skeleton (no weight values to compute with)."""
    decoder = model.get_decoder()
    weight = decoder.get_input_embeddings().weight
    if weight.device.type == "meta":
        return None
    was_training = decoder.training
    decoder.eval()
    try:
        with torch.no_grad():
            cache = decoder(input_ids=ids[None].to(weight.device), use_cache=True).past_key_values
    finally:
        decoder.train(was_training)
    return [(layer.keys[0].float(), layer.values[0].float()) for layer in cache.layers]


class VirtualTokenMethod:
    """The :class:`~deltatune.plugin.protocols.DeltaMethod` protocol for methods made of one
    :class:`VirtualTokens` module (prefix-tuning, prompt tuning): a subclass sets ``name``, ``Config``
    and ``peft_type`` and writes :meth:`make_tokens` (and ``peft_config``). Such a method is not
    mergeable (virtual tokens are no weight update); its PEFT checkpoint is PEFT's
    ``prompt_embeddings``, the computed table."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]
    supports_quantized: ClassVar[bool] = True
    mergeable: ClassVar[bool] = False
    adds_virtual_tokens: ClassVar[bool] = True

    def make_tokens(self, model: nn.Module, cfg: BaseModel) -> VirtualTokens:
        """The virtual tokens this method puts before every sequence of ``model``."""
        raise NotImplementedError

    def apply(self, model: nn.Module, cfg: BaseModel) -> None:
        """Attach this method's virtual tokens to ``model``'s decoder (a second method's are refused
        before this one's are made: they may compute with the model)."""
        refuse_second(model.get_decoder(), self.name)
        add_virtual_tokens(model, self.name, self.make_tokens(model, cfg))

    def trainable(self, name: str, param: nn.Parameter) -> bool:
        """Claims every parameter under ``virtual_tokens.<name>.``."""
        return f"{HOLDER}.{self.name}." in name

    def merge(self, model: nn.Module) -> None:
        """Refused: virtual tokens cannot be folded into the base weights."""
        raise ConfigError(f"delta method '{self.name}' puts virtual tokens before every sequence, which no weight "
                          "of the base can hold: it cannot be merged; keep the adapter bundle or export it to PEFT")

    def unmerge(self, model: nn.Module) -> None:
        """Nothing to undo (:meth:`merge` is refused)."""

    def _tokens(self, model: nn.Module) -> tuple[str, VirtualTokens]:
        decoder = model.get_decoder()
        path = next(name for name, module in model.named_modules() if module is decoder)
        return f"{path}.{HOLDER}.{self.name}." if path else f"{HOLDER}.{self.name}.", getattr(decoder, HOLDER)[self.name]

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The computed table (an encoder is dropped at save), by model key."""
        prefix, tokens = self._tokens(model)
        return {prefix + "table_weight": tokens.table().detach()}

    def peft_config(self, cfg: BaseModel) -> dict[str, Any] | None:
        """No PEFT equivalent unless a subclass says otherwise."""
        return None

    def peft_state_dict(self, model: nn.Module, cfg: BaseModel) -> dict[str, torch.Tensor]:
        """PEFT's checkpoint of a prompt-learning adapter: the computed table as ``prompt_embeddings``."""
        return {"prompt_embeddings": self._tokens(model)[1].table().detach()}

    def load_peft_state_dict(self, model: nn.Module, cfg: BaseModel, state: dict[str, torch.Tensor]) -> None:
        """Load PEFT's ``prompt_embeddings`` as the table (an encoder is dropped)."""
        if "prompt_embeddings" not in state:
            raise ConfigError(f"{self.name}: the PEFT checkpoint has no 'prompt_embeddings' tensor")
        try:
            self._tokens(model)[1].load_table(state["prompt_embeddings"])
        except ConfigError as exc:
            raise ConfigError(f"{self.name}: PEFT 'prompt_embeddings': {exc}") from None


def virtual_tokens(model: nn.Module) -> VirtualTokens | None:
    """The virtual tokens attached to ``model``'s decoder, or ``None``."""
    getter = getattr(model, "get_decoder", None)
    return virtual_tokens_of(getter()) if callable(getter) else None


def virtual_tokens_of(decoder: nn.Module) -> VirtualTokens | None:
    """The virtual tokens attached to ``decoder``, or ``None``."""
    holder = getattr(decoder, HOLDER, None)
    return next(iter(holder.values()), None) if isinstance(holder, nn.ModuleDict) else None


def add_virtual_tokens(model: nn.Module, method: str, tokens: VirtualTokens) -> None:
    """Attach ``tokens`` of the delta method ``method`` to ``model``'s decoder and hook the decoder so
    every forward applies them; one method per model (a second is a :class:`ConfigError` naming both)."""
    decoder = model.get_decoder()
    refuse_second(decoder, method)
    setattr(decoder, HOLDER, nn.ModuleDict({method: tokens}))
    parameters = list(inspect.signature(decoder.forward).parameters)
    decoder._virtual_arguments = parameters  # names of positional arguments, and of the cache (`cache` or, older, `past_key_values`)
    decoder.register_forward_pre_hook(_before_decoder, with_kwargs=True)
    decoder.register_forward_hook(_after_decoder, with_kwargs=True)


def refuse_second(decoder: nn.Module, method: str) -> None:
    """Raise :class:`ConfigError` naming both methods when ``decoder`` already has virtual tokens."""
    holder = getattr(decoder, HOLDER, None)
    if isinstance(holder, nn.ModuleDict) and len(holder):
        raise ConfigError(f"delta methods '{next(iter(holder))}' and '{method}' both put virtual tokens before "
                          "every sequence; use one of them")


def check_checkpointing(decoder: nn.Module, method: str, enabled: bool | None = None) -> None:
    """Raise :class:`ConfigError` when ``decoder`` trains with gradient checkpointing (``enabled``, or its
    current state) and its virtual tokens of ``method`` enter as keys and values: checkpointed layers run
    without the KV cache that holds them."""
    if enabled is None:
        enabled = bool(getattr(decoder, "gradient_checkpointing", False)) and decoder.training and torch.is_grad_enabled()
    tokens = virtual_tokens_of(decoder)
    if enabled and tokens is not None and tokens.enters_as_key_values:
        raise ConfigError(f"delta method '{method}' puts key/value prefixes in the KV cache, which layers under "
                          "gradient checkpointing run without; set gradient_checkpointing: false")


def _compute_dtype(decoder: nn.Module) -> torch.dtype:
    device = decoder.get_input_embeddings().weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return decoder.get_input_embeddings().weight.dtype


def _before_decoder(decoder: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    tokens: VirtualTokens = next(iter(getattr(decoder, HOLDER).values()))
    names = decoder._virtual_arguments
    if args:
        kwargs = {**dict(zip(names, args)), **kwargs}
    cache_key = "cache" if "cache" in names else "past_key_values"
    length = tokens.length
    inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    batch = inputs.shape[0]
    cache = kwargs.get(cache_key)
    prepended = 0
    if getattr(cache, MARK, None) != length:
        if cache is not None and cache.get_seq_length() > 0:
            raise ConfigError("a KV cache filled outside deltatune cannot take virtual tokens; "
                              "start from an empty cache")
        if tokens.enters_as_key_values:
            check_checkpointing(decoder, next(iter(getattr(decoder, HOLDER))))
            if cache is None:
                from transformers import DynamicCache

                cache = DynamicCache(config=decoder.config)
            dtype = _compute_dtype(decoder)
            for index, (keys, values) in enumerate(tokens.key_values(batch)):
                cache.update(keys.to(dtype), values.to(dtype), index)
        else:
            embeddings = tokens.embeddings(batch)
            if kwargs.get("inputs_embeds") is None:
                kwargs["inputs_embeds"] = decoder.get_input_embeddings()(kwargs["input_ids"])
            kwargs["input_ids"] = None
            embeds = kwargs["inputs_embeds"]
            kwargs["inputs_embeds"] = torch.cat([embeddings.to(embeds.dtype), embeds], dim=1)
            prepended = length
        if cache is not None:
            setattr(cache, MARK, length)
        kwargs[cache_key] = cache
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, length), mask], dim=1)
    for key in ("cache_position", "position_ids"):
        positions = kwargs.get(key)
        if isinstance(positions, torch.Tensor):
            shifted = positions + length
            if prepended:
                front = torch.arange(length, device=positions.device, dtype=positions.dtype)
                shifted = torch.cat([front.expand(*positions.shape[:-1], length), shifted], dim=-1)
            kwargs[key] = shifted
    decoder._virtual_prepended = prepended
    return (), kwargs


def _after_decoder(decoder: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    prepended, decoder._virtual_prepended = getattr(decoder, "_virtual_prepended", 0), 0
    if prepended:
        output.last_hidden_state = output.last_hidden_state[:, prepended:]
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(h[:, prepended:] for h in output.hidden_states)
    return output
