"""The pure algorithm of docs/design.md section 2: rewards and λ, GRPO advantages and the PPO loss,
the rollout correction."""
