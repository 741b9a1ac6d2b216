"""Stop tokens off: sampled replies on instruction data run to max_new_tokens past the EOS / end-of-turn token."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_on_policy_instruct.py::test_rollout_on_chat_data_masks_the_reply_up_to_its_stop_token",)


def disable() -> None:
  from kdlab.train import on_policy
  rows = on_policy.example_rows

  def never_stop(tokens, generated, *, seq_len, stop_ids, pad_id):
    return rows(tokens, generated, seq_len=seq_len, stop_ids=(-1,), pad_id=pad_id)

  on_policy.example_rows = never_stop


pytest_configure = plugin(__name__, disable)
