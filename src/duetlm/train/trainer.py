"""The joint DUET training loop (DESIGN section 2).

One step, in the reference order:
    M rollout -> standalone m (once per question) -> guided m -> rewards -> λ update
    -> update m -> update M
Rollouts go through the same `HFBackend` as inference, wrapping the very modules being
trained, so what is trained is what is served. Under `torchrun`/`accelerate launch` each
process takes a shard of the batch's questions; λ, token counts and metrics are reduced over
all processes and gradients are averaged by DDP, so N processes compute the update of one.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from duetlm.backends import parse_spec
from duetlm.backends.base import GenerationRequest, SamplingParams, render_chat
from duetlm.backends.hf import HFBackend, pick_device, resolve_model_location
from duetlm.config import DuetConfig
from duetlm.errors import ConfigError
from duetlm.protocol import (
    Duet,
    capable_request,
    light_request,
    signal_from_stage1,
    split_thinking,
    user_prompt,
)
from duetlm.tasks import Example, grade, load_task
from duetlm.train.config import LoraSettings, TrainConfig
from duetlm.train.grpo import group_advantages, kl_sum, light_advantages, ppo_clip_loss, token_logps
from duetlm.train.reward import capable_rewards, single_model_rewards, update_lambda
from duetlm.train.rollout import Sequences, credit_only_tail, force_early_stop, pack

logger = logging.getLogger(__name__)


@dataclass
class Policy:
    """A trainable model with its tokenizer, optimizer and the backend that samples from it."""

    model: torch.nn.Module  # possibly DDP-wrapped
    tokenizer: object
    optimizer: torch.optim.Optimizer | None
    backend: HFBackend
    temperature: float = 1.0  # the rollout temperature: log-probs are those of what was sampled

    @property
    def module(self):
        return getattr(self.model, "module", self.model)


def model_location(spec: str) -> str:
    parsed = parse_spec(spec)
    if parsed.kind not in ("hf", "vllm"):
        raise ConfigError(
            f"training needs local weights (hf: or vllm: spec or an embedded name), got {spec!r}"
        )
    return resolve_model_location(parsed.model)[0]


def load_policy(location: str, lora: LoraSettings | None, device: torch.device, adapter: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(location).exists()
    tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(location, local_files_only=local, dtype=dtype).to(device)
    if lora is not None:
        from peft import LoraConfig, PeftModel, get_peft_model

        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        else:
            config = LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, config)
    return model, tokenizer


class DuetTrainer:
    def __init__(self, config: TrainConfig, resume: bool = False, accelerator=None) -> None:
        from accelerate import Accelerator

        self.cfg = config
        device = pick_device(config.device)
        self.acc = accelerator or Accelerator(cpu=device.type == "cpu")
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        if config.questions_per_step % self.world:
            raise ConfigError(
                f"questions_per_step ({config.questions_per_step}) must divide evenly over {self.world} processes"
            )
        self.out = Path(config.out)
        checkpoint = self.out / "last" if resume else None
        if resume and not (checkpoint / "state.pt").is_file():
            raise ConfigError(f"--resume: no checkpoint at {checkpoint}")
        self.step, self.lam, self.position = 0, config.lambda_init, 0
        random.seed(config.seed)
        torch.manual_seed(config.seed)

        capable_location, light_location = model_location(config.capable), model_location(config.light)
        self.capable = self._policy(
            capable_location, config.lora_capable, config.capable_lr, checkpoint, "capable", trainable=True
        )
        self.light = self._policy(
            light_location,
            config.lora_light,
            config.light_lr,
            checkpoint,
            "light",
            trainable=config.train_light,
        )
        self.reference = None
        if config.kl_beta > 0 and config.lora_capable is None:
            # The initial M, frozen (with LoRA, the base model with adapters off plays this part).
            self.reference, _ = load_policy(capable_location, None, self.acc.device)
            self.reference.eval().requires_grad_(False)

        self.train_examples = self._training_examples()
        self.eval_examples = self._eval_examples()
        self.duet_config = config.duet.model_copy(update={"seed": None})
        self.think_close_ids = self.capable.tokenizer(
            config.duet.prompts.think_close, add_special_tokens=False
        )["input_ids"]
        if checkpoint is not None:
            self._load_state(checkpoint)

    # --- setup ---------------------------------------------------------------------------

    def _policy(self, location, lora, lr, checkpoint, name, trainable, engine="hf") -> Policy:
        weights, adapter = location, None
        if checkpoint is not None and (checkpoint / name).is_dir():
            if lora is not None and (checkpoint / f"{name}_adapter").is_dir():
                adapter = str(checkpoint / f"{name}_adapter")
            else:
                weights = str(checkpoint / name)
        model, tokenizer = load_policy(weights, lora if trainable else None, self.acc.device, adapter)
        optimizer = None
        if trainable:
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=self.cfg.weight_decay)
            model, optimizer = self.acc.prepare(model, optimizer)
        else:
            model.requires_grad_(False)
        module = getattr(model, "module", model)
        if engine == "vllm":
            # Rollouts on vLLM; `_sync_engine` pushes the trained weights after every update.
            from duetlm.backends.vllm import VLLMBackend

            backend = VLLMBackend(weights, gpu_memory_utilization=0.3, spec=f"train:{name}")
        else:
            backend = HFBackend(model=module, tokenizer=tokenizer, batch_size=256, spec=f"train:{name}")
        temperature = self.cfg.capable_temperature if name == "capable" else self.cfg.light_temperature
        return Policy(model, tokenizer, optimizer, backend, temperature)

    @staticmethod
    def _sync_engine(policy: Policy) -> None:
        """After an update, a vLLM rollout engine gets the new weights (LoRA merged on the fly);
        the hf backend wraps the trained module itself and needs nothing."""
        if hasattr(policy.backend, "load_weights"):
            module = policy.module
            if hasattr(module, "merge_and_unload"):
                module = copy.deepcopy(module).merge_and_unload()
            policy.backend.load_weights((name, p.detach()) for name, p in module.state_dict().items())

    def _training_examples(self) -> list[Example]:
        cfg = self.cfg
        if cfg.task == "builtin":
            examples = list(
                load_task(
                    "builtin", split="train", n=max(cfg.steps * cfg.questions_per_step, 1000), seed=cfg.seed
                )
            )
        else:
            examples = list(load_task(cfg.task, cfg.data))
        random.Random(cfg.seed).shuffle(examples)
        return examples

    def _eval_examples(self) -> list[Example]:
        if self.cfg.task == "builtin":
            return list(load_task("builtin", split="test", n=self.cfg.eval_questions))
        return list(load_task(self.cfg.task, self.cfg.data))[: self.cfg.eval_questions]

    def _next_questions(self) -> list[Example]:
        """This process's shard of the next batch; the data position is global."""
        n, examples = self.cfg.questions_per_step, self.train_examples
        batch = [examples[(self.position + i) % len(examples)] for i in range(n)]
        self.position += n
        return batch[self.rank :: self.world]

    def _sampling_config(self, temperature: float) -> DuetConfig:
        return self.duet_config.model_copy(
            update={
                "temperature": temperature,
                "top_p": self.cfg.top_p,
                "answer_max_tokens": self.cfg.answer_max_tokens,
            }
        )

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
        signals, capable_seqs = self.rollout_capable(questions)  # n_M per question
        alone_correct = self.rollout_light_alone(questions)  # (Q, A)
        light_seqs, pair_correct = self.rollout_light_guided(questions, signals)  # (Q, S, A)
        lengths = torch.tensor(
            [[len(s["ids"]) for s in group] for group in signals], dtype=torch.float32
        )  # (Q, S)

        capable_old = self._logps(self.capable.module, capable_seqs, self.capable.temperature)
        kl = self._kl(capable_seqs, capable_old).reshape(lengths.shape)  # (Q, S)
        parts = capable_rewards(
            pair_correct, alone_correct, lengths, self.lam, cfg.length_bound, cfg.use_marginal_utility
        )
        reward = parts["reward"] - cfg.kl_beta * kl  # (Q, S)
        forced = torch.tensor([[float(s["forced"]) for s in g] for g in signals])  # (Q, S)
        # λ is the dual variable of the policy's constraint E[L] <= B: forced cuts are not samples
        # of the policy, so they stay out of the mean that drives it.
        mean_length = self._global_masked_mean(lengths, 1.0 - forced)
        self.lam = update_lambda(self.lam, mean_length, cfg.length_bound, cfg.lambda_lr, cfg.lambda_schedule)

        metrics = {
            "reward": self._global_mean(reward),
            "r_pair": self._global_mean(parts["r_pair"]),
            "r_light": self._global_mean(parts["r_light"]),
            "signal_tokens": mean_length,
            "signal_tokens_with_cuts": self._global_mean(lengths),
            "pair_accuracy": self._global_mean(pair_correct.float()),
            "kl": self._global_mean(kl),
            "forced_stops": self._global_mean(forced),
        }
        if cfg.train_light:
            adv = light_advantages(pair_correct).reshape(-1)  # (Q*S*A,)
            metrics["loss_light"], metrics["grad_norm_light"] = self._update(
                self.light, light_seqs, None, adv
            )
        adv = group_advantages(reward).reshape(-1)  # (Q*S,)
        trained_seqs = capable_seqs
        if cfg.forced_stop_credit == "stop":
            forced_rows = [i for i, s in enumerate(s for g in signals for s in g) if s["forced"]]
            trained_seqs = credit_only_tail(capable_seqs, forced_rows, len(self.think_close_ids))
        metrics["loss_capable"], metrics["grad_norm_capable"] = self._update(
            self.capable, trained_seqs, capable_old, adv
        )
        return metrics

    def _single_model_step(self, questions: list[Example]) -> dict:
        cfg = self.cfg
        sampling_cfg = self._sampling_config(cfg.capable_temperature)
        budget = cfg.signal_max_tokens + cfg.answer_max_tokens
        sampling = SamplingParams(budget, cfg.capable_temperature, cfg.top_p, None, ())
        requests = [
            GenerationRequest.chat(
                user_prompt(q.problem, sampling_cfg),
                sampling,
                chat_template_kwargs=sampling_cfg.capable_template_kwargs,
            )
            for q in questions
            for _ in range(cfg.n_capable)
        ]
        results = self.capable.backend.generate(requests)
        prompts = self._prompt_ids(self.capable.tokenizer, requests)
        seqs = pack(prompts, [r.token_ids for r in results], self.capable.tokenizer.pad_token_id)
        prompts_cfg = cfg.duet.prompts
        correct, lengths = [], []
        for index, result in enumerate(results):
            example = questions[index // cfg.n_capable]
            thinking, final = split_thinking(result.text, prompts_cfg.think_open, prompts_cfg.think_close)
            correct.append(float(thinking is not None and grade(final, example).correct))
            lengths.append(float(result.output_tokens))
        shape = (len(questions), cfg.n_capable)
        correct_t, lengths_t = torch.tensor(correct).reshape(shape), torch.tensor(lengths).reshape(shape)
        old = self._logps(self.capable.module, seqs, self.capable.temperature)
        kl = self._kl(seqs, old).reshape(shape)
        reward = single_model_rewards(correct_t, lengths_t, self.lam, cfg.length_bound) - cfg.kl_beta * kl
        mean_length = self._global_mean(lengths_t)
        self.lam = update_lambda(self.lam, mean_length, cfg.length_bound, cfg.lambda_lr, cfg.lambda_schedule)
        loss, grad_norm = self._update(self.capable, seqs, old, group_advantages(reward).reshape(-1))
        return {
            "reward": self._global_mean(reward),
            "accuracy": self._global_mean(correct_t),
            "output_tokens": mean_length,
            "kl": self._global_mean(kl),
            "loss_capable": loss,
            "grad_norm_capable": grad_norm,
        }

    # --- rollouts ------------------------------------------------------------------------

    def rollout_capable(self, questions: list[Example]) -> tuple[list[list[dict]], Sequences]:
        """n_M signals per question, some cut short by forced early stops (exploration)."""
        cfg = self.cfg
        sampling_cfg = self._sampling_config(cfg.capable_temperature)
        requests = [
            capable_request(q.problem, sampling_cfg, cfg.signal_max_tokens)
            for q in questions
            for _ in range(cfg.n_capable)
        ]
        results = self.capable.backend.generate(requests)
        tokenizer, think_open = self.capable.tokenizer, cfg.duet.prompts.think_open
        groups: list[list[dict]] = []
        for qi, question in enumerate(questions):
            group = []
            for si in range(cfg.n_capable):
                ids = list(results[qi * cfg.n_capable + si].token_ids or [])
                forced = False
                rng = random.Random(f"{cfg.seed}:{self.step}:{question.id}:{si}")
                if cfg.forced_stop_prob > 0 and rng.random() < cfg.forced_stop_prob:
                    cut = force_early_stop(ids, tokenizer, self.think_close_ids, rng)
                    if cut is not None:
                        ids, forced = cut, True
                body = (
                    ids[: -len(self.think_close_ids)]
                    if ids[-len(self.think_close_ids) :] == self.think_close_ids
                    else ids
                )
                text = tokenizer.decode(body, skip_special_tokens=False)
                group.append({"ids": ids, "signal": signal_from_stage1(text, think_open), "forced": forced})
            groups.append(group)
        prompts = self._prompt_ids(tokenizer, requests)
        seqs = pack(prompts, [s["ids"] for g in groups for s in g], tokenizer.pad_token_id)
        return groups, seqs

    def rollout_light_alone(self, questions: list[Example]) -> torch.Tensor:
        """r(m)(x): n_m standalone answers per question, drawn once per question. (Q, A)"""
        cfg = self.cfg
        light_cfg = self._sampling_config(cfg.light_temperature).model_copy(
            update={"light_alone_max_tokens": cfg.answer_max_tokens}
        )
        duet = Duet(self.light.backend, self.light.backend, light_cfg)
        results = duet.solve_batch([q.problem for q in questions for _ in range(cfg.n_light)], "m-alone")
        correct = [
            float(r.answer is not None and grade(r.text, questions[i // cfg.n_light]).correct)
            for i, r in enumerate(results)
        ]
        return torch.tensor(correct).reshape(len(questions), cfg.n_light)

    def rollout_light_guided(self, questions: list[Example], signals: list[list[dict]]):
        """n_m answers of m for every signal; returns m's sequences and correctness (Q, S, A)."""
        cfg = self.cfg
        light_cfg = self._sampling_config(cfg.light_temperature)
        kwargs = light_cfg.light_template_kwargs
        requests = [
            light_request(q.problem, s["signal"], light_cfg, kwargs)
            for q, group in zip(questions, signals, strict=True)
            for s in group
            for _ in range(cfg.n_light)
        ]
        results = self.light.backend.generate(requests)
        per_question = cfg.n_capable * cfg.n_light
        correct = [float(grade(r.text, questions[i // per_question]).correct) for i, r in enumerate(results)]
        seqs = pack(
            self._prompt_ids(self.light.tokenizer, requests),
            [r.token_ids or [] for r in results],
            self.light.tokenizer.pad_token_id,
        )
        return seqs, torch.tensor(correct).reshape(len(questions), cfg.n_capable, cfg.n_light)

    @staticmethod
    def _prompt_ids(tokenizer, requests: list[GenerationRequest]) -> list[list[int]]:
        rendered = [render_chat(tokenizer, r) for r in requests]
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]

    # --- log-probs, KL, updates ----------------------------------------------------------

    def _logps(self, model, seqs: Sequences, temperature: float = 1.0) -> torch.Tensor:
        """Per-token log-probs without gradient, in length-sorted micro-batches. (B, T-1)"""
        model.eval()
        out = torch.zeros(seqs.completion_mask.shape)
        with torch.no_grad():
            for rows in seqs.micro_batches(self.cfg.micro_batch):
                part = seqs.take(rows)
                logps = token_logps(
                    model,
                    part.input_ids.to(self.acc.device),
                    part.attention_mask.to(self.acc.device),
                    temperature,
                )
                out[rows, : logps.shape[1]] = logps.cpu()
        return out

    def _kl(self, seqs: Sequences, policy_logps: torch.Tensor) -> torch.Tensor:
        if self.cfg.kl_beta == 0:
            return torch.zeros(len(seqs))
        if self.reference is not None:
            ref = self._logps(self.reference, seqs, self.capable.temperature)
        else:
            with self.capable.module.disable_adapter():
                ref = self._logps(self.capable.module, seqs, self.capable.temperature)
        return kl_sum(policy_logps, ref, seqs.completion_mask)  # (B,)

    def _update(
        self,
        policy: Policy,
        seqs: Sequences,
        old_logps: torch.Tensor | None,
        advantages: torch.Tensor,
    ):
        """One PPO-clip epoch over the batch: token-mean over the global batch's tokens.

        With one epoch and one optimizer step per batch the sampling policy is the one being
        differentiated, so `old_logps=None` takes them from this very forward pass (detached)
        instead of a separate one: the same loss and gradient for a third less compute."""
        policy.model.train()
        policy.optimizer.zero_grad(set_to_none=True)
        global_tokens = self._global_sum(seqs.completion_mask.sum())
        total = 0.0
        for rows in seqs.micro_batches(self.cfg.micro_batch):
            part = seqs.take(rows)
            logps = token_logps(
                policy.model,
                part.input_ids.to(self.acc.device),
                part.attention_mask.to(self.acc.device),
                policy.temperature,
            )
            old = logps.detach() if old_logps is None else old_logps[rows, : logps.shape[1]].to(logps.device)
            loss = ppo_clip_loss(
                logps,
                old,
                advantages[rows].to(logps.device),
                part.completion_mask.to(logps.device),
                self.cfg.clip_eps,
                token_count=global_tokens,
            )
            # DDP averages gradients over processes; scaling restores the sum over the global batch.
            self.acc.backward(loss * self.world)
            total += loss.item()
        grad_norm = self.acc.clip_grad_norm_(policy.model.parameters(), self.cfg.max_grad_norm)
        policy.optimizer.step()
        policy.model.eval()
        self._sync_engine(policy)
        return self._global_sum(torch.tensor(total)), float(grad_norm)

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
        config = self.cfg.duet.model_copy(
            update={
                "temperature": 0.0,
                "signal_max_tokens": self.cfg.signal_max_tokens,
                "answer_max_tokens": self.cfg.answer_max_tokens,
                "alone_max_tokens": self.cfg.signal_max_tokens + self.cfg.answer_max_tokens,
            }
        )
        duet = Duet(self.capable.backend, self.light.backend, config)
        mode = "M-alone" if self.cfg.single_model else "duet"
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

    def save(self, path: Path | None = None) -> Path:
        """An HF folder per model plus trainer state, written next to `last` and swapped in,
        so a kill during the save leaves the previous checkpoint intact."""
        path = path or self.out / "last"
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            staging = path.with_name(path.name + ".tmp")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            for name, policy, lora in (
                ("capable", self.capable, self.cfg.lora_capable),
                ("light", self.light, self.cfg.lora_light),
            ):
                if name == "light" and not self.cfg.train_light:
                    continue
                module = self.acc.unwrap_model(policy.model)
                if lora is not None:
                    module.save_pretrained(staging / f"{name}_adapter")
                    if self.cfg.merge_adapters:
                        copy.deepcopy(module).merge_and_unload().save_pretrained(staging / name)
                else:
                    module.save_pretrained(staging / name)
                policy.tokenizer.save_pretrained(staging / name)
            state = {
                "step": self.step,
                "lambda": self.lam,
                "position": self.position,
                "capable_optimizer": self.capable.optimizer.state_dict(),
                "light_optimizer": self.light.optimizer.state_dict() if self.light.optimizer else None,
                "python_rng": random.getstate(),
                "torch_rng": torch.get_rng_state(),
                "config": self.cfg.model_dump(),
            }
            torch.save(state, staging / "state.pt")
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            if path.exists():
                path.rename(old)
            staging.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return path

    def _load_state(self, checkpoint: Path) -> None:
        state = torch.load(checkpoint / "state.pt", weights_only=False)
        self.step, self.lam, self.position = state["step"], state["lambda"], state["position"]
        self.capable.optimizer.load_state_dict(state["capable_optimizer"])
        if self.light.optimizer is not None and state["light_optimizer"] is not None:
            self.light.optimizer.load_state_dict(state["light_optimizer"])
        random.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
        logger.info("resumed from %s at step %d", checkpoint, self.step)


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) training; returns the run folder. Metrics go to metrics.jsonl (one line
    per step, rewritten to the checkpoint's step on resume) and TensorBoard."""
    from tqdm.auto import tqdm

    from duetlm.train.logging import MetricsLog

    started = time.perf_counter()
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
