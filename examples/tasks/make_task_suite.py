#!/usr/bin/env python3
"""Deterministic generator of a small suite of *verifiable* instruction tasks.

The suite is meant for quick delta-tuning experiments with a tiny instruct
model (e.g. SmolLM2-135M-Instruct) on a couple of CPU cores: every prompt is
short and every answer is a short string that can be checked exactly.

Usage (stdlib only)::

    python examples/tasks/make_task_suite.py --out examples/data --seed 0

Families used for training: reverse, sort, add, extract_city, choice,
json_format.  Held-out families (only in ``tasks-heldout*.jsonl``): uppercase,
count.  See ``examples/tasks/README.md`` for the row formats.

Determinism: every random choice comes from ``random.Random`` instances seeded
with strings derived from ``--seed`` (string seeds are hashed with SHA-512 by
:mod:`random`, so they do not depend on ``PYTHONHASHSEED``).  Files are written
as UTF-8 with ``\\n`` line endings, so the output is byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

TRAIN_FAMILIES: tuple[str, ...] = (
    "reverse",
    "sort",
    "add",
    "extract_city",
    "choice",
    "json_format",
)
HELDOUT_FAMILIES: tuple[str, ...] = ("uppercase", "count")

#: Rows per family in each split (6 train families -> 1200 / 96 / 96 rows).
TRAIN_PER_FAMILY = 200
VALIDATION_PER_FAMILY = 16
TEST_PER_FAMILY = 16
#: Rows per held-out family (2 families -> 256 rows; one row is 0.8 points of its family).
#: Every family draws from its own RNG stream, so changing this changes only the held-out files, and
#: the rows of a smaller held-out split are all in a larger one (in another order).
HELDOUT_PER_FAMILY = 128
#: Rows of each of ``add`` and ``reverse`` exported to the fields CSV.
FIELDS_CSV_PER_FAMILY = 100
#: Fraction of chat rows that get a system message.
SYSTEM_FRACTION = 0.3

SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a precise assistant. Reply with the answer only.",
    "You are a concise assistant that follows instructions exactly.",
    "Answer briefly and exactly.",
)

#: Common, unambiguous lower-case English words for the word-list tasks.
COMMON_WORDS: tuple[str, ...] = (
    "apple", "river", "chair", "cloud", "green", "house", "table", "music",
    "stone", "light", "water", "dream", "bread", "smile", "garden", "window",
    "summer", "winter", "paper", "pencil", "ocean", "forest", "mountain",
    "yellow", "silver", "candle", "basket", "rabbit", "tiger", "horse",
    "violin", "guitar", "coffee", "sugar", "honey", "lemon", "butter",
    "market", "street", "bridge", "castle", "planet", "rocket", "island",
    "flower", "tree", "blue", "book", "door", "lamp", "moon", "star", "sun",
    "rain", "snow", "wind", "fire", "sand", "ship", "train", "road", "city",
    "field", "farm", "bird", "fish", "dog", "cat", "mouse", "lion", "bear",
    "wolf", "fox", "owl", "duck", "goat", "sheep", "cow", "milk", "cheese",
    "salt", "rice", "soup", "cake", "tea", "cup", "plate", "spoon", "knife",
    "fork", "bottle", "glass", "shirt", "shoe", "hat", "coat", "bag", "box",
    "clock", "phone", "radio", "camera", "ticket", "letter", "story", "song",
    "game", "ball", "kite", "boat", "wheel", "engine", "school", "teacher",
    "doctor", "friend", "family", "baby", "king", "queen", "child", "voice",
    "heart", "hand", "eye", "face", "hill", "lake", "beach", "valley",
    "desert", "jungle", "meadow", "pillow", "blanket", "mirror", "ladder",
    "tunnel", "harbor", "orange", "purple", "quiet", "happy", "brave",
    "gentle", "bright", "simple", "early", "little", "warm", "cold",
)

#: Disjoint word categories for the multiple-choice family: (noun phrase, words).
CATEGORIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "fruit": ("a fruit", (
        "apple", "banana", "cherry", "grape", "mango", "pear", "peach",
        "plum", "lemon", "melon", "kiwi", "apricot")),
    "animal": ("an animal", (
        "dog", "cat", "horse", "tiger", "rabbit", "lion", "zebra", "monkey",
        "elephant", "wolf", "bear", "fox")),
    "color": ("a color", (
        "red", "blue", "green", "yellow", "purple", "pink", "brown", "black",
        "white", "gray")),
    "vehicle": ("a vehicle", (
        "car", "bus", "truck", "bicycle", "train", "airplane", "boat",
        "motorcycle", "tractor", "scooter")),
    "instrument": ("a musical instrument", (
        "piano", "guitar", "violin", "drum", "flute", "trumpet", "harp",
        "cello", "saxophone", "clarinet")),
    "furniture": ("a piece of furniture", (
        "chair", "table", "sofa", "bed", "desk", "shelf", "wardrobe",
        "stool", "dresser", "bench")),
    "body_part": ("a body part", (
        "hand", "foot", "knee", "elbow", "shoulder", "ear", "nose", "finger",
        "ankle", "wrist")),
    "tool": ("a tool", (
        "hammer", "wrench", "screwdriver", "saw", "drill", "chisel",
        "pliers", "shovel", "rake", "axe")),
    "vegetable": ("a vegetable", (
        "carrot", "potato", "onion", "cabbage", "spinach", "broccoli",
        "lettuce", "celery", "radish", "turnip")),
}

#: First names chosen so that none of them is also a city name.
PERSON_NAMES: tuple[str, ...] = (
    "Ann", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hiro",
    "Ines", "James", "Kofi", "Lena", "Marco", "Nadia", "Omar", "Priya",
    "Quinn", "Rosa", "Sam", "Tomas", "Uma", "Victor", "Wen", "Yara", "Zoe",
    "Liam", "Mia", "Noah", "Olga", "Pablo",
)

CITIES: tuple[str, ...] = (
    "Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Lima",
    "Oslo", "Dublin", "Vienna", "Prague", "Seoul", "Toronto", "Chicago",
    "Boston", "Sydney", "Mumbai", "Nairobi", "Lisbon", "Athens", "Warsaw",
    "Istanbul", "Bangkok", "Denver", "Montreal", "Helsinki", "Stockholm",
    "Amsterdam", "New York", "San Francisco", "Buenos Aires", "Mexico City",
    "Cape Town", "Hong Kong",
)

JOBS: tuple[str, ...] = (
    "teacher", "nurse", "baker", "engineer", "pilot", "chef", "lawyer",
    "doctor", "painter", "writer", "farmer", "musician", "architect",
    "dentist", "editor",
)

#: Sentences about a person; ``{job_a}`` is the job with its article.
CITY_SENTENCES: tuple[str, ...] = (
    "{name} moved to {city} last year to work as {job_a}.",
    "After growing up in {city}, {name} became {job_a}.",
    "{name} is {job_a} who lives in {city}.",
    "Last summer, {name} visited {city} with a few old friends.",
    "{name} works as {job_a} in {city} and loves to cook.",
    "Every morning, {name} walks to a small cafe in {city}.",
    "{name} was born in {city} and now works as {job_a}.",
    "When {name} retired, the family settled in {city}.",
)

# Instruction templates: (template, mode).  ``mode == "inline"`` means the
# variable content ``{x}`` is inlined in the instruction and ``input`` is
# empty; ``mode == "input"`` means the instruction is fixed text and the
# variable content goes to ``input``.  Inline payloads are either quoted or
# follow the last ": " of the instruction, so they can be parsed back.
Template = tuple[str, str]

TEMPLATES: dict[str, tuple[Template, ...]] = {
    "reverse": (
        ("Reverse the order of these words: {x}", "inline"),
        ("Write these words in reverse order: {x}", "inline"),
        ('List the words "{x}" from last to first.', "inline"),
        ("Reverse the order of the words below.", "input"),
        ("Rewrite this list of words backwards, keeping each word intact.", "input"),
        ("Put these words in reverse order.", "input"),
    ),
    "sort": (
        ("Sort these words alphabetically: {x}", "inline"),
        ("Put the following words in alphabetical order: {x}", "inline"),
        ('Arrange "{x}" in alphabetical order.', "inline"),
        ("Sort the words below in alphabetical order.", "input"),
        ("Alphabetize this list of words.", "input"),
        ("Order these words from A to Z.", "input"),
    ),
    "add": (
        ("What is {a} plus {b}?", "inline"),
        ("Add {a} and {b}.", "inline"),
        ("Compute {a} + {b}.", "inline"),
        ("What is the sum of {a} and {b}? Answer with the number only.", "inline"),
        ("Add these two numbers.", "input"),
        ("Calculate the sum. Answer with the number only.", "input"),
        ("Find the sum of the two numbers below.", "input"),
    ),
    "extract_city": (
        ("Name the city in this sentence: {x}", "inline"),
        ("Which city is mentioned here? {x}", "inline"),
        ("Extract the city name from the following text: {x}", "inline"),
        ("Which city is mentioned in the sentence below? Answer with the city name only.", "input"),
        ("Extract the name of the city from this text.", "input"),
        ("What city does this sentence talk about?", "input"),
    ),
    "choice": (
        ("Which of these is {cat}?\n{x}\nAnswer with the option text.", "inline"),
        ("Pick the option that is {cat}. Reply with the option text, not the letter.\n{x}", "inline"),
        ("Question: which option names {cat}?\n{x}", "inline"),
        ("Which of the options below is {cat}? Answer with the option text.", "input"),
        ("Choose the option that is {cat}. Reply with the option text, not the letter.", "input"),
        ("One of these options is {cat}. Which one?", "input"),
    ),
    "json_format": (
        ("Write {x} as JSON.", "inline"),
        ("Convert {x} to a JSON object.", "inline"),
        ("Format these fields as a JSON object: {x}", "inline"),
        ("Convert the following fields to a JSON object.", "input"),
        ("Represent this record as JSON.", "input"),
        ("Write the fields below as a single-line JSON object.", "input"),
    ),
    "uppercase": (
        ("Convert to upper case: {x}", "inline"),
        ('Write "{x}" in capital letters.', "inline"),
        ("Rewrite this phrase in all caps: {x}", "inline"),
        ("Convert the following phrase to upper case.", "input"),
        ("Rewrite the text below using only capital letters.", "input"),
        ("Make this phrase uppercase.", "input"),
    ),
    "count": (
        ("Count the words in this list: {x}", "inline"),
        ('How many words are in "{x}"? Answer with a number.', "inline"),
        ("Tell me how many words this list contains: {x}", "inline"),
        ("Count the words below.", "input"),
        ("How many words are in the following list? Reply with a number only.", "input"),
        ("Give the number of words in this list.", "input"),
    ),
}

# --------------------------------------------------------------------------
# Example construction
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One generated task instance.

    Attributes:
        family: task family name.
        instruction: the instruction text.
        input: variable content for "input"-mode templates, else ``""``.
        output: the exact expected answer.
        key: canonical content key; two examples with equal keys are the same
            underlying problem (used to keep splits disjoint).
        extra: additional row fields (``choices``/``answer_index``).
        raw: raw labelled fields without any instruction text (used for the
            fields CSV), e.g. ``(a, b)`` for ``add``.
    """

    family: str
    instruction: str
    input: str
    output: str
    key: Hashable
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    raw: tuple[Any, ...] = field(default=(), compare=False, hash=False)

    def to_alpaca(self) -> dict[str, Any]:
        """Return the alpaca-style row (key order is fixed)."""
        row: dict[str, Any] = {
            "instruction": self.instruction,
            "input": self.input,
            "output": self.output,
            "family": self.family,
        }
        row.update(self.extra)
        return row


