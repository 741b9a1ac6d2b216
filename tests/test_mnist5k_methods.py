"""experiments/mnist5k_methods.py as a sweep file: each setting trains exactly its method's config."""

import pathlib

import pytest

from kdlab import config as kconfig, sweep as ksweep

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "mnist5k_resnet.py")
SWEEP = str(ROOT / "experiments" / "mnist5k_methods.py")
TEACHER = "teacher=/nonexistent/teacher/checkpoints"


def _module(path: str, name: str):
  return kconfig.load_python_file(pathlib.Path(path), name)


@pytest.mark.parametrize("extra", ["", ",diagnostics"])
def test_every_setting_trains_its_methods_config(extra):
  experiment, configs = _module(SWEEP, "mnist5k_methods"), _module(CONFIG, "mnist5k_resnet")
  sweep, base = ksweep.plan(f"{CONFIG}:kd,{TEACHER}", f"{SWEEP}:{TEACHER}{extra}")
  names = [s.values["method"] for s in sweep.settings]
  if extra:
    assert names == list(experiment.DIAGNOSTICS)
  else:
    assert names == ["student", *configs.METHODS]
  assert sweep.seeds == experiment.SEEDS
  for setting, name in zip(sweep.settings, names):
    run = ksweep.run_config(base, sweep, ksweep.Run(setting, sweep.seeds[0]))
    method, _, edit = experiment.DIAGNOSTICS[name] if extra else (name, None, None)
    expected = kconfig.with_optional_fields(configs.get_config(f"{method},{TEACHER}"))
    if edit is not None:
      edit(expected)
    # The whole config, not only the swept FIELDS: an edit outside them would be silently lost.
    ignore = ("seed", "method", "wandb_group", "wandb_tags")
    got, want = ({k: v for k, v in experiment._plain(c.to_dict()).items() if k not in ignore} for c in (run, expected))
    assert got == want, name


def test_notes_name_methods_of_the_table():
  experiment, configs = _module(SWEEP, "mnist5k_methods"), _module(CONFIG, "mnist5k_resnet")
  assert set(experiment.NOTES) <= set(configs.METHODS)
  assert {m for m, _, _ in experiment.DIAGNOSTICS.values()} <= {"student", *configs.METHODS}
