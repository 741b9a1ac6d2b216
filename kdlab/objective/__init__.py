"""Objectives: a weighted, scheduled sum of loss terms declared in config.

``config.objective`` is a list of term specs::

    [dict(loss="ce", weight=0.1),
     dict(loss="kd", weight=0.9, temperature=4.0),
     dict(loss="fitnet", weight=dict(schedule="linear", init=0.0, end=100.0, steps=2000),
          student="stage2", teacher="stage2")]

Each spec is turned into a :class:`Term` by the builder registered for its
``loss`` name (see :mod:`kdlab.objective.terms`). Builders see the shapes of every
model output, so unknown taps, incompatible shapes and bad hyperparameters fail
at start-up with a message naming the term. Learnable connectors (e.g. a
FitNet regressor) are built by the term and trained with the student.
"""

from kdlab.objective.build import Objective, build
from kdlab.objective.registry import register_term, term_names
from kdlab.objective.schedules import make_schedule
from kdlab.objective.types import CACHE_KEYS, ModelOutput, Shapes, StepInputs, Term, TermFn
from kdlab.objective import terms  # noqa: F401,E402  (registers the built-in terms)

__all__ = ["CACHE_KEYS", "ModelOutput", "Objective", "Shapes", "StepInputs", "Term", "TermFn", "build",
           "make_schedule", "register_term", "term_names"]