def with_article(noun: str) -> str:
    """Prefix ``noun`` with "a" or "an"."""
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def render(rng: random.Random, family: str, x: str, **fmt: str) -> tuple[str, str]:
    """Pick a template of ``family`` and return ``(instruction, input)``.

    ``x`` is the variable payload; ``fmt`` holds extra format fields that are
    always inlined (e.g. the category of a choice question).
    """
    template, mode = rng.choice(TEMPLATES[family])
    if mode == "inline":
        return template.format(x=x, **fmt), ""
    return template.format(**fmt), x


def sample_words(rng: random.Random, lo: int, hi: int) -> list[str]:
    """Sample ``lo..hi`` distinct common words."""
    return rng.sample(COMMON_WORDS, rng.randint(lo, hi))


def make_reverse(rng: random.Random) -> Example:
    """Reverse a list of 3-5 words."""
    words = sample_words(rng, 3, 5)
    instruction, inp = render(rng, "reverse", " ".join(words))
    return Example("reverse", instruction, inp, " ".join(reversed(words)), tuple(words),
                   raw=(" ".join(words), ""))


def make_sort(rng: random.Random) -> Example:
    """Sort 3-5 words alphabetically (the input is never already sorted)."""
    words = sample_words(rng, 3, 5)
    while words == sorted(words):
        rng.shuffle(words)
    instruction, inp = render(rng, "sort", " ".join(words))
    return Example("sort", instruction, inp, " ".join(sorted(words)), frozenset(words))


