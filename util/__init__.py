"""Shared utilities: the command line's error and output path (cli), device and precision (runtime),
checkpoints (checkpoint) and what they record (record), safe file writing (files), distributed setup
and data-loading processes (misc), the learning-rate schedule (lr_sched)."""
