"""Do the tests catch a wrong objective? Each mutation below breaks docs/design.md section 2 in one
way; the script applies it to a copy of the package, runs the tests that guard the objective
against that copy, and reports whether they failed (as they must).

    python bench/mutation_check.py            # all mutations; exit code 1 if any survives
    python bench/mutation_check.py --list
    python bench/mutation_check.py --only clip,axes
    python bench/mutation_check.py --every-test   # name every test that catches each one

Each caught mutation is listed with the test that caught it first (with --every-test, all the
tests that failed on it).

The copy is put first on PYTHONPATH, so the tests import the mutated package; the working
tree is never touched.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUARDS = [  # the quick ones first: by default a mutation's run ends at its first failing test
    "tests/test_train_math.py",
    "tests/test_objective.py",
    "tests/test_prefix_sharing.py",
    "tests/test_objective_rollouts.py",
    "tests/test_train_qwen3.py::test_old_and_recomputed_logprobs_agree_at_step_0",
    "tests/test_train_qwen3.py::test_an_engine_at_another_temperature_is_corrected_only_with_the_option_on",
    "tests/test_train_qwen3.py::test_the_kl_in_the_loss_draws_the_capable_model_back_to_its_reference",
    "tests/test_train_review.py::test_m_answers_each_signal_with_independent_draws",
    "tests/test_train_review.py::test_m_engine_at_another_temperature_is_corrected_on_its_own",
]

# (name, file under src/duetlm, text to find, replacement)
MUTATIONS = [
    (
        "KL added with the wrong sign",
        "train/algorithm/reward.py",
        'reward = parts["reward"] if kl is None else parts["reward"] - kl_beta * kl',
        'reward = parts["reward"] if kl is None else parts["reward"] + kl_beta * kl',
    ),
    (
        "m's group reduced to one signal's n_m answers",
        "train/algorithm/grpo.py",
        "flat = pair_correct.float().reshape(q, s * a)",
        "flat = pair_correct.float().reshape(q * s, a)",
    ),
    (
        "M's group taken over the whole batch",
        "train/algorithm/reward.py",
        "group_advantages(reward, scale=scale_rewards, batch_std=capable_std)",
        "group_advantages(reward.reshape(1, -1), scale=scale_rewards, batch_std=capable_std).reshape(reward.shape)",
    ),
    (
        "λ updated before the rewards",
        "train/loop/objectives.py",
        "            lam,\n            objective.length_bound,\n            objective.kl_beta,\n",
        "            update_lambda(lam, parts.masked_mean(lengths, 1.0 - forced), objective.length_bound, "
        "objective.lambda_lr, objective.lambda_schedule),\n            objective.length_bound,\n"
        "            objective.kl_beta,\n",
    ),
    (
        "λ driven by forced cuts too",
        "train/loop/objectives.py",
        "mean_length = parts.masked_mean(lengths, 1.0 - forced)",
        "mean_length = parts.mean(lengths)",
    ),
    (
        "log-probs at temperature 1 instead of the rollout temperature",
        "train/modeling/policy.py",
        "return token_logps(self.lm, input_ids, attention_mask, temperature, completion_mask, self.chunk)",
        "return token_logps(self.lm, input_ids, attention_mask, 1.0, completion_mask, self.chunk)",
    ),
    (
        "m graded against the next question's gold",
        "train/rollouts/rollout.py",
        "grade(result.text, questions.examples[q])",
        "grade(result.text, questions.examples[(q + 1) % len(questions)])",
    ),
    (
        "PPO clip bounded above only",
        "train/algorithm/grpo.py",
        "torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)",
        "torch.clamp(ratio, max=1 + clip_eps)",
    ),
    (
        "loss mask over the prompt and the signal too",
        "train/rollouts/rollout.py",
        "return pack(prompt_ids(tokenizer, requests), completions, tokenizer.pad_token_id)",
        "return pack([[] for _ in requests], [p + c for p, c in zip(prompt_ids(tokenizer, requests), "
        "completions)], tokenizer.pad_token_id)",
    ),
    (
        "after a forced cut, m reads the uncut signal",
        "train/rollouts/rollout.py",
        "signal = Signal(cut, self.style.signal(closed), True, engine)",
        "signal = Signal(cut, signal.text, True, engine)",
    ),
    (
        "the single-model baseline without its KL term",
        "train/loop/objectives.py",
        "reward = reward - objective.kl_beta * kl",
        "reward = reward",
    ),
    (
        "m's advantages read with the n_M and n_m axes swapped",
        "train/rollouts/batch.py",
        "return table[self.question, self.signal, self.answer]",
        "return table.flatten(1)[self.question, self.answer * table.shape[1] + self.signal]",
    ),
    (
        "a micro-batch's advantages taken by position, not by row",
        "train/rollouts/batch.py",
        "None if self.advantages is None else self.advantages[rows],",
        "None if self.advantages is None else self.advantages[: len(rows)],",
    ),
    (
        "rollout correction: the IS weight not applied",
        "train/loop/update.py",
        "weights = None if part.is_weights is None else part.is_weights.to(device)",
        "weights = None",
    ),
    (
        "rollout correction: the threshold ignored",
        "train/algorithm/correction.py",
        "weights = raw.clamp(max=threshold)",
        "weights = raw",
    ),
    (
        "rollout correction: a sequence's weight from its mean log-ratio",
        "train/algorithm/correction.py",
        "raw_rows = torch.exp(log_ratio.sum(dim=1))",
        "raw_rows = torch.exp(log_ratio.mean(dim=1))",
    ),
    (
        "KL counted twice (in the reward and in the loss)",
        "train/loop/objectives.py",
        'kl if objective.kl_placement == "reward" else None,',
        "kl,",
    ),
    (
        "k3 with the log-ratio reversed",
        "train/algorithm/grpo.py",
        "log_ratio = ref_logps - logps",
        "log_ratio = logps - ref_logps",
    ),
    (
        "batch scaling by the group's std",
        "train/algorithm/grpo.py",
        "return (centered / (batch_std + eps)).to(dtype)",
        "return (centered / (rewards.std(dim=-1, keepdim=True) + eps)).to(dtype)",
    ),
    (
        "a shared prefix's rows misaligned by one position",
        "train/rollouts/sequences.py",
        "positions.append(start + j)",
        "positions.append(start + j + 1)",
    ),
    (
        "a packed row sees its sibling rows",
        "train/rollouts/sequences.py",
        "visible = (who[None, :] == -1) | (who[None, :] == who[:, None])",
        "visible = who[None, :] == who[None, :]",
    ),
    (
        "soft-capping left out of the scored logits",
        "train/algorithm/grpo.py",
        "logits = torch.tanh(logits / cap) * cap",
        "logits = logits",
    ),
    (
        "m's answers to one signal share one seed (n_m copies of one answer)",
        "train/rollouts/rollout.py",
        'self._seed(questions, "light", (q, s, a)),',
        'self._seed(questions, "light", (q, s, 0)),',
    ),
    (
        "m's importance weights dropped from its update",
        "train/loop/objectives.py",
        "scored = batch.with_scores(batch.per_row(advantages), old, None, weights)",
        "scored = batch.with_scores(batch.per_row(advantages), old, None, None)",
    ),
]


def run_guards(src: Path, every_test: bool = True) -> tuple[list[str], float, str]:
    """(the guarding tests that failed, seconds, last lines of the output). One failing test
    is enough to catch a mutation, so unless `every_test` the run stops there: most mutations
    then cost seconds, not a whole run of the guards."""
    started = time.perf_counter()
    env = os.environ | {"PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    stop = [] if every_test else ["-x"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *stop, *GUARDS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    lines = (done.stdout + done.stderr).strip().splitlines()
    failed = [line.split()[1] for line in lines if line.startswith("FAILED ")]
    if done.returncode != 0 and not failed:  # a collection or import error: no test could pass
        failed = ["(the tests did not run: " + (lines[-1] if lines else "no output") + ")"]
    return failed, time.perf_counter() - started, "\n".join(lines[-3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument(
        "--only",
        default="",
        help="apply only the mutations whose name holds one of these texts (comma-separated)",
    )
    parser.add_argument(
        "--every-test",
        action="store_true",
        help="run every guarding test on each mutation and name all that fail (slower; by "
        "default a mutation's run stops at the first test that catches it)",
    )
    args = parser.parse_args()
    wanted = [w.strip().lower() for w in args.only.split(",")]
    chosen = [m for m in MUTATIONS if any(w in m[0].lower() for w in wanted)]
    if args.list:
        for name, file, _, _ in MUTATIONS:
            print(f"{name}  ({file})")
        return
    if not chosen:
        raise SystemExit(f"no mutation's name holds {args.only!r}; --list names them")
    for name, file, find, _ in chosen:  # before any run: a stale text fails now, not an hour in
        if (ROOT / "src" / "duetlm" / file).read_text().count(find) != 1:
            raise SystemExit(f"mutation {name!r}: the text to change is not in {file} exactly once")
    survivors = []
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", clean)
        failed, seconds, tail = run_guards(clean)
        if failed:
            raise SystemExit(f"the guarding tests fail on the unmutated package:\n{tail}")
        print(f"unmutated: the guarding tests pass ({seconds:.0f} s)")
        for name, file, find, replace in chosen:
            mutated = Path(tmp) / "mutated"
            shutil.rmtree(mutated, ignore_errors=True)
            shutil.copytree(ROOT / "src", mutated)
            path = mutated / "duetlm" / file
            path.write_text(path.read_text().replace(find, replace))
            failed, seconds, _ = run_guards(mutated, args.every_test)
            print(f"{'caught  ' if failed else 'SURVIVED'} {name} ({seconds:.0f} s)", flush=True)
            for test in failed:
                print(f"           by {test}")
            if not failed:
                survivors.append(name)
    if survivors:
        raise SystemExit(f"{len(survivors)} mutation(s) survived: {', '.join(survivors)}")
    print(f"all {len(chosen)} mutations caught")


if __name__ == "__main__":
    main()
