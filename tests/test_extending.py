"""docs/extending.md runs as written: each Python block, in order, in one namespace."""

import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "extending.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


@pytest.fixture(scope="module")
def namespace():
  """The examples' namespace; the loss they register is unregistered afterwards, so the other tests of
  this process (tests/test_terms.py counts the registered terms) see the built-in ones only."""
  from kdlab.objective import registry
  before = set(registry.term_names())
  yield {"__name__": "extending_example"}
  for name in set(registry.term_names()) - before:
    del registry._BUILDERS[name]


def test_the_page_has_the_three_examples():
  assert len(BLOCKS) == 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(namespace, index, capsys):
  exec(compile(BLOCKS[index], f"{DOC}:block{index}", "exec"), namespace)  # noqa: S102
  out = capsys.readouterr().out
  if index == 0:  # The distilled student learned: both terms fell well below their values at chance.
    metrics = eval(out.strip().splitlines()[-1])  # noqa: S307
    assert metrics["task/ce"] < 1.0 and metrics["distill/kd"] < 2.0, metrics
  if index == 1:
    assert "register_term: loss 'kd' is already registered; choose another name" in out
  if index == 2:
    assert out.strip() == "(2, 10) ['conv', 'pool']"


def test_the_script_imports_only_public_names():
  for block in BLOCKS:
    for module, names in re.findall(r"^from (\S+) import (.+)$", block, re.M):
      assert not any(part.startswith("_") for part in module.split(".")), module
      assert not any(n.strip().startswith("_") for n in names.split(",")), names
  assert len(BLOCKS[0].strip().splitlines()) <= 40
