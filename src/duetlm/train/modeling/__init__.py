"""Each role's model: loading, LoRA, the log-prob network, processes and parallelism (DDP, FSDP2)."""
