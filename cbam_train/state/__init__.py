"""The run's state on disk: checkpoints and weights files, resume checks, the run dir, atomic writes."""
