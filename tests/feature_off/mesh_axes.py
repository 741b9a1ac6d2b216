"""Mesh entry checks off: ``config.mesh`` is used as given, so ``[1, 2, 3]`` crashes, a size 0 gets another
message, and a mesh without a data-parallel axis trains with every device computing the whole batch."""

from tests.feature_off._switch import plugin

_CASE = "tests/test_validation.py::test_bad_values_are_refused_in_one_line_before_anything_is_written"
GUARDS = tuple(f"{_CASE}[{case}]" for case in ("mesh_entries", "mesh_size", "mesh_no_data_axis"))


def disable() -> None:
  from kdlab import mesh
  mesh.check_mesh_axes = lambda axes: None


pytest_configure = plugin(__name__, disable)