def make_add(rng: random.Random) -> Example:
    """Add two 2-3 digit integers."""
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    template, mode = rng.choice(TEMPLATES["add"])
    if mode == "inline":
        instruction, inp = template.format(a=a, b=b), ""
    else:
        sep = rng.choice((" + ", " and ", ", "))
        instruction, inp = template, f"{a}{sep}{b}"
    return Example("add", instruction, inp, str(a + b), (min(a, b), max(a, b)), raw=(a, b))


def make_extract_city(rng: random.Random) -> Example:
    """Find the city mentioned in a sentence about a person."""
    name, city, job = rng.choice(PERSON_NAMES), rng.choice(CITIES), rng.choice(JOBS)
    sentence_t = rng.choice(CITY_SENTENCES)
    sentence = sentence_t.format(name=name, city=city, job_a=with_article(job))
    if "{job_a}" not in sentence_t:
        job = ""
    instruction, inp = render(rng, "extract_city", sentence)
    return Example("extract_city", instruction, inp, city, (sentence_t, name, city, job))


def make_choice(rng: random.Random) -> Example:
    """Four-way multiple choice: which option belongs to a category."""
    names = sorted(CATEGORIES)
    target = rng.choice(names)
    others = rng.sample([n for n in names if n != target], 3)
    options = [rng.choice(CATEGORIES[target][1])]
    options += [rng.choice(CATEGORIES[o][1]) for o in others]
    rng.shuffle(options)
    answer = next(o for o in options if o in CATEGORIES[target][1])
    delim = rng.choice((". ", ") "))
    listing = "\n".join(f"{'ABCD'[i]}{delim}{o}" for i, o in enumerate(options))
    instruction, inp = render(rng, "choice", listing, cat=CATEGORIES[target][0])
    return Example(
        "choice", instruction, inp, answer, (target, tuple(options)),
        extra={"choices": options, "answer_index": options.index(answer)},
    )


