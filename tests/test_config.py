import ml_collections
import pytest

from kdlab import config as kconfig
from kdlab.errors import UserError

from conftest import HINTON


def test_load_variant_and_override_list_entry():
  c = kconfig.load(f"{HINTON}:kd")
  assert c.objective[1]["loss"] == "kd" and c.objective[1]["temperature"] == 20.0
  kconfig.apply_overrides(c, ["--config.objective[1].temperature=4", "--config.model.hidden=(10, 10)",
                              "--config.data.augment=jitter", "--config.seed=3"])
  assert c.objective[1]["temperature"] == 4.0 and isinstance(c.objective[1]["temperature"], float)
  assert tuple(c.model.hidden) == (10, 10) and c.data.augment == "jitter" and c.seed == 3


@pytest.mark.parametrize("arg, message", [
    ("--config.data.batch_sise=3", "unknown config field config.data.batch_sise"),
    ("--config.objective[7].temperature=3", "config.objective[7] does not exist"),
    ("--config.seed=abc", "expected a value of type int"),
    ("--seed=3", "overrides look like --config.FIELD=VALUE"),
])
def test_bad_overrides_name_the_field(arg, message):
  c = kconfig.load(f"{HINTON}:kd")
  with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
    kconfig.apply_overrides(c, [arg])


def test_bad_config_file_and_variant():
  with pytest.raises(UserError, match="no config file"):
    kconfig.load("configs/nope.py:kd")
  with pytest.raises(UserError, match="unknown variant"):
    kconfig.load(f"{HINTON}:nope")


def test_parse_path():
  assert kconfig.parse_path("objective[1].temperature") == ["objective", 1, "temperature"]
  assert kconfig.parse_path("a.b[0][2].c") == ["a", "b", 0, 2, "c"]
  with pytest.raises(UserError):
    kconfig.parse_path("a..b")
