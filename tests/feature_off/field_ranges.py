"""Range checks of numeric fields off: ``kdlab.train.ranges.check`` accepts anything, so a batch of 0, a
negative seed or evaluation every -1 epochs crash after the workdir is written, or train silently."""

from tests.feature_off._switch import plugin

_CASE = "tests/test_validation.py::test_bad_values_are_refused_in_one_line_before_anything_is_written"
GUARDS = tuple(f"{_CASE}[{case}]" for case in ("batch_size", "eval_batch_size", "seed", "seed_uint32", "num_steps",
                                               "log_every", "eval_every", "checkpoint_every", "vmap_seeds",
                                               "hidden", "teachers", "max_loss", "keep",
                                               "best_metric", "best_mode"))


def disable() -> None:
  from kdlab.train import ranges
  ranges.check = lambda config: None


pytest_configure = plugin(__name__, disable)
