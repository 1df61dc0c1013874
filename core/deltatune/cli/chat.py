"""``deltatune generate`` (completions of prompts, batched) and ``deltatune chat`` (an interactive,
streamed, multi-turn conversation), both from a base model and an optional adapter, greedy or sampled."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from deltatune.errors import ConfigError, DataError, check_option

TRUST_HELP = "allow the base model's own Python code (needed for an adapter trained with trust_remote_code)"
CHAT_HELP = """Type a message and press Enter; the answer streams as it is generated. Every turn so far is
sent with the next one, formatted with the model's chat template. /reset starts over (the system
message stays), /exit or Ctrl-D ends; Ctrl-C stops an answer being generated."""


def template_kwargs(text: str | None) -> dict[str, Any]:
    """The ``--chat_template_kwargs`` JSON object (``{}`` when not given)."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--chat_template_kwargs is not valid JSON ({exc.msg} at column {exc.colno}): {text!r}") from None
    check_option("--chat_template_kwargs", text, isinstance(value, dict),
                 'must be a JSON object, e.g. \'{"enable_thinking": false}\'')
    return value


def read_prompts(path: Path) -> list[str]:
    """The prompts of a ``--prompts_file``: JSON lines with a ``prompt`` string (``.jsonl``), or else one
    prompt per non-blank line of text; a bad line is a :class:`DataError` naming the file and line."""
    from deltatune.data.module import decode_line, read_jsonl

    if path.suffix in (".jsonl", ".json") or path.name.endswith(".jsonl.gz"):
        prompts = []
        for line, record in read_jsonl(path):
            if not isinstance(record.get("prompt"), str) or not record["prompt"]:
                raise DataError(f"{path}:{line}: no non-empty string 'prompt' (keys: {sorted(record)})")
            prompts.append(record["prompt"])
        return prompts
    if not path.is_file():
        raise DataError(f"prompts file not found: {path}")
    lines = [decode_line(raw, path, n) for n, raw in enumerate(path.read_bytes().splitlines(), start=1)]
    return [line for line in lines if line.strip()]


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keywords of :func:`deltatune.model.generation.generate` the flags set, checked."""
    check_option("--max_new_tokens", args.max_new_tokens, args.max_new_tokens >= 1, "must be at least 1")
    check_option("--temperature", args.temperature, args.temperature >= 0, "must be >= 0 (0: greedy)")
    check_option("--top_p", args.top_p, 0 < args.top_p <= 1, "must be in (0, 1]")
    check_option("--top_k", args.top_k, args.top_k >= 0, "must be >= 0 (0: no limit)")
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "seed": args.seed}


def load_for_generation(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model (base + ``--adapter``, or ``--base`` alone) and its tokenizer."""
    from deltatune.io.adapter import load_adapter
    from deltatune.model.loading import DEFAULT_MODEL, load_base, load_tokenizer

    if args.adapter:
        model, resolved = load_adapter(Path(args.adapter), base=args.base, trust_remote_code=args.trust_remote_code)
        return model, load_tokenizer(resolved.spec.base, args.trust_remote_code)
    return load_base(args.base or DEFAULT_MODEL, trust_remote_code=args.trust_remote_code)


def cmd_generate(args: argparse.Namespace) -> None:
    """Print the completion of every prompt in order (with ``--jsonl``, one JSON object per line),
    generated in batches."""
    from deltatune.model.generation import chat_prompt, generate

    prompts = list(args.prompt or [])
    for number, prompt in enumerate(prompts, start=1):
        check_option(f"--prompt #{number}", prompt, bool(prompt), "is empty: there is nothing to continue")
    if args.prompts_file:
        prompts += read_prompts(Path(args.prompts_file))
    if not prompts:
        raise ConfigError("generate needs --prompt TEXT (repeatable) or --prompts_file FILE")
    check_option("--batch_size", args.batch_size, args.batch_size >= 1, "must be at least 1")
    options, kwargs = sampling_options(args), template_kwargs(args.chat_template_kwargs)
    model, tokenizer = load_for_generation(args)
    rendered = [p if args.raw else chat_prompt(tokenizer, p, kwargs) for p in prompts]
    for prompt, completion in zip(prompts, generate(model, tokenizer, rendered, batch_size=args.batch_size, **options)):
        print(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False) if args.jsonl else completion)


def cmd_chat(args: argparse.Namespace) -> None:
    """Chat with the model in the terminal until ``/exit`` or the end of input."""
    from deltatune.model.generation import ChatSession
    from deltatune.ui.console import console

    options, kwargs = sampling_options(args), template_kwargs(args.chat_template_kwargs)
    model, tokenizer = load_for_generation(args)
    session = ChatSession(model, tokenizer, system=args.system, template_kwargs=kwargs, **options)
    console.print(f"[dim]chatting with {args.adapter or args.base or 'the default model'}: "
                  "/reset starts over, /exit or Ctrl-D ends[/dim]", highlight=False)

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    while True:
        try:
            text = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            console.print("[dim](conversation reset)[/dim]")
            continue
        if not text:
            continue
        if args.show_prompt:
            print(session.prompt(text), file=sys.stderr, flush=True)
        try:
            session.reply(text, on_text=show)
        except KeyboardInterrupt:
            console.print("[dim](answer stopped; it is not kept)[/dim]")
        print(flush=True)


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The flags ``generate`` and ``chat`` share: model, adapter, sampling and chat template options."""
    parser.add_argument("--adapter", help="adapter folder written by fit (default: the base model alone)")
    parser.add_argument("--base", help="base model (default: the adapter's; the embedded SmolLM2 without an adapter)")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=max_new_tokens,
                        help=f"most tokens generated per answer (default {max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 (default) is greedy decoding")
    parser.add_argument("--top_p", "--top-p", type=float, default=1.0,
                        help="nucleus sampling: sample from the most likely tokens whose probabilities sum to "
                             "this (default 1.0: all)")
    parser.add_argument("--top_k", "--top-k", type=int, default=0,
                        help="sample from the k most likely tokens only (default 0: no limit)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the sampling: the same seed gives the same text (default 0)")
    parser.add_argument("--chat_template_kwargs", "--chat-template-kwargs", metavar="JSON",
                        help='extra variables for the chat template, e.g. \'{"enable_thinking": false}\' (Qwen3)')
    parser.add_argument("--trust_remote_code", "--trust-remote-code", action="store_true", help=TRUST_HELP)


def add_parsers(sub: Any) -> None:
    """Add the ``generate`` and ``chat`` subcommands to the ``deltatune`` command's subparsers."""
    gen = sub.add_parser("generate", help="complete prompts with a base model and an adapter (batched)",
                         description="Print the completion of each prompt, one per line, in order.")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--prompts_file", "--prompts-file", metavar="FILE",
                     help="more prompts: JSON lines with a 'prompt' field (.jsonl) or one prompt per line (text)")
    gen.add_argument("--batch_size", "--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--jsonl", action="store_true",
                     help='print {"prompt": ..., "completion": ...} per line (a completion may span lines otherwise)')
    add_sampling_arguments(gen, max_new_tokens=64)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="chat with a base model and an adapter in the terminal (streamed, multi-turn)",
                          description=CHAT_HELP)
    chat.add_argument("--system", help="system message that opens the conversation")
    chat.add_argument("--show_prompt", "--show-prompt", action="store_true",
                      help="print each rendered prompt (the whole conversation so far) to stderr before the answer")
    add_sampling_arguments(chat, max_new_tokens=512)
    chat.set_defaults(func=cmd_chat)
