"""Do the tests catch a wrong objective? Each mutation below breaks DESIGN section 2 in one
way; the script applies it to a copy of the package, runs the tests that guard the objective
against that copy, and reports whether they failed (as they must).

    python bench/mutation_check.py            # all mutations; exit code 1 if any survives
    python bench/mutation_check.py --list

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
]


def run_guards(src: Path) -> tuple[bool, float, str]:
    """(the guarding tests failed, seconds, last lines of their output)."""
    started = time.perf_counter()
    env = os.environ | {"PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *GUARDS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])
    return done.returncode != 0, time.perf_counter() - started, tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args()
    if args.list:
        for name, file, _, _ in MUTATIONS:
            print(f"{name}  ({file})")
        return
    survivors = []
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", clean)
        caught, seconds, tail = run_guards(clean)
        if caught:
            raise SystemExit(f"the guarding tests fail on the unmutated package:\n{tail}")
        print(f"unmutated: the guarding tests pass ({seconds:.0f} s)")
        for name, file, find, replace in MUTATIONS:
            mutated = Path(tmp) / "mutated"
            shutil.rmtree(mutated, ignore_errors=True)
            shutil.copytree(ROOT / "src", mutated)
            path = mutated / "duetlm" / file
            text = path.read_text()
            if text.count(find) != 1:
                raise SystemExit(f"mutation {name!r}: the text to change is not in {file} exactly once")
            path.write_text(text.replace(find, replace))
            caught, seconds, tail = run_guards(mutated)
            print(f"{'caught  ' if caught else 'SURVIVED'} {name} ({seconds:.0f} s)")
            if not caught:
                survivors.append(name)
    if survivors:
        raise SystemExit(f"{len(survivors)} mutation(s) survived: {', '.join(survivors)}")
    print(f"all {len(MUTATIONS)} mutations caught")


if __name__ == "__main__":
    main()
