"""Born-again chain off: every generation gets the chain's seed and is taught by generation 0."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_procedures.py::test_born_again_generations_are_seeded_and_taught_as_documented",)


def disable() -> None:
  from kdlab.train import born_again
  generation_config = born_again.generation_config

  def first_teacher_same_seed(config, workdir, k):
    c = generation_config(config, workdir, min(k, 1))
    c.seed = config.seed
    return c

  born_again.generation_config = first_teacher_same_seed


pytest_configure = plugin(__name__, disable)
