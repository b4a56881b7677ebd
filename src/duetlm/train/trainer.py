"""The joint DUET training loop (docs/design.md section 2).

One step, in the reference order:
    M rollout -> standalone m (once per question) -> guided m -> rewards -> λ update
    -> update m -> update M
Rollouts go through the same backends as inference, wrapping the very modules being trained
(or a vLLM engine that takes their weights after every update), so what is trained is what is
served. Under `torchrun`/`accelerate launch` each process takes a shard of the batch's
questions; λ, token counts and metrics are reduced over all processes and gradients are
averaged by DDP, so N processes compute the update of one. The parts live apart: rollouts
(`rollout`), scoring (`reward`, `grpo`), the update (`update`), checkpoints (`checkpoint`),
weights and dtypes (`policy`), the memory plan (`memory`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import zlib
from pathlib import Path

import torch

from duetlm.backends import parse_spec
from duetlm.backends.hf import HFBackend, pick_device, resolve_model_location
from duetlm.errors import ConfigError
from duetlm.protocol import Duet
from duetlm.tasks import Example, grade, load_task
from duetlm.train import checkpoint as ckpt
from duetlm.train.config import LoraSettings, TrainConfig
from duetlm.train.grpo import group_advantages, kl_sum
from duetlm.train.policy import LogprobNet, Policy, autocast, load_lm, merged_state_dict
from duetlm.train.reward import score_joint, single_model_rewards, update_lambda
from duetlm.train.rollout import Rollouts
from duetlm.train.sequences import Sequences, credit_only_tail
from duetlm.train.update import UpdateSettings, ppo_update

logger = logging.getLogger(__name__)


def model_location(spec: str) -> str:
    parsed = parse_spec(spec)
    if parsed.kind not in ("hf", "vllm"):
        raise ConfigError(
            f"training needs local weights (hf: or vllm: spec or an embedded name), got {spec!r}"
        )
    return resolve_model_location(parsed.model)[0]


class DuetTrainer:
    def __init__(self, config: TrainConfig, resume: bool = False, accelerator=None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        self.cfg = config
        device = pick_device(config.device)
        self.acc = accelerator or Accelerator(cpu=device.type == "cpu")
        kind = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed"}.get(
            self.acc.distributed_type
        )
        for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
            if os.environ.get(variable, "").lower() in ("1", "true", "yes"):  # what `accelerate launch` sets
                kind = name
        if kind is not None:
            raise ConfigError(
                f"{kind} is not supported: duetlm trains with DDP (every process holds whole models, and "
                "rollouts and saving need them whole). For models that do not fit, use LoRA (lora_capable) "
                "and precision = 'bf16-mixed'; `duet train --dry-run` shows the memory plan"
            )
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        local = config.questions_per_step // self.world
        if config.questions_per_step % self.world or local % config.mini_batches:
            raise ConfigError(
                f"questions_per_step ({config.questions_per_step}) must split evenly over {self.world} "
                f"process(es) and then over mini_batches ({config.mini_batches})"
            )
        self.out = Path(config.out)
        checkpoint = ckpt.find_checkpoint(self.out) if resume else None
        if resume and checkpoint is None:
            raise ConfigError(f"--resume: no checkpoint at {self.out / 'last'}")
        state = ckpt.load_state(checkpoint) if checkpoint is not None else None
        if state is not None:
            ckpt.check_resumable(state, config.model_dump(), checkpoint)
        self.step, self.lam, self.position = 0, config.lambda_init, 0
        random.seed(config.seed)
        torch.manual_seed(config.seed)

        self.capable = self._policy(
            "capable", config.capable, config.lora_capable, config.capable_lr, checkpoint
        )
        self.light = self._policy(
            "light",
            config.light,
            config.lora_light,
            config.light_lr,
            checkpoint,
            trainable=config.train_light,
        )
        self.reference = None
        if config.kl_beta > 0 and config.lora_capable is None:
            # The initial M, frozen (with LoRA, the base model with adapters off plays this part).
            lm, _ = load_lm(
                model_location(config.capable), self.acc.device, config.precision, trainable=False
            )
            self.reference = LogprobNet(lm, config.logprob_chunk)
        self.rollouts = Rollouts(config, self.capable, self.light, self.acc.device)
        self.eval_examples = self._eval_examples()
        self.train_examples = self._training_examples()
        self._order: tuple[int, list[int]] = (-1, [])  # (pass over the data, its order)
        if state is not None:
            self._restore(state, checkpoint)

    # --- setup ---------------------------------------------------------------------------

    def _policy(self, name, spec, lora: LoraSettings | None, lr, checkpoint, trainable=True) -> Policy:
        cfg = self.cfg
        location, adapter = model_location(spec), None
        if checkpoint is not None and (checkpoint / name).is_dir():
            if lora is not None and (checkpoint / f"{name}_adapter").is_dir():
                adapter = str(checkpoint / f"{name}_adapter")
            else:
                location = str(checkpoint / name)
        lm, tokenizer = load_lm(
            location,
            self.acc.device,
            cfg.precision,
            lora if trainable else None,
            adapter,
            trainable,
            cfg.gradient_checkpointing,
        )
        net = LogprobNet(lm, cfg.logprob_chunk)
        optimizer = None
        if trainable:
            parameters = [p for p in net.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=cfg.weight_decay)
            net, optimizer = self.acc.prepare(net, optimizer)
        if parse_spec(spec).kind == "vllm" and name == "capable":
            from duetlm.train.vllm_engine import VLLMRolloutEngine

            engine = VLLMRolloutEngine(
                location,
                settings=rollout_engine_settings(cfg),
                sleep=cfg.vllm_sleep,
                spec=f"train:{name}",
            )
            if adapter is not None:  # resumed LoRA: the engine starts from the trained weights
                engine.push(merged_state_dict(lm))
        else:
            engine = HFBackend(
                model=lm,
                tokenizer=tokenizer,
                batch_size=1024,
                batch_tokens=cfg.rollout_batch_tokens,
                spec=f"train:{name}",
            )
        temperature = cfg.capable_temperature if name == "capable" else cfg.light_temperature
        return Policy(lm, net, tokenizer, optimizer, engine, temperature, lora is not None and trainable)

    def _examples(self, task: str, data, split, fields) -> list[Example]:
        options = {"n": max(self.cfg.steps * self.cfg.questions_per_step, 1000), "seed": self.cfg.seed}
        if task == "builtin":
            return list(load_task(task, split=split or "train", **options))
        return list(load_task(task, data, fields=fields or None, split=split))

    def _eval_examples(self) -> list[Example]:
        cfg = self.cfg
        if cfg.eval_task is None:  # the builtin task's test split
            return list(load_task("builtin", split="test", n=cfg.eval_questions))
        examples = list(load_task(cfg.eval_task, cfg.eval_data, split=cfg.eval_split))
        return examples[: cfg.eval_questions]

    def _training_examples(self) -> list[Example]:
        """The training set, without any question that the evaluation set also holds."""
        cfg = self.cfg
        examples = self._examples(cfg.task, cfg.data, cfg.split, cfg.fields)
        held_out = {_normalized(e.question) for e in self._all_eval_examples()}
        kept = [e for e in examples if _normalized(e.question) not in held_out]
        if len(kept) < len(examples):
            logger.warning(
                "dropped %d training questions that the evaluation set also holds", len(examples) - len(kept)
            )
        if not kept:
            raise ConfigError(
                f"task {cfg.task}: no training question is left once the evaluation set is removed"
            )
        return kept

    def _all_eval_examples(self) -> list[Example]:
        cfg = self.cfg
        if cfg.eval_task is None:
            return list(load_task("builtin", split="test", n=max(cfg.eval_questions, 1000)))
        return list(load_task(cfg.eval_task, cfg.eval_data, split=cfg.eval_split))

    def _next_questions(self) -> list[Example]:
        """This process's shard of the next batch. The data position is global; each pass over
        the data has its own order, from the seed and the pass number (so resuming repeats it)."""
        n, examples = self.cfg.questions_per_step, self.train_examples
        batch = []
        for offset in range(n):
            epoch, index = divmod(self.position + offset, len(examples))
            if self._order[0] != epoch:
                order = list(range(len(examples)))
                random.Random(f"{self.cfg.seed}:epoch:{epoch}").shuffle(order)
                self._order = (epoch, order)
            batch.append(examples[self._order[1][index]])
        self.position += n
        return batch[self.rank :: self.world]

    def warm_start(self) -> dict:
        """Fine-tune M on a probe's oracle cuts of training questions (`warm_start`); the KL
        reference (full fine-tuning) becomes the warm-started M, so that GRPO's KL term keeps it
        near where the warm start put it, not near the verbose M."""
        from duetlm.train.warm_start import WarmStartSettings, fine_tune, warm_start_targets

        cfg = self.cfg
        training = {_normalized(e.question) for e in self.train_examples}
        held_out = {_normalized(e.question) for e in self._all_eval_examples()}
        targets = warm_start_targets(
            cfg.warm_start,
            lambda question: _normalized(question) in training and _normalized(question) not in held_out,
            cfg.capable,
        )
        settings = WarmStartSettings(cfg.warm_start_epochs, cfg.warm_start_lr, cfg.warm_start_batch, cfg.seed)
        report = fine_tune(
            self.capable,
            targets,
            cfg.duet,
            cfg.signal_max_tokens,
            settings,
            self.acc.device,
            cfg.precision,
            self.acc.backward,
            cfg.max_grad_norm,
        )
        if self.reference is not None:
            self.reference.lm.load_state_dict(self.capable.lm.state_dict())
        self._push_engines()
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "warm_start.json").write_text(json.dumps({"run": cfg.warm_start} | report, indent=2))
        return report

    # --- one step ------------------------------------------------------------------------

    def train_step(self) -> dict:
        started = time.perf_counter()
        questions = self._next_questions()
        metrics = self._single_model_step(questions) if self.cfg.single_model else self._joint_step(questions)
        self.step += 1
        metrics |= {"step": self.step, "lambda": self.lam, "step_s": time.perf_counter() - started}
        return metrics

    def _joint_step(self, questions: list[Example]) -> dict:
        cfg = self.cfg
        capable = self.rollouts.capable_signals(questions, self.step)  # n_M signals per question
        alone = self.rollouts.light_alone(questions)  # (Q, A)
        light_seqs, pair_correct = self.rollouts.light_guided(questions, capable.signals)  # (Q, S, A)
        self._release_engines()
        old = self._logps(self.capable, capable.seqs)  # the sampling policy's log-probs
        lengths, forced = capable.lengths, capable.forced  # (Q, S)
        kl = self._kl(capable.seqs, old).reshape(lengths.shape)  # (Q, S)
        scores = score_joint(
            pair_correct,
            alone,
            lengths,
            kl,
            self.lam,
            cfg.length_bound,
            cfg.kl_beta,
            cfg.use_marginal_utility,
        )
        # λ is the dual variable of the policy's constraint E[L] <= B, updated after the rewards:
        # forced cuts are not samples of the policy, so they stay out of the mean that drives it.
        mean_length = self._global_masked_mean(lengths, 1.0 - forced)
        self.lam = update_lambda(self.lam, mean_length, cfg.length_bound, cfg.lambda_lr, cfg.lambda_schedule)
        metrics = self._rollout_metrics(capable, scores, pair_correct, kl, mean_length, lengths, forced, old)
        if cfg.train_light:
            metrics |= self._update("light", self.light, light_seqs, scores.light_advantages.reshape(-1))
        trained = capable.seqs
        if cfg.forced_stop_credit == "stop":  # a cut's advantage trains only the inserted close tag
            cut_rows = [i for i, s in enumerate(s for g in capable.signals for s in g) if s.forced]
            trained = credit_only_tail(capable.seqs, cut_rows, len(self.rollouts.close_ids))
        metrics |= self._update("capable", self.capable, trained, scores.capable_advantages.reshape(-1), old)
        self._push_engines()
        return metrics

    def _single_model_step(self, questions: list[Example]) -> dict:
        cfg = self.cfg
        seqs, correct, lengths = self.rollouts.capable_alone(questions)  # (Q, S) each
        self._release_engines()
        old = self._logps(self.capable, seqs)
        kl = self._kl(seqs, old).reshape(lengths.shape)
        reward = single_model_rewards(correct, lengths, self.lam, cfg.length_bound) - cfg.kl_beta * kl
        mean_length = self._global_mean(lengths)
        self.lam = update_lambda(self.lam, mean_length, cfg.length_bound, cfg.lambda_lr, cfg.lambda_schedule)
        metrics = {
            "reward": self._global_mean(reward),
            "accuracy": self._global_mean(correct),
            "output_tokens": mean_length,
            "kl": self._global_mean(kl),
        }
        metrics |= self._update("capable", self.capable, seqs, group_advantages(reward).reshape(-1), old)
        self._push_engines()
        return metrics

    def _rollout_metrics(self, capable, scores, pair_correct, kl, mean_length, lengths, forced, old) -> dict:
        metrics = {
            "reward": self._global_mean(scores.reward),
            "r_pair": self._global_mean(scores.r_pair),
            "r_light": self._global_mean(scores.r_light),
            "signal_tokens": mean_length,
            "signal_tokens_with_cuts": self._global_mean(lengths),
            "pair_accuracy": self._global_mean(pair_correct.float()),
            "kl": self._global_mean(kl),
            "forced_stops": self._global_mean(forced),
        }
        if self.cfg.check_rollout_logprobs:
            metrics["rollout_logprob_gap"] = rollout_logprob_gap(capable, old)
        return metrics

    # --- log-probs, KL, updates, engines -------------------------------------------------

    def _logps(self, policy: Policy | LogprobNet, seqs: Sequences) -> torch.Tensor:
        """Per-token log-probs at the rollout temperature, no gradient, in length-sorted
        micro-batches. (B, T-1), 0 outside completions."""
        net = policy.net if isinstance(policy, Policy) else policy
        net = getattr(net, "module", net)  # no DDP for a pass without gradients
        out = torch.zeros(seqs.completion_mask.shape)
        net.eval()
        with torch.no_grad(), autocast(self.acc.device, self.cfg.precision):
            for rows in seqs.micro_batches(self.cfg.micro_batch):
                part = seqs.take(rows)
                logps = net(
                    part.input_ids.to(self.acc.device),
                    part.attention_mask.to(self.acc.device),
                    part.completion_mask.to(self.acc.device),
                    self.capable.temperature if isinstance(policy, LogprobNet) else policy.temperature,
                )
                out[rows, : logps.shape[1]] = logps.float().cpu()
        return out

    def _kl(self, seqs: Sequences, policy_logps: torch.Tensor) -> torch.Tensor:
        if self.cfg.kl_beta == 0:
            return torch.zeros(len(seqs))
        if self.reference is not None:
            ref = self._logps(self.reference, seqs)
        else:
            with self.capable.lm.disable_adapter():
                ref = self._logps(self.capable, seqs)
        return kl_sum(policy_logps, ref, seqs.completion_mask)  # (B,)

    def _update(self, name: str, policy: Policy, seqs, advantages, old_logps=None) -> dict:
        cfg = self.cfg
        if old_logps is None and cfg.ppo_epochs * cfg.mini_batches > 1:
            old_logps = self._logps(policy, seqs)  # several steps: the ratio needs the sampling policy
        group = cfg.n_capable * cfg.n_light if name == "light" else cfg.n_capable
        settings = UpdateSettings(
            cfg.ppo_epochs,
            cfg.mini_batches,
            cfg.micro_batch,
            cfg.clip_eps,
            cfg.max_grad_norm,
            cfg.precision,
            seed=zlib.crc32(f"{cfg.seed}:{self.step}:{name}".encode()),
        )
        stats = ppo_update(policy, self.acc, seqs, old_logps, advantages, group, settings, self._global_sum)
        return {
            f"loss_{name}": stats.loss,
            f"grad_norm_{name}": stats.grad_norm,
            f"clip_fraction_{name}": stats.clip_fraction,
        }

    def _release_engines(self) -> None:
        for policy in (self.capable, self.light):
            if hasattr(policy.engine, "release"):
                policy.engine.release()

    def _push_engines(self) -> None:
        """A vLLM engine samples from the trained weights from the next step on; the hf engine
        wraps the trained module itself and needs nothing."""
        for policy in (self.capable, self.light):
            if hasattr(policy.engine, "push") and policy.optimizer is not None:
                policy.engine.push(merged_state_dict(policy.lm))

    def _global_sum(self, value: torch.Tensor) -> float:
        value = value.detach().float().reshape(1).to(self.acc.device)
        return (
            float(self.acc.reduce(value, reduction="sum").item()) if self.world > 1 else float(value.item())
        )

    def _global_masked_mean(self, values: torch.Tensor, weights: torch.Tensor) -> float:
        """Mean of the values with weight 1 over all processes (of all values if none has)."""
        count = self._global_sum(weights.sum())
        if count == 0:
            return self._global_mean(values)
        return self._global_sum((values * weights).sum()) / count

    def _global_mean(self, values: torch.Tensor) -> float:
        values = values.detach().float()
        return self._global_sum(values.sum()) / self._global_sum(torch.tensor(float(values.numel())))

    # --- evaluation ----------------------------------------------------------------------

    def evaluate(self) -> dict:
        """Greedy accuracy and M tokens on the eval questions (the pair, or M alone in the
        single-model baseline)."""
        cfg = self.cfg
        config = cfg.duet.model_copy(
            update={
                "temperature": 0.0,
                "signal_max_tokens": cfg.signal_max_tokens,
                "answer_max_tokens": cfg.answer_max_tokens,
                "alone_max_tokens": cfg.signal_max_tokens + cfg.answer_max_tokens,
            }
        )
        duet = Duet(self.capable.engine, self.light.engine, config)
        mode = "M-alone" if cfg.single_model else "duet"
        with autocast(self.acc.device, cfg.precision):
            results = duet.solve_batch([e.problem for e in self.eval_examples], mode)
        correct = [
            r.answer is not None and grade(r.text, e).correct
            for r, e in zip(results, self.eval_examples, strict=True)
        ]
        return {
            "eval_accuracy": sum(correct) / len(correct),
            "eval_capable_tokens": sum(r.usage.capable.output_tokens for r in results) / len(results),
        }

    # --- checkpoints ---------------------------------------------------------------------

    def save(self) -> Path:
        """An HF folder per trained model plus the trainer state, swapped in as `last`."""
        self.acc.wait_for_everyone()
        path = self.out / "last"
        if self.acc.is_main_process:
            path = ckpt.save_checkpoint(self.out, self._write_models, self._state())
        self.acc.wait_for_everyone()
        return path

    def _write_models(self, folder: Path) -> None:
        for name, policy in (("capable", self.capable), ("light", self.light)):
            if policy.optimizer is None:
                continue
            if policy.lora:
                policy.lm.save_pretrained(folder / f"{name}_adapter")
                if self.cfg.merge_adapters:
                    policy.lm.get_base_model().save_pretrained(
                        folder / name, state_dict=merged_state_dict(policy.lm)
                    )
            else:
                policy.lm.save_pretrained(folder / name)
            policy.tokenizer.save_pretrained(folder / name)

    def _state(self) -> dict:
        """Tensors and plain containers only: loadable with weights_only=True."""
        return {
            "step": self.step,
            "lambda": self.lam,
            "position": self.position,
            "capable_optimizer": self.capable.optimizer.state_dict(),
            "light_optimizer": self.light.optimizer.state_dict() if self.light.optimizer else None,
            "python_rng": random.getstate(),
            "torch_rng": torch.get_rng_state(),
            "config": self.cfg.model_dump(),
        }

    def _restore(self, state: dict, checkpoint: Path) -> None:
        self.step, self.lam, self.position = state["step"], state["lambda"], state["position"]
        self.capable.optimizer.load_state_dict(state["capable_optimizer"])
        if self.light.optimizer is not None and state["light_optimizer"] is not None:
            self.light.optimizer.load_state_dict(state["light_optimizer"])
        random.setstate(_as_rng_state(state["python_rng"]))
        torch.set_rng_state(state["torch_rng"])
        logger.info("resumed from %s at step %d", checkpoint, self.step)


def rollout_engine_settings(cfg: TrainConfig):
    """The vLLM rollout engine computes in the trainer's dtype (bf16 under bf16-mixed: the fp32
    masters are cast when pushed), so that both score the same numbers."""
    from duetlm.backends.vllm_start import VLLMSettings, on_cpu, require_vllm

    require_vllm()
    share = cfg.vllm_gpu_memory_utilization
    if share is None and not on_cpu():
        share = 0.3
    dtype = "bfloat16" if cfg.precision == "bf16-mixed" else "float32"
    return VLLMSettings(gpu_memory_utilization=share, dtype=dtype, seed=cfg.seed)


def rollout_logprob_gap(capable, old: torch.Tensor) -> float:
    """Largest |engine log-prob − trainer log-prob| over M's sampled tokens (forced cuts skipped)."""
    gaps, row = [0.0], 0
    mask = capable.seqs.completion_mask
    for group in capable.signals:
        for signal in group:
            if signal.sampled_logprobs and not signal.forced:
                trainer = old[row][mask[row].bool()][: len(signal.sampled_logprobs)]
                engine = torch.tensor(signal.sampled_logprobs[: len(trainer)])
                gaps.append(float((trainer - engine).abs().max()))
            row += 1
    return max(gaps)


