"""Per-step metrics: metrics.jsonl always, TensorBoard and Weights & Biases when available."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from duetlm.jsonl import read_jsonl

logger = logging.getLogger(__name__)


class MetricsLog:
    def __init__(self, out: Path, config, enabled: bool = True, keep_until: int = 0) -> None:
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(config.model_dump(), indent=2))
        # On resume, rows past the checkpoint were produced by the step in flight: drop them.
        rows = []
        if self.path.is_file() and keep_until:
            rows = [
                row
                for _, row in read_jsonl(self.path, on_cut_tail="drop")
                if isinstance(row, dict) and row.get("step", 0) <= keep_until
            ]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        if config.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                logger.warning(
                    "tensorboard is not installed: metrics go to metrics.jsonl only "
                    "(pip install 'duetlm[train]', or tensorboard = false in the config)"
                )
        if config.logging.wandb:
            try:
                import wandb
            except ImportError as exc:
                from duetlm.errors import ConfigError

                raise ConfigError(
                    "logging.wandb = true, but wandb is not installed: pip install 'duetlm[wandb]' (or set it false)"
                ) from exc
            name = config.logging.wandb_run or out.name
            self.wandb = wandb.init(
                project=config.logging.wandb_project,
                name=name,
                id=wandb_id(out, name),  # the same id on resume: the curves continue
                resume="allow",
                config=config.model_dump(),
                dir=str(out),
            )

    def write(self, metrics: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        step = metrics.get("step", 0)
        numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float) and k != "step"}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def wandb_id(out: Path, name: str) -> str:
    """A run's Weights & Biases id, fixed by its folder, so a resume logs into the same run."""
    import hashlib

    return f"{name[:40]}-{hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:8]}"