def make_json_format(rng: random.Random) -> Example:
    """Convert ``key=value`` fields into a canonical one-line JSON object."""
    pool: dict[str, Callable[[], Any]] = {
        "age": lambda: rng.randint(18, 79),
        "city": lambda: rng.choice(CITIES),
        "job": lambda: rng.choice(JOBS),
        "score": lambda: rng.randint(0, 100),
    }
    keys = ["name"] + rng.sample(sorted(pool), rng.randint(1, 2))
    record: dict[str, Any] = {"name": rng.choice(PERSON_NAMES)}
    for k in keys[1:]:
        record[k] = pool[k]()
    sep = rng.choice(("=", ": "))
    fields = ", ".join(f"{k}{sep}{v}" for k, v in record.items())
    instruction, inp = render(rng, "json_format", fields)
    output = json.dumps(record, ensure_ascii=False)
    return Example("json_format", instruction, inp, output, output)


def make_uppercase(rng: random.Random) -> Example:
    """Convert a 2-4 word phrase to upper case."""
    phrase = " ".join(sample_words(rng, 2, 4))
    instruction, inp = render(rng, "uppercase", phrase)
    return Example("uppercase", instruction, inp, phrase.upper(), phrase)


def make_count(rng: random.Random) -> Example:
    """Count the words of a 3-8 word list."""
    words = sample_words(rng, 3, 8)
    listing = rng.choice((" ", ", ")).join(words)
    instruction, inp = render(rng, "count", listing)
    return Example("count", instruction, inp, str(len(words)), tuple(words))


