"""Training utilities: distributed setup and logging (misc), checkpoints (checkpoint), lr schedule."""
