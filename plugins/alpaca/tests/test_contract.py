"""The alpaca builder against deltatune's dataset-builder contract (``deltatune.testing``)."""

from deltatune.testing import DatasetBuilderContract

RECORDS = [
    {"instruction": "Reverse the order of these words.", "input": "red fox jumps", "output": "jumps fox red"},
    {"instruction": "What is 17 plus 25?", "output": "42"},
    {"instruction": "Name a primary colour.", "input": "", "output": "red"},
]


class TestAlpacaChatTemplateContract(DatasetBuilderContract):
    builder_name = "alpaca"
    records = RECORDS
    malformed = [
        {"instruction": "an output is missing"},
        {"instruction": "the output is not text", "output": 42},
        {"instruction": "x", "input": ["a list"], "output": "y"},
        "this line is not JSON",
        "[1, 2, 3]",
    ]


class TestAlpacaClassicTemplateContract(DatasetBuilderContract):
    builder_name = "alpaca"
    config = {"template": "alpaca", "max_length": 256}
    records = RECORDS
    malformed = [{"output": "no instruction"}]


class TestAlpacaJsonListContract(DatasetBuilderContract):
    """A ``.json`` file holding a list: a malformed item is reported by its index."""

    builder_name = "alpaca"
    records = RECORDS
    malformed = [{"instruction": 3, "output": "y"}]
    suffix = ".json"

    def write(self, path, records):
        import json

        path.write_text(json.dumps(records, indent=1), encoding="utf-8")

    def bad_line(self, path, index):
        return index  # the builder names the list item (0-based) for .json files