def _normalized(question: str) -> str:
    return " ".join(question.lower().split())


def _as_rng_state(state) -> tuple:
    """random.setstate wants tuples; a state that went through torch.save may hold lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def train(config: TrainConfig, resume: bool = False, progress: bool = True, force: bool = False) -> Path:
    """Run (or resume) training; returns the run folder. Metrics go to metrics.jsonl (one line
    per step, rewritten to the checkpoint's step on resume) and TensorBoard. A new run refuses a
    folder that holds another run unless `force` (which moves that run aside)."""
    from tqdm.auto import tqdm

    from duetlm.train.logging import MetricsLog

    started = time.perf_counter()
    if not resume:
        ckpt.claim_run_folder(Path(config.out), force)
    trainer = DuetTrainer(config, resume=resume)
    first_step = trainer.step
    log = MetricsLog(trainer.out, config, enabled=trainer.acc.is_main_process, keep_until=trainer.step)
    bar = tqdm(
        total=config.steps,
        initial=trainer.step,
        desc="train",
        unit="step",
        disable=not (progress and trainer.acc.is_main_process),
    )
    if trainer.step == 0 and config.warm_start:
        trainer.warm_start()
    if trainer.step == 0 and config.eval_every:
        log.write({"step": 0, "lambda": trainer.lam} | trainer.evaluate())
    while trainer.step < config.steps:
        metrics = trainer.train_step()
        if config.eval_every and trainer.step % config.eval_every == 0:
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
    if trainer.acc.is_main_process:
        final = {
            "step": trainer.step,
            "lambda": trainer.lam,
            "resumed_at": first_step,
            "wall_s": time.perf_counter() - started,  # this call: loading, steps, evals, saves
        }
        (trainer.out / "final.json").write_text(json.dumps(final))
    return trainer.out
