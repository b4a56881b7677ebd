"""The training loop: the trainer, the objectives' steps, the updates, data, checkpoints, logging,
the warm start."""
