"""The text builder against deltatune's dataset-builder contract (``deltatune.testing``).

Continued pre-training: documents are concatenated and cut into rows, and every token is labelled,
so the contract checks that instead of prompt masking and one row per record.
"""

from deltatune.testing import DatasetBuilderContract


class TestTextContract(DatasetBuilderContract):
    builder_name = "text"
    config = {"max_length": 16}
    records = [{"text": "The quick brown fox jumps over the lazy dog."},
               {"text": "Pack my box with five dozen liquor jugs."}]
    malformed = [{"body": "no text field"}, {"text": 42}, "this line is not JSON"]
    one_row_per_record = False
    masks_prompt = False
