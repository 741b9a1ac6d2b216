"""Example prompts off: every instruction example is sampled after the same number of its first tokens (the
longest prompt's length, as text sources cut prompts), not after its own chat up to the assistant's reply."""

import dataclasses

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_on_policy_instruct.py::test_prompts_are_the_chat_templates_generation_prompts",)


def disable() -> None:
  from kdlab.data import prompts
  find = prompts.find

  def fixed_length(*args, **kwargs):
    found = find(*args, **kwargs)
    return dataclasses.replace(found, length=found.length * 0 + found.width)

  prompts.find = fixed_length


pytest_configure = plugin(__name__, disable)