MAKERS: dict[str, Callable[[random.Random], Example]] = {
    "reverse": make_reverse,
    "sort": make_sort,
    "add": make_add,
    "extract_city": make_extract_city,
    "choice": make_choice,
    "json_format": make_json_format,
    "uppercase": make_uppercase,
    "count": make_count,
}

# --------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------


def unique_examples(family: str, n: int, seed: int) -> list[Example]:
    """Generate ``n`` examples of ``family`` with distinct content keys and
    distinct ``(instruction, input)`` pairs."""
    rng = random.Random(f"deltatune-tasks/{seed}/{family}")
    out: list[Example] = []
    keys: set[Hashable] = set()
    prompts: set[tuple[str, str]] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n:
            raise RuntimeError(f"could not generate {n} unique {family} examples")
        ex = MAKERS[family](rng)
        if ex.key in keys or (ex.instruction, ex.input) in prompts:
            continue
        keys.add(ex.key)
        prompts.add((ex.instruction, ex.input))
        out.append(ex)
    return out


def build_splits(seed: int) -> dict[str, list[Example]]:
    """Return ``{"train", "validation", "test", "heldout"}`` example lists.

    Each training family contributes a fixed number of rows to train,
    validation and test; held-out families only feed ``heldout``.  Rows in a
    split are shuffled with a seed-derived RNG so families are interleaved.
    """
    check_vocabulary()
    splits: dict[str, list[Example]] = {s: [] for s in ("train", "validation", "test", "heldout")}
    sizes = (("train", TRAIN_PER_FAMILY), ("validation", VALIDATION_PER_FAMILY),
             ("test", TEST_PER_FAMILY))
    for family in TRAIN_FAMILIES:
        pool = unique_examples(family, sum(n for _, n in sizes), seed)
        start = 0
        for split, n in sizes:
            splits[split].extend(pool[start:start + n])
            start += n
    for family in HELDOUT_FAMILIES:
        splits["heldout"].extend(unique_examples(family, HELDOUT_PER_FAMILY, seed))
    for split, rows in splits.items():
        random.Random(f"deltatune-tasks/{seed}/shuffle/{split}").shuffle(rows)
    check_disjoint(splits)
    return splits


def check_vocabulary() -> None:
    """Raise if the word lists could make an answer ambiguous."""
    seen: dict[str, str] = {}
    for cat, (_, words) in CATEGORIES.items():
        for w in words:
            if w in seen:
                raise RuntimeError(f"{w!r} is in categories {seen[w]} and {cat}")
            seen[w] = cat
    if set(PERSON_NAMES) & set(CITIES):
        raise RuntimeError("a person name is also a city name")
    if len(set(COMMON_WORDS)) != len(COMMON_WORDS):
        raise RuntimeError("COMMON_WORDS has duplicates")


