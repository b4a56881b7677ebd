"""Do the tests catch a wrong objective? Each mutation below breaks docs/design.md section 2 in one
way; the script applies it to a copy of the package, runs the tests that guard the objective
against that copy, and reports whether they failed (as they must).

    python bench/mutation_check.py            # all mutations; exit code 1 if any survives
    python bench/mutation_check.py --list
    python bench/mutation_check.py --only clip,axes

Each caught mutation is listed with the tests that failed on it.

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
GUARDS = [
    "tests/test_objective.py",
    "tests/test_objective_rollouts.py",
    "tests/test_train_math.py",
    "tests/test_train_qwen3.py::test_old_and_recomputed_logprobs_agree_at_step_0",
]

# (name, file under src/duetlm, text to find, replacement)
MUTATIONS = [
    (
        "KL added with the wrong sign",
        "train/reward.py",
        'reward = parts["reward"] - kl_beta * kl',
        'reward = parts["reward"] + kl_beta * kl',
    ),
    (
        "m's group reduced to one signal's n_m answers",
        "train/grpo.py",
        "group_advantages(pair_correct.float().reshape(q, s * a), eps).reshape(q, s, a)",
        "group_advantages(pair_correct.float().reshape(q * s, a), eps).reshape(q, s, a)",
    ),
    (
        "M's group taken over the whole batch",
        "train/reward.py",
        'reward, parts["r_pair"], parts["r_light"], group_advantages(reward), light_advantages(pair_correct)',
        'reward, parts["r_pair"], parts["r_light"], group_advantages(reward.reshape(1, -1)).reshape(reward.shape), '
        "light_advantages(pair_correct)",
    ),
    (
        "λ updated before the rewards",
        "train/trainer.py",
        "            kl,\n            self.lam,\n",
        "            kl,\n            update_lambda(self.lam, self._global_masked_mean(lengths, 1.0 - forced), "
        "cfg.length_bound, cfg.lambda_lr, cfg.lambda_schedule),\n",
    ),
    (
        "λ driven by forced cuts too",
        "train/trainer.py",
        "mean_length = self._global_masked_mean(lengths, 1.0 - forced)",
        "mean_length = self._global_mean(lengths)",
    ),
    (
        "log-probs at temperature 1 instead of the rollout temperature",
        "train/policy.py",
        "return token_logps(self.lm, input_ids, attention_mask, temperature, completion_mask, self.chunk)",
        "return token_logps(self.lm, input_ids, attention_mask, 1.0, completion_mask, self.chunk)",
    ),
    (
        "m graded against the next question's gold",
        "train/rollout.py",
        "grade(r.text, questions[i // per_question])",
        "grade(r.text, questions[(i // per_question + 1) % len(questions)])",
    ),
    (
        "r(m) drawn from the next question's standalone answers",
        "train/rollout.py",
        "_final_correct(r.text, questions[i // cfg.n_light], cfg)",
        "_final_correct(r.text, questions[(i // cfg.n_light + 1) % len(questions)], cfg)",
    ),
    (
        "r(m) of the next question subtracted in R_M",
        "train/reward.py",
        "reward = reward - r_light[:, None]",
        "reward = reward - r_light.roll(-1)[:, None]",
    ),
    (
        "PPO clip bounded above only",
        "train/grpo.py",
        "torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)",
        "torch.clamp(ratio, max=1 + clip_eps)",
    ),
    (
        "loss mask over the prompt and the signal too",
        "train/rollout.py",
        "return pack(prompt_ids(tokenizer, requests), completions, tokenizer.pad_token_id)",
        "return pack([[] for _ in requests], [p + c for p, c in zip(prompt_ids(tokenizer, requests), "
        "completions)], tokenizer.pad_token_id)",
    ),
    (
        "after a forced cut, m reads the uncut signal",
        "train/rollout.py",
        "signal = Signal(cut, signal_from_stage1(body, cfg.duet.prompts.think_open), True)",
        "signal = Signal(cut, signal.text, True)",
    ),
    (
        "the single-model baseline without its KL term",
        "train/trainer.py",
        "single_model_rewards(correct, lengths, self.lam, cfg.length_bound) - cfg.kl_beta * kl",
        "single_model_rewards(correct, lengths, self.lam, cfg.length_bound)",
    ),
    (
        "m's answers filed under the wrong signal (n_M, n_m axes swapped)",
        "train/rollout.py",
        "torch.tensor(correct).reshape(len(questions), cfg.n_capable, cfg.n_light)",
        "torch.tensor(correct).reshape(len(questions), cfg.n_light, cfg.n_capable).transpose(1, 2)",
    ),
    (
        "advantages indexed by position in the micro-batch, not by row",
        "train/update.py",
        "advantages[rows[part_rows]].to(device)",
        "advantages[part_rows].to(device)",
    ),
]


def run_guards(src: Path) -> tuple[list[str], float, str]:
    """(the guarding tests that failed, seconds, last lines of the output)."""
    started = time.perf_counter()
    env = os.environ | {"PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *GUARDS],
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
    args = parser.parse_args()
    wanted = [w.strip().lower() for w in args.only.split(",")]
    chosen = [m for m in MUTATIONS if any(w in m[0].lower() for w in wanted)]
    if args.list:
        for name, file, _, _ in MUTATIONS:
            print(f"{name}  ({file})")
        return
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
            text = path.read_text()
            if text.count(find) != 1:
                raise SystemExit(f"mutation {name!r}: the text to change is not in {file} exactly once")
            path.write_text(text.replace(find, replace))
            failed, seconds, _ = run_guards(mutated)
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
