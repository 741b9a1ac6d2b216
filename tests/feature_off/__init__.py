"""Feature-off checks: proof that the tests guarding a feature fail when the feature is broken.

Each module here (not starting with ``_``) switches one kdlab feature off and lists the tests that
guard it in ``GUARDS`` (pytest node ids, relative to the repository root). It is a pytest plugin::

  .venv/bin/python -m pytest -p tests.feature_off.restore tests/test_train.py::test_...

loads it: ``disable()`` patches kdlab in the pytest process, and the child processes the tests start
(``kdlab train`` and friends, through ``conftest.child_env``/``run_child``) patch themselves too, through
``site/sitecustomize.py`` and the ``KDLAB_FEATURE_OFF`` variable the plugin sets.

``python -m tests.feature_off.run`` (``make check-tests``) runs every plugin's guards with the plugin
and fails unless every guard fails. Adding a feature: write its tests, then a module here whose
``disable()`` breaks exactly that feature (values and shapes unchanged where possible, so only a test
of the mechanism notices), and check that ``make check-tests`` passes.
"""
