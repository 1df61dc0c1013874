"""HumanEval pass@1 (greedy) of the embedded SmolLM2-135M-Instruct, as `deltatune fit` measures its base,
in each prompting mode (docs/data-and-evaluation.md quotes the result)::

    flock -x /tmp/deltatune-cpu.lock python benchmarks/humaneval.py --modes chat completion

``--adapter RUN/adapter`` measures a tuned model instead (its base from the adapter's manifest).

It runs model-written code in the ``humaneval`` sandbox (so it sets the opt-in itself). Completions
are cached (``$DELTATUNE_HOME/humaneval``): a second run only executes the tests again.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deltatune.io.adapter import load_adapter
from deltatune.model.assembly import build_model, resolve_spec
from deltatune.model.loading import load_tokenizer
from deltatune.plugin.resolve import PluginRef, resolve


def main() -> None:
    """Measure and print (and with ``--out``, write) pass@1 per mode."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--adapter", help="a saved adapter folder: measure the tuned model")
    parser.add_argument("--modes", nargs="+", default=["chat", "completion"], choices=["chat", "completion"])
    parser.add_argument("--limit", type=int, help="first N problems only")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=300)
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args()
    if args.adapter:
        model, resolved = load_adapter(Path(args.adapter))
        tokenizer = load_tokenizer(resolved.spec.base)
    else:
        model, tokenizer = build_model(resolve_spec({"base": args.base, "delta": []})), load_tokenizer(args.base)
    results = {}
    for mode in args.modes:
        config = {"allow_code_execution": True, "mode": mode, "limit": args.limit, "batch_size": args.batch_size,
                  "max_new_tokens": args.max_new_tokens, "per_problem": True}
        evaluator = resolve("evaluator", PluginRef(name="humaneval", config=config))
        start = time.perf_counter()
        with torch.no_grad():
            metrics = evaluator.plugin.evaluate(model.eval(), tokenizer, [], evaluator.cfg)
        seconds = time.perf_counter() - start
        results[mode] = {"metrics": metrics, "seconds": round(seconds, 1)}
        passed = sorted(k.rsplit(".", 1)[-1] for k, v in metrics.items() if k.startswith("passed.") and v)
        print(json.dumps({"mode": mode, f"pass@1.{mode}": metrics[f"pass@1.{mode}"], "problems": metrics["rows"],
                          "passed": passed, "seconds": round(seconds, 1)}), flush=True)
    if args.out:
        with open(args.out, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
