"""Training: the networks, the optimizer and schedule, the epoch loop, checkpoints, several
processes, stop requests. No MLflow and no file I/O except checkpoint files."""
