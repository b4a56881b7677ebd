"""The joint DUET training loop (docs/design.md section 2): what ties the parts together.

A step takes this process's share of the batch's questions (`data`), runs the objective on
them (`objectives`: rollouts, scores, λ, the rollout correction, updates), then pushes the trained weights to the
engines that need them (`weight_push`). Under `torchrun` each process takes a shard of the
batch's questions; λ, token counts and metrics are reduced over all processes, and gradients
are averaged (DDP) or reduce-scattered (FSDP), so N processes compute the update of one. The
other parts live apart: the processes (`distributed`), how models are spread over them
(`parallel`), models, optimizers and engines (`models`, `engines`), rollouts (`rollout`),
scoring (`reward`, `grpo`), forward passes and updates (`update`), checkpoints
(`checkpoint`), the memory plan (`memory`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from duetlm.backends.hf import pick_device
from duetlm.errors import ConfigError
from duetlm.protocol import Duet
from duetlm.tasks import grade
from duetlm.train.config import TrainConfig
from duetlm.train.engines.weight_push import (
    Stager,
    WeightPush,
    run_key,
    staging_folder,
    tied_embeddings,
    weight_bytes,
)
from duetlm.train.loop import checkpoint as ckpt
from duetlm.train.loop.data import TrainingData
from duetlm.train.loop.objectives import JointObjective, SingleModelObjective, StepParts
from duetlm.train.loop.update import PolicyPasses
from duetlm.train.modeling.distributed import start_runtime
from duetlm.train.modeling.models import build_policy, model_location, reference_model
from duetlm.train.modeling.policy import Policy, autocast, merged_state_dict
from duetlm.train.rollouts.rollout import Rollouts

logger = logging.getLogger(__name__)

__all__ = ["DuetTrainer", "model_location", "train"]


class DuetTrainer:
    def __init__(self, config: TrainConfig, resume: bool = False) -> None:
        refuse_launcher_plugins()
        self.cfg = config
        parallel = config.parallel
        self.runtime = start_runtime(
            pick_device(parallel.device), parallel.dist_timeout_s, need_group=parallel.strategy == "fsdp"
        )
        runtime = self.runtime
        per_step, mini = config.objective.questions_per_step, config.optimizer.mini_batches
        if per_step % runtime.world or (per_step // runtime.world) % mini:
            raise ConfigError(
                f"questions_per_step ({per_step}) must split evenly over {runtime.world} process(es) and then "
                f"over mini_batches ({mini})"
            )
        self.out = Path(config.out)
        checkpoint = ckpt.find_checkpoint(self.out) if resume else None
        if resume:  # every process resumes from the same checkpoint, which it must see
            found = runtime.all_objects(str(checkpoint) if checkpoint is not None else None)
            if all(f is None for f in found):
                raise ConfigError(f"--resume: no checkpoint at {self.out / 'last'}")
            if len(set(found)) > 1:
                blind = [rank for rank, f in enumerate(found) if f != found[0]]
                raise ConfigError(
                    f"--resume: process(es) {blind} do not see the checkpoint that process 0 sees "
                    f"({found[0]}): a run on several nodes needs its run folder on a filesystem every "
                    "node reads and writes (docs/training.md#scale)"
                )
        state = ckpt.load_state(checkpoint) if checkpoint is not None else None
        if state is not None:
            ckpt.check_resumable(state, config.model_dump(), checkpoint)
        self.step, self.lam, self.position = 0, config.objective.lambda_init, 0
        torch.manual_seed(config.seed)  # the same on every process: LoRA's adapters start alike

        planned = config.layout.devices
        if planned is not None and planned != runtime.world and runtime.main:
            logger.warning(
                "this run has %d process(es); its config's [layout] plans for %d device(s) "
                "(duet train --dry-run --devices %d plans for these)",
                runtime.world,
                planned,
                runtime.world,
            )
        unused = config.unused_knobs()
        if unused and runtime.main:
            logger.warning(
                "the single-model baseline answers with M alone, so it does not read %s (m is not loaded)",
                ", ".join(unused),
            )
        self.data = TrainingData(config)
        self.capable = build_policy("capable", config, runtime, checkpoint)
        # the single-model baseline answers with M alone: m is not loaded at all
        self.light = build_policy("light", config, runtime, checkpoint) if "light" in config.roles() else None
        self.reference = reference_model(config, runtime, checkpoint)
        # a reference that is no longer the initial M (a warm start moved it) is saved with the run
        self.reference_moved = checkpoint is not None and (
            (checkpoint / "reference").is_dir() or bool(state and state.get("reference_saved"))
        )
        self.stager = self._stager()
        self.rollouts = Rollouts(config, self.capable, self.light, runtime.device)
        self.passes = PolicyPasses(config, runtime, self.reference)
        parts = StepParts(config, runtime, self.capable, self.light, self.rollouts, self.passes)
        self.objective = SingleModelObjective(parts) if config.models.single_model else JointObjective(parts)
        torch.manual_seed(config.seed + runtime.rank)  # what draws from here on (dropout) differs per process
        if state is not None:
            self._restore(state, checkpoint)

    @property
    def trained(self) -> list[Policy]:
        return [p for p in self.policies if p.optimizer is not None]

    @property
    def policies(self) -> list[Policy]:
        """The models this run loaded (M alone in the single-model baseline)."""
        return [p for p in (self.capable, self.light) if p is not None]

    def _stager(self) -> Stager | None:
        """The staging folder for engines that read pushed weights from files, checked for
        room before step 0 (None when no engine does)."""
        staged = [p for p in self.trained if p.engine.reads_staged_weights]
        if not staged:
            return None
        needed = max(weight_bytes(p.lm, p.engine.dtype) for p in staged)
        folder = staging_folder(self.cfg.parallel.staging_dir, needed, self.runtime)
        bucket = int(self.cfg.parallel.push_bucket_mb * 2**20)
        return Stager(self.runtime, folder, run_key(self.out), bucket)

    # --- one step ------------------------------------------------------------------------

    def train_step(self) -> dict:
        started = time.perf_counter()
        questions = self.data.questions(self.step, self.position, self.runtime.rank, self.runtime.world)
        self.position += self.cfg.objective.questions_per_step
        metrics, self.lam = self.objective.step(questions, self.lam)
        metrics |= release_cached_memory(self.runtime.device)
        metrics |= self.push_weights()
        self.step += 1
        metrics |= {"step": self.step, "lambda": self.lam, "step_s": time.perf_counter() - started}
        return metrics

    def push_weights(self) -> dict:
        """Every trained model's engine samples from its trained weights from the next step on
        (an hf engine over the trained module needs nothing)."""
        seconds, copies = 0.0, self.stager.copies if self.stager else 0
        for policy in self.trained:
            push = WeightPush(policy.name, policy.lm, self.stager)
            policy.engine.take_weights(push)
            seconds += push.seconds
        metrics = {"push_s": self.runtime.max(seconds)}
        if self.stager is not None:
            metrics["push_staged_copies"] = self.runtime.sum(self.stager.copies - copies)
        return metrics

    # --- evaluation ----------------------------------------------------------------------

    def evaluate(self) -> dict:
        """Greedy accuracy and M tokens on the eval questions (the pair, or M alone in the
        single-model baseline), each process answering its share; and r(m), m alone with the
        whole budget it has in inference (`evaluation.light_alone`)."""
        cfg, runtime = self.cfg, self.runtime
        budget = cfg.rollout.signal_max_tokens + cfg.rollout.answer_max_tokens
        config = cfg.duet.model_copy(
            update={
                "temperature": 0.0,
                "signal_max_tokens": cfg.rollout.signal_max_tokens,
                "answer_max_tokens": cfg.rollout.answer_max_tokens,
                "alone_max_tokens": budget,
            }
        )
        # the single-model baseline's evaluation is M-alone, which never asks m
        light = self.light.engine if self.light is not None else self.capable.engine
        duet = Duet(self.capable.engine, light, config)
        examples = self.data.evaluation[runtime.rank :: runtime.world]
        total = max(runtime.sum(len(examples)), 1.0)

        def accuracy(mode: str):
            with autocast(runtime.device, cfg.parallel.precision):
                results = duet.solve_batch([e.problem for e in examples], mode)
            right = sum(
                r.answer is not None and grade(r.text, e).correct
                for r, e in zip(results, examples, strict=True)
            )
            return runtime.sum(right) / total, results

        metrics = {}
        eval_accuracy, results = accuracy("M-alone" if cfg.models.single_model else "duet")
        metrics["eval_accuracy"] = eval_accuracy
        metrics["eval_capable_tokens"] = (
            runtime.sum(sum(r.usage.capable.output_tokens for r in results)) / total
        )
        if cfg.evaluation.light_alone and not cfg.models.single_model:
            metrics["eval_r_light"], _ = accuracy("m-alone")
            self.objective.r_light = metrics["eval_r_light"]
        return metrics

    # --- warm start ----------------------------------------------------------------------

    def warm_start(self) -> dict:
        """Fine-tune M on a probe's oracle cuts of training questions (`warm_start.run`); the
        KL reference (full fine-tuning) becomes the warm-started M, so that GRPO's KL term keeps
        it near where the warm start put it, not near the verbose M."""
        from duetlm.train.loop.warm_start import WarmStartSettings, fine_tune, warm_start_targets

        cfg, warm = self.cfg, self.cfg.warm_start
        targets = warm_start_targets(warm.run, self.data.is_training_question, cfg.capable.model)
        settings = WarmStartSettings(warm.epochs, warm.lr, warm.batch, cfg.seed)
        report = fine_tune(
            self.capable,
            targets,
            cfg.duet,
            cfg.rollout.signal_max_tokens,
            settings,
            self.runtime,
            cfg.parallel.precision,
            cfg.optimizer.max_grad_norm,
        )
        if self.reference is not None:
            self.reference.lm.load_state_dict(self.capable.lm.state_dict())
            self.reference_moved = True
        self.push_weights()
        if self.runtime.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "warm_start.json").write_text(json.dumps({"run": warm.run} | report, indent=2))
        return report

    # --- checkpoints ---------------------------------------------------------------------

    def save(self) -> Path:
        """The models and the trainer state, swapped in as `last` (`[checkpoint] format`: an HF
        folder per trained model gathered on the main process, or every process's own shards).
        Every process takes part."""
        if self.cfg.checkpoint.format == "sharded":
            return self._save_sharded()
        models = {p.name: self._model_to_save(p) for p in self.trained}
        if self.reference_moved and self.reference is not None:
            models["reference"] = ckpt.model_state(self.reference, tied_embeddings(self.reference.lm))
        optimizers = {p.name: ckpt.optimizer_state(p.net, p.optimizer) for p in self.trained}
        rng = self.runtime.all_objects(ckpt.rng_state())
        path = self.out / "last"
        if self.runtime.main:
            state = self._state(rng) | {"optimizers": optimizers}
            path = ckpt.save_checkpoint(
                self.out, lambda folder: self._write_models(folder, models), state, self.cfg.checkpoint.keep
            )
        self.runtime.barrier()
        return path

    def _state(self, rng: list) -> dict:
        return {
            "step": self.step,
            "lambda": self.lam,
            "position": self.position,
            "rng": rng,
            "world": self.runtime.world,
            "format": self.cfg.checkpoint.format,
            "reference_saved": self.reference_moved and self.reference is not None,
            "config": self.cfg.model_dump(),
        }

    def _sharded_parts(self) -> dict:
        parts = {p.name: (p.net, p.optimizer) for p in self.trained}
        if self.reference_moved and self.reference is not None:
            parts["reference"] = (self.reference, None)
        return parts

    def _save_sharded(self) -> Path:
        """Each process writes its shards into the staging folder (which every process must
        see), then the main process writes the state and swaps the folder in."""
        staging = self.out / "last.tmp"
        if self.runtime.main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.runtime.barrier()
        ckpt.check_visible(staging, self.runtime)
        ckpt.save_shards(self._sharded_parts(), staging / ckpt.SHARDS)
        rng = self.runtime.all_objects(ckpt.rng_state())
        self.runtime.barrier()
        if self.runtime.main:
            ckpt.commit_checkpoint(self.out, self._state(rng), self.cfg.checkpoint.keep)
        self.runtime.barrier()
        return self.out / "last"

    def _model_to_save(self, policy: Policy) -> dict[str, torch.Tensor]:
        if policy.lora:  # whole on every process (LoRA trains under ddp only)
            return (
                merged_state_dict(policy.lm) if self.runtime.main and self.cfg.models.merge_adapters else {}
            )
        return ckpt.model_state(policy.net, tied_embeddings(policy.lm))

    def _write_models(self, folder: Path, states: dict[str, dict]) -> None:
        if "reference" in states:  # M as the warm start left it: the KL reference of a resumed run
            self.reference.lm.save_pretrained(folder / "reference", state_dict=states["reference"])
            self.capable.tokenizer.save_pretrained(folder / "reference")
        for policy in self.trained:
            if policy.lora:
                policy.lm.save_pretrained(folder / f"{policy.name}_adapter")
                target = policy.lm.get_base_model()
                if not self.cfg.models.merge_adapters:
                    continue
            else:
                target = policy.lm
            target.save_pretrained(folder / policy.name, state_dict=states[policy.name])
            policy.tokenizer.save_pretrained(folder / policy.name)

    def _restore(self, state: dict, checkpoint: Path) -> None:
        self.step, self.lam, self.position = state["step"], state["lambda"], state["position"]
        if state.get("format", "whole") == "sharded":
            ckpt.load_shards(self._sharded_parts(), checkpoint / ckpt.SHARDS)
        else:
            for policy in self.trained:
                ckpt.load_optimizer_state(policy.net, policy.optimizer, state["optimizers"][policy.name])
        rng = state["rng"]
        if len(rng) == self.runtime.world:
            ckpt.set_rng_state(rng[self.runtime.rank])
        else:
            logger.warning(
                "%s was saved by %d process(es) and resumes on %d: each process's generators restart from "
                "the seed (rollouts are seeded per request and repeat regardless)",
                checkpoint,
                len(rng),
                self.runtime.world,
            )
        sharded = state.get("format", "whole") == "sharded"
        for policy in self.trained:
            # an engine that started from the model's own folder (a LoRA run's base; every model of
            # a sharded checkpoint, which writes no folder) takes the resumed weights now
            if sharded or (policy.lora and policy.engine.reads_staged_weights):
                policy.engine.take_weights(WeightPush(policy.name, policy.lm, self.stager))
        logger.info("resumed from %s at step %d", checkpoint, self.step)

    def close(self, finished: bool = True) -> None:
        for policy in self.policies:
            policy.engine.close()
        self.runtime.close(finished)


def train(config: TrainConfig, resume: bool = False, progress: bool = True, force: bool = False) -> Path:
    """Run (or resume) training; returns the run folder. Metrics go to metrics.jsonl (one line
    per step, rewritten to the checkpoint's step on resume) and TensorBoard. A new run refuses a
    folder that holds another run unless `force` (which moves that run aside)."""
    from tqdm.auto import tqdm

    from duetlm.train.loop.logging import MetricsLog

    started = time.perf_counter()
    if not resume and _is_main_process():
        ckpt.claim_run_folder(Path(config.out), force)
    trainer = DuetTrainer(config, resume=resume)
    finished = False
    try:
        main = trainer.runtime.main
        first_step = trainer.step
        log = MetricsLog(trainer.out, config, enabled=main, keep_until=trainer.step)
        bar = tqdm(
            total=config.steps,
            initial=trainer.step,
            desc="train",
            unit="step",
            disable=not (progress and main),
        )
        every = config.evaluation.every
        if trainer.step == 0 and config.warm_start.run:
            trainer.warm_start()
        if trainer.step == 0 and every:
            log.write({"step": 0, "lambda": trainer.lam} | trainer.evaluate())
        while trainer.step < config.steps:
            metrics = trainer.train_step()
            if every and trainer.step % every == 0:
                metrics |= trainer.evaluate()
            log.write(metrics)
            bar.update(1)
            bar.set_postfix(
                signal=f"{metrics.get('signal_tokens', metrics.get('output_tokens', 0)):.1f}",
                lam=f"{trainer.lam:.3f}",
                acc=f"{metrics.get('eval_accuracy', float('nan')):.3f}",
            )
            if trainer.step % config.save_every == 0 or trainer.step == config.steps:
                trainer.save()
        bar.close()
        log.close()
        if main:
            final = {
                "step": trainer.step,
                "lambda": trainer.lam,
                "resumed_at": first_step,
                "processes": trainer.runtime.world,
                "wall_s": time.perf_counter() - started,  # this call: loading, steps, evals, saves
            }
            (trainer.out / "final.json").write_text(json.dumps(final))
        finished = True
    finally:
        trainer.close(finished)
    return trainer.out


def refuse_launcher_plugins() -> None:
    """`accelerate launch --use_fsdp / --use_deepspeed` asks for sharding the trainer does not
    take from accelerate: say what does, rather than train with something else."""
    import os

    for name, variable in (
        ("--use_fsdp", "ACCELERATE_USE_FSDP"),
        ("--use_deepspeed", "ACCELERATE_USE_DEEPSPEED"),
    ):
        if os.environ.get(variable, "").lower() in ("1", "true", "yes"):
            raise ConfigError(
                f"accelerate launch {name}: duetlm shards models with its own FSDP2 (parallel.strategy = "
                "'fsdp'; accelerate never enables FSDP on a CPU, and DeepSpeed is not supported); launch with "
                f"torchrun, or accelerate launch without {name}"
            )


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def release_cached_memory(device: torch.device) -> dict:
    """Give the CUDA caching allocator's free blocks back to the device after the update, before
    the engines wake: the update's activations and gradients leave gigabytes reserved but unused,
    which a waking vLLM engine (another allocator) cannot take. The memory plan counts no such
    cache (docs/training.md#memory). Returns the device's reserved memory after the release."""
    if device.type != "cuda":
        return {}
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    return {"cuda_reserved_gb": torch.cuda.memory_reserved(device) / 2**30}
