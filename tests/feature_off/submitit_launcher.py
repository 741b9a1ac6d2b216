"""The submitit launcher off: ``--launcher=slurm`` / ``submitit-local`` train the runs here, one after another."""

from tests.feature_off._switch import plugin

GUARDS = (
    "tests/test_launch.py::test_a_sweep_through_submitit_gives_the_local_launchers_results",
    "tests/test_launch.py::test_a_run_asking_for_two_nodes_trains_as_two_processes",
)


def disable() -> None:
  from kdlab import sweep
  sweep._run_array = lambda base, sweep_, workdir, todo, total, use_wandb, say, *rest: sweep._run_sequential(
      base, sweep_, workdir, todo, use_wandb, say)

pytest_configure = plugin(__name__, disable)
