"""A run's own stage: its config (``config``), the run folder (``folder``: every file a run holds,
each read and written through one typed function), checkpoints, the folder's claim, what it
trained on (``data``), TensorBoard and curves. The kinds of run plug in above it."""
