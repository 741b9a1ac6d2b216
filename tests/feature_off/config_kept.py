"""config.json rewritten at every start: a resume that fails (no checkpoint loads) leaves the workdir changed."""

from tests.feature_off._switch import plugin

GUARDS = ("tests/test_faults.py::test_no_checkpoint_that_loads_is_one_line_error_and_changes_nothing",)


def disable() -> None:
  from kdlab.train import loop

  def _write_config(workdir, config_json):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config_json)

  loop._write_config = _write_config


pytest_configure = plugin(__name__, disable)
