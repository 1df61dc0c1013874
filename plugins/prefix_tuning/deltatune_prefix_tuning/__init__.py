"""Prefix-tuning (Li & Liang, 2021): trainable key/value prefixes in every attention layer.

Every decoder layer attends, before the real tokens, to ``num_virtual_tokens`` positions whose keys
and values are trained (the base stays frozen). The prefixes are one table ``num_virtual_tokens x
(layers * 2 * kv_heads * head_dim)`` laid out as PEFT's ``PREFIX_TUNING`` (keys and values of layer
``i`` are rows ``2i`` and ``2i + 1`` of the second axis), so the adapter exports to PEFT and PEFT
computes the same logits. With ``prefix_projection`` the table is computed while training by a
reparameterisation MLP (embedding → Linear → tanh → Linear), which the paper finds more stable; the
adapter saves the computed table only, and a reloaded model uses it directly.

Where the prefixes start matters: random keys and values (PEFT's start) look like nothing the base's
attention has seen, and on a small model they swamp the real tokens (SmolLM2-135M's validation loss
rises from 2.4 to 10 before the first step). By default (``init: vocab``) the table starts as the
base's own keys and values of tokens drawn from its vocabulary, as if every sequence followed a few
real words (Li & Liang's initialisation from real words' activations), and ``init: text`` takes a
given text's tokens instead; ``prefix_projection`` starts from its MLP's output (``init: random``).

deltatune's virtual-token seam (``deltatune.api.VirtualTokens``) puts the prefix into every forward:
training, evaluation and every prompt's KV cache in generation; the real tokens take positions
``num_virtual_tokens, …`` as in PEFT. Packing is refused (a prefix cannot follow positions that
restart per packed document), the exact generic forward is used, and a merged export is refused
(a prefix is no weight update). ``init_from: FOLDER`` starts from a PEFT ``PREFIX_TUNING`` adapter.

Usage::

    delta:
      - {name: prefix_tuning, config: {num_virtual_tokens: 16, prefix_projection: true}}
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, Field, model_validator
from torch import nn

from deltatune.api import TokenStartOptions, VirtualTokenMethod, VirtualTokens, hookimpl, own_key_values, start_token_ids

__all__ = ["Prefix", "PrefixTuning", "PrefixTuningConfig"]
__version__ = "0.1.0"


class PrefixTuningConfig(TokenStartOptions):
    """Options of the ``prefix_tuning`` delta method."""

    init: Literal["random", "vocab", "text"] | None = Field(
        None, description="where the prefixes start: the base's keys/values of tokens drawn from the vocabulary "
        "(vocab) or of init_text's tokens (text), or random; unset: vocab, random with prefix_projection")
    num_virtual_tokens: int = Field(20, ge=1, description="prefix length: key/value positions added to every layer")
    prefix_projection: bool = Field(False, description="compute the prefixes with a reparameterisation MLP while "
                                    "training (saved as the computed prefixes)")
    encoder_hidden_size: int | None = Field(None, ge=1, description="hidden width of the reparameterisation MLP; "
                                            "unset: the key/value width of one layer (PEFT's default)")
    init_from: str | None = Field(None, description="a PEFT PREFIX_TUNING adapter folder to start from")

    @model_validator(mode="after")
    def _start(self) -> PrefixTuningConfig:
        if self.init is None:
            self.init = "random" if self.prefix_projection else "vocab"
        if self.prefix_projection and self.init != "random":
            raise ValueError(f"init: {self.init} sets the prefixes themselves, which prefix_projection computes with "
                             "its MLP: use init: random with prefix_projection")
        return self


class Prefix(VirtualTokens):
    """The key/value prefixes of every decoder layer, as PEFT lays them out."""

    def __init__(self, config: Any, cfg: PrefixTuningConfig, start: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self.layers = config.num_hidden_layers
        self.kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        token_dim = self.kv_heads * self.head_dim
        width = self.layers * 2 * token_dim
        encoder = None
        if cfg.prefix_projection:
            hidden = cfg.encoder_hidden_size or token_dim
            encoder = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        super().__init__(cfg.num_virtual_tokens, width, encoder, token_dim)
        if start is not None:
            with torch.no_grad():
                self.table_weight.copy_(self.as_table(start))

    def as_table(self, key_values: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Per-layer ``(keys, values)`` (``kv_heads x length x head_dim``) as one ``length x width`` table."""
        stacked = torch.stack([t for pair in key_values for t in pair])  # layers*2 x kv_heads x length x head_dim
        return stacked.permute(2, 0, 1, 3).reshape(self.length, self.width)

    def key_values(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        table = self.table().view(self.length, self.layers * 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        table = table.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)
        return [(table[2 * i], table[2 * i + 1]) for i in range(self.layers)]


class PrefixTuning(VirtualTokenMethod):
    """Prefix-tuning as a deltatune delta method."""

    name: ClassVar[str] = "prefix_tuning"
    Config: ClassVar[type[BaseModel]] = PrefixTuningConfig
    peft_fields: ClassVar[dict[str, str]] = {"num_virtual_tokens": "num_virtual_tokens",
                                             "prefix_projection": "prefix_projection",
                                             "encoder_hidden_size": "encoder_hidden_size"}
    reads_peft: ClassVar[dict[str, Any]] = {"peft_type": "PREFIX_TUNING"}

    def make_tokens(self, model: nn.Module, cfg: PrefixTuningConfig) -> Prefix:
        """The prefixes for ``model``'s decoder layers, starting as ``cfg.init`` says."""
        ids = start_token_ids(model, cfg, cfg.num_virtual_tokens, self.name)
        start = own_key_values(model, ids) if ids is not None else None
        return Prefix(model.get_decoder().config, cfg, start)

    def peft_config(self, cfg: PrefixTuningConfig) -> dict[str, Any]:
        """PEFT's ``PREFIX_TUNING`` config (PEFT derives layers, heads and widths from the base)."""
        config: dict[str, Any] = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": cfg.num_virtual_tokens,
                                  "prefix_projection": cfg.prefix_projection}
        if cfg.encoder_hidden_size is not None:
            config["encoder_hidden_size"] = cfg.encoder_hidden_size
        return config


@hookimpl
def deltatune_register_delta_methods(register):
    register(PrefixTuning)