def check_disjoint(splits: dict[str, list[Example]]) -> None:
    """Raise if an ``(instruction, input)`` pair appears twice anywhere."""
    seen: dict[tuple[str, str], str] = {}
    for split, rows in splits.items():
        for ex in rows:
            pair = (ex.instruction, ex.input)
            if pair in seen:
                raise RuntimeError(f"duplicate prompt in {seen[pair]} and {split}: {pair!r}")
            seen[pair] = split

# --------------------------------------------------------------------------
# Row formats
# --------------------------------------------------------------------------


def user_content(ex: Example) -> str:
    """The user turn: instruction, plus a blank line and the input if any."""
    return f"{ex.instruction}\n\n{ex.input}" if ex.input else ex.instruction


def to_chat_rows(examples: list[Example], seed: int, split: str) -> list[dict[str, Any]]:
    """OpenAI chat rows; about ``SYSTEM_FRACTION`` of them get a system turn."""
    rng = random.Random(f"deltatune-tasks/{seed}/system/{split}")
    rows = []
    for ex in examples:
        messages = []
        if rng.random() < SYSTEM_FRACTION:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        messages.append({"role": "user", "content": user_content(ex)})
        messages.append({"role": "assistant", "content": ex.output})
        rows.append({"messages": messages, "family": ex.family})
    return rows


def to_sharegpt_rows(examples: list[Example]) -> list[dict[str, Any]]:
    """ShareGPT rows (human/gpt turns)."""
    return [
        {"conversations": [
            {"from": "human", "value": user_content(ex)},
            {"from": "gpt", "value": ex.output},
        ]}
        for ex in examples
    ]


def fields_csv(examples: list[Example]) -> str:
    """Raw labelled fields (no instructions) for ``add`` and ``reverse`` train rows.

    Columns ``family,a,b,answer``: for ``add`` ``a`` and ``b`` are the two
    integers; for ``reverse`` ``a`` is the space-separated word list and ``b``
    is empty.  The first ``FIELDS_CSV_PER_FAMILY`` train rows of each family
    are used, so no held-out/validation/test content leaks into the CSV.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["family", "a", "b", "answer"])
    counts = {"add": 0, "reverse": 0}
    for ex in examples:
        if ex.family not in counts or counts[ex.family] >= FIELDS_CSV_PER_FAMILY:
            continue
        counts[ex.family] += 1
        writer.writerow([ex.family, *ex.raw, ex.output])
    return buf.getvalue()


def jsonl(rows: Iterable[dict[str, Any]]) -> str:
    """Serialise rows as JSON Lines (UTF-8 friendly, fixed key order)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def render_files(seed: int) -> dict[str, str]:
    """Return ``{file name: text}`` for every file of the suite."""
    splits = build_splits(seed)
    files: dict[str, str] = {}
    for split, examples in splits.items():
        files[f"tasks-{split}.jsonl"] = jsonl(ex.to_alpaca() for ex in examples)
        files[f"tasks-{split}.chat.jsonl"] = jsonl(to_chat_rows(examples, seed, split))
    files["tasks-train.sharegpt.jsonl"] = jsonl(to_sharegpt_rows(splits["train"]))
    files["tasks-train.fields.csv"] = fields_csv(splits["train"])
    return files


def write_suite(out_dir: Path, seed: int) -> dict[str, int]:
    """Write all files into ``out_dir``; return ``{file name: size in bytes}``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, text in sorted(render_files(seed).items()):
        data = text.encode("utf-8")
        (out_dir / name).write_bytes(data)
        sizes[name] = len(data)
    return sizes


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("examples/data"),
                        help="output directory (default: examples/data)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default: 0)")
    parser.add_argument("--quiet", action="store_true", help="do not print a summary")
    args = parser.parse_args(argv)
    sizes = write_suite(args.out, args.seed)
    if not args.quiet:
        for name, size in sizes.items():
            print(f"{size:>8d}  {args.out / name}")
        print(f"{sum(sizes.values()):>8d}  total bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
