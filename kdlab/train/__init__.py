"""Training: mesh, state, jitted step, checkpoints, logging, evaluation, the loop."""
