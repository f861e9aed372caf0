"""In-sample against out-of-sample foresight, and what training the policy on each buys.

    .venv/bin/python scripts/study_cross_fit.py --run bench --folds 3

On a run that holds episodes, a teacher and a teacher cache (e.g. after `svam demo`), in
`runs/<run>/cross-fit/`:

1. `svam distill` with distill.cross_fit_folds=K: the published decouplers and K fold pairs.
2. Foresight skill on the train clips of each fold (skill against "nothing moves", standardised
   by the train split's statistics, distill/fidelity.py), from the published decouplers, which
   fitted those clips (in-sample), and from the fold's pair, which held them out (out-of-sample,
   what the policy meets at evaluation); test clips for reference.
3. Two shortcut policies, identical but for train_policy.cross_fit (in-sample vs out-of-sample
   foresight in training), each evaluated closed-loop on the same episodes; their success compared
   pair by pair (svam.eval.stats.paired_comparison: Tango interval, exact McNemar).

Prints a table and writes `runs/<run>/cross-fit/study.json`.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from svam.config import load_config
from svam.data.teacher_cache import TARGETS, TeacherCache, clip_episode, teacher_cache_loader
from svam.distill.cross_fitting import fold_dir, read_folds
from svam.distill.fidelity import ForesightFidelity, summarize_tokens
from svam.distill.modeling_decoupler import Decoupler
from svam.distill.train import distill, distill_paths
from svam.eval.evaluate import REPORT_JSON, evaluate
from svam.eval.stats import paired_comparison
from svam.policy.modeling_policy import BRANCHES
from svam.policy.train import is_policy_trained, train_policy


@torch.no_grad()
def skill(decouplers: Path, cache: TeacherCache, split: str, keep: set[str], moments) -> dict:
    """Each branch's foresight skill over the clips of `split` whose episode is in `keep`."""
    models = {b: Decoupler.from_pretrained(decouplers / b).eval() for b in BRANCHES}
    others = {clip_episode(k) for _, k in cache.members(split)} - keep
    loader = teacher_cache_loader(
        cache,
        split,
        batch_size=16,
        arrays=[*TARGETS, "onestep"],
        shuffle=False,
        exclude_episodes=frozenset(others),
    )
    frames = models["semantic"].config.num_frames
    metrics = {b: ForesightFidelity(frames, *moments[b]) for b in BRANCHES}
    clips = 0
    for batch in loader:
        features = batch["onestep"].float()
        for branch, model in models.items():
            reference = batch[f"{branch}_ref"].float()
            prediction = model(features, reference if model.config.reference else None)
            metrics[branch].update(prediction, batch[branch].float(), reference)
        clips += len(batch["key"])
    result = {"clips": clips}
    for branch, metric in metrics.items():
        per_frame = {k: v.tolist() for k, v in metric.compute().items()}
        result[branch] = summarize_tokens(per_frame)["skill"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="bench")
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    base = load_config(args.config, [f"run.name={args.run}", *args.overrides])
    root = Path(base.run.root) / args.run / "cross-fit"
    decouplers = root / "decouplers"
    config = copy.deepcopy(base)
    config.distill.output_dir = str(decouplers)
    config.distill.cross_fit_folds = args.folds
    distill(config)

    cache = TeacherCache.open(distill_paths(config).cache, verify=False)
    saved = torch.load(decouplers / "baselines.pt", weights_only=True)
    moments = {b: (saved[f"{b}.mean"], saved[f"{b}.std"].clamp_min(1e-6)) for b in BRANCHES}
    folds = read_folds(decouplers)
    foresight = {"in_sample": [], "out_of_sample": []}
    for fold in range(folds["folds"]):
        held = {e for e, f in folds["fold_of"].items() if f == fold}
        foresight["in_sample"].append(skill(decouplers, cache, "train", held, moments))
        foresight["out_of_sample"].append(
            skill(fold_dir(decouplers, fold), cache, "train", held, moments)
        )
    test_episodes = {clip_episode(k) for _, k in cache.members("test")}
    foresight["test"] = skill(decouplers, cache, "test", test_episodes, moments)

    success = {}
    for cross_fit in (False, True):
        name = "out_of_sample" if cross_fit else "in_sample"
        policy = copy.deepcopy(config)
        policy.train_policy.mode = "shortcut"
        policy.train_policy.decouplers = str(decouplers)
        policy.train_policy.cross_fit = cross_fit
        policy.train_policy.output_dir = str(root / f"policy-{name}")
        if not is_policy_trained(policy):
            train_policy(policy)
        policy.eval.policy = policy.train_policy.output_dir
        policy.eval.decouplers = str(decouplers)
        policy.eval.modes = ["shortcut"]
        policy.eval.output_dir = str(root / f"eval-{name}")
        evaluate(policy)
        report = json.loads((root / f"eval-{name}" / REPORT_JSON).read_text())
        tasks = report["modes"]["shortcut"]["success"]["tasks"]
        success[name] = {task: result["outcomes"] for task, result in tasks.items()}
    comparison = paired_comparison(success["out_of_sample"], success["in_sample"])

    def mean(rows: list[dict], branch: str) -> float:
        return sum(r[branch] * r["clips"] for r in rows) / sum(r["clips"] for r in rows)

    results = {"folds": folds["folds"], "foresight": foresight, "success": comparison}
    (root / "study.json").write_text(json.dumps(results, indent=2))
    print("foresight skill on train clips (clip-weighted over folds) and on test clips:")
    for branch in BRANCHES:
        print(
            f"  {branch}: in-sample {mean(foresight['in_sample'], branch):+.3f}, out-of-sample "
            f"{mean(foresight['out_of_sample'], branch):+.3f}, test {foresight['test'][branch]:+.3f}"
        )
    low, high = comparison["ci95"]
    print(
        f"shortcut success, trained on out-of-sample vs in-sample foresight: "
        f"{comparison['rate_a']:.3f} vs {comparison['rate_b']:.3f} over {comparison['pairs']} paired "
        f"episodes, difference {100 * comparison['difference']:+.1f} points "
        f"[{100 * low:+.1f}, {100 * high:+.1f}], exact McNemar p = {comparison['p_value']:.3g}"
    )


if __name__ == "__main__":
    main()
