"""``kdlab sample`` without the run's weights: it checks the checkpoint against config.model as
before but samples from the freshly initialized model."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_lm_train.py::test_kdlab_sample_continues_with_the_weights_kdlab_train_saved",)


def disable() -> None:
  from kdlab.offline import sample
  from kdlab.models import registry

  load_lm = sample.load_lm

  def untrained(workdir):
    load_lm(workdir)  # the same checks and errors
    kwargs = sample.read_lm_config(workdir)
    return registry.create(kwargs.pop("name"), **kwargs)

  sample.load_lm = untrained


pytest_configure = plugin(__name__, disable)
