"""Joint DUET training (docs/design.md section 2; docs/training.md), by job:

- `config`: `TrainConfig`, in sections, one per role ([capable], [light]) and per concern;
- `algorithm`: the pure parts: rewards and λ, GRPO advantages and the PPO loss, the rollout
  correction;
- `rollouts`: a step's rollouts, their indices and packed sequences;
- `engines`: each role's rollout engine (hf, vLLM) and the weight push into it;
- `modeling`: each role's model, LoRA, the log-prob network, processes and parallelism;
- `loop`: the trainer, the objectives' steps, updates, data, checkpoints, logging, warm start;
- `planning`: the memory plan of `--dry-run`, the training curves.
"""
