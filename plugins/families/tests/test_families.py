"""What the first-party families add: the logit transforms, and the generic path for what they do not handle."""

from __future__ import annotations

import pytest

from deltatune.model.logits import head_plan
from deltatune.testing.families import TINY_FAMILIES


def test_a_field_the_family_does_not_implement_sends_the_model_to_the_generic_path_with_a_reason() -> None:
    model = TINY_FAMILIES["llama"]()
    model.config.logit_bias_shift = 0.5
    with pytest.warns(UserWarning, match="llama model family does not handle it exactly .*logit_bias_shift"):
        plan = head_plan(model)
    assert plan.family is None and not plan.exact


def test_without_its_family_gemma2_trains_on_its_own_logits() -> None:
    with pytest.warns(UserWarning, match="own logits"):
        plan = head_plan(TINY_FAMILIES["gemma2"](), families=[])
    assert not plan.exact and plan.family is None
