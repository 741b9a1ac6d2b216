"""Born-again resume off: a restarted chain starts over from generation 0 (no generation is found finished
and no checkpoint is restored)."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_procedures.py::test_born_again_chain_resumes_after_kill[gen0/summary.json]",)


def disable() -> None:
  from kdlab.train import checkpoint, loop
  checkpoint.Checkpointer.latest_step = lambda self: None
  if hasattr(loop, "_finished_summaries"):
    loop._finished_summaries = lambda workdirs, total_steps: None


pytest_configure = plugin(__name__, disable)
