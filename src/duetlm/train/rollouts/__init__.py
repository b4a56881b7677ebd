"""A training step's rollouts: M's signals and m's answers, their indices and packed sequences."""
