"""Prompt tuning (Lester et al., 2021) and P-tuning (Liu et al., 2021): trainable virtual-token embeddings.

Both put ``num_virtual_tokens`` embeddings before every sequence's input embeddings and train only
those (the base stays frozen):

* ``prompt_tuning`` trains the embeddings themselves, initialised at random (``init: random``), from
  the base's own embeddings of tokens drawn from its vocabulary (``init: vocab``, PEFT's
  ``SAMPLE_VOCAB``) or of a text (``init: text``, ``init_text``; PEFT's ``prompt_tuning_init_text``:
  the text's tokens, repeated or cut to the prompt's length);
* ``p_tuning`` computes them while training with a prompt encoder over a free embedding — an MLP
  (``encoder: mlp``, PEFT's three layers) or a bidirectional LSTM with an MLP head (``encoder: lstm``).
  The adapter saves the computed embeddings only, and a reloaded model uses them directly.

The embeddings are one table ``num_virtual_tokens x hidden``, saved as PEFT's ``prompt_embeddings``,
so the adapters export to PEFT's ``PROMPT_TUNING`` / ``P_TUNING`` and PEFT computes the same logits
for the real tokens. deltatune's virtual-token seam (``deltatune.api.VirtualTokens``) prepends them
in every forward — training, evaluation, every prompt in generation — and drops their positions from
the decoder's output, so labels and logits keep the real tokens' length (the virtual tokens carry no
label). Packing is refused, the exact generic forward is used, and a merged export is refused.
``init_from: FOLDER`` starts from a PEFT adapter of the method's type.

Usage::

    delta:
      - {name: prompt_tuning, config: {num_virtual_tokens: 8, init: text, init_text: "Answer the task:"}}
      - {name: p_tuning, config: {num_virtual_tokens: 8, encoder: lstm}}
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from deltatune.api import TokenStartOptions, VirtualTokenMethod, VirtualTokens, hookimpl, start_token_ids

__all__ = ["PTuning", "PTuningConfig", "PromptEmbeddings", "PromptTuning", "PromptTuningConfig"]
__version__ = "0.1.0"


class PromptOptions(BaseModel):
    """Options both methods share."""

    model_config = ConfigDict(extra="forbid")

    num_virtual_tokens: int = Field(20, ge=1, description="virtual tokens put before every sequence")
    init_from: str | None = Field(None, description="a PEFT adapter folder of this method's type to start from")


class PromptTuningConfig(TokenStartOptions, PromptOptions):
    """Options of the ``prompt_tuning`` delta method (``init``: random, PEFT's default, or the base's own
    embeddings of vocabulary tokens or of ``init_text``'s tokens)."""


class PTuningConfig(PromptOptions):
    """Options of the ``p_tuning`` delta method."""

    encoder: Literal["mlp", "lstm"] = Field("mlp", description="the prompt encoder: an MLP, or a bidirectional LSTM "
                                            "with an MLP head")
    encoder_hidden_size: int | None = Field(None, ge=1, description="the encoder's hidden width; unset: the model's "
                                            "hidden size")
    encoder_num_layers: int = Field(2, ge=1, description="LSTM layers (encoder: lstm)")
    encoder_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout between LSTM layers (encoder: lstm)")


class LSTMEncoder(nn.Module):
    """P-tuning's LSTM prompt encoder: a bidirectional LSTM over the embeddings, then an MLP head."""

    def __init__(self, width: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.lstm = nn.LSTM(width, hidden, num_layers=layers, dropout=dropout if layers > 1 else 0.0,
                            bidirectional=True, batch_first=True)
        self.head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, width))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(embedding.unsqueeze(0))[0]).squeeze(0)


class PromptEmbeddings(VirtualTokens):
    """Virtual tokens that enter as input embeddings."""

    def embeddings(self, batch_size: int) -> torch.Tensor:
        return self.table().unsqueeze(0).expand(batch_size, -1, -1)


class PromptTuning(VirtualTokenMethod):
    """Prompt tuning as a deltatune delta method."""

    name: ClassVar[str] = "prompt_tuning"
    Config: ClassVar[type[BaseModel]] = PromptTuningConfig
    peft_fields: ClassVar[dict[str, str]] = {"num_virtual_tokens": "num_virtual_tokens"}
    reads_peft: ClassVar[dict[str, Any]] = {"peft_type": "PROMPT_TUNING"}

    def make_tokens(self, model: nn.Module, cfg: PromptTuningConfig) -> PromptEmbeddings:
        """Embeddings of the model's width, random or the base's embeddings of the start tokens."""
        embedding = model.get_input_embeddings().weight
        ids = start_token_ids(model, cfg, cfg.num_virtual_tokens, self.name)
        tokens = PromptEmbeddings(cfg.num_virtual_tokens, embedding.shape[1])
        if ids is not None and embedding.device.type != "meta":  # a skeleton has no values to start from
            with torch.no_grad():
                tokens.table_weight.copy_(embedding.detach()[ids.to(embedding.device)].float())
        return tokens

    def peft_config(self, cfg: PromptTuningConfig) -> dict[str, Any]:
        """PEFT's ``PROMPT_TUNING`` config; the trained embeddings make the initialisation irrelevant, so
        it says ``RANDOM`` (PEFT's ``TEXT`` would need the tokenizer at load time)."""
        return {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": cfg.num_virtual_tokens,
                "prompt_tuning_init": "RANDOM"}


class PTuning(VirtualTokenMethod):
    """P-tuning as a deltatune delta method."""

    name: ClassVar[str] = "p_tuning"
    Config: ClassVar[type[BaseModel]] = PTuningConfig
    peft_fields: ClassVar[dict[str, str]] = {"num_virtual_tokens": "num_virtual_tokens"}
    reads_peft: ClassVar[dict[str, Any]] = {"peft_type": "P_TUNING"}

    def make_tokens(self, model: nn.Module, cfg: PTuningConfig) -> PromptEmbeddings:
        """Embeddings computed by the prompt encoder over a free embedding of the model's width."""
        width = model.get_input_embeddings().embedding_dim
        hidden = cfg.encoder_hidden_size or width
        if cfg.encoder == "lstm":
            encoder: nn.Module = LSTMEncoder(width, hidden, cfg.encoder_num_layers, cfg.encoder_dropout)
        else:
            encoder = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                    nn.Linear(hidden, width))
        return PromptEmbeddings(cfg.num_virtual_tokens, width, encoder, width)

    def peft_config(self, cfg: PTuningConfig) -> dict[str, Any]:
        """PEFT's ``P_TUNING`` config (PEFT loads the computed embeddings, without the encoder)."""
        config: dict[str, Any] = {"peft_type": "P_TUNING", "num_virtual_tokens": cfg.num_virtual_tokens,
                                  "encoder_reparameterization_type": cfg.encoder.upper(),
                                  "encoder_num_layers": cfg.encoder_num_layers, "encoder_dropout": cfg.encoder_dropout}
        if cfg.encoder_hidden_size is not None:
            config["encoder_hidden_size"] = cfg.encoder_hidden_size
        return config


@hookimpl
def deltatune_register_delta_methods(register):
    register(PromptTuning)
    register(PTuning)
