"""The flow-matching action head against the DDPM/DDIM one, side by side on one run's cache.

    .venv/bin/python scripts/bench_action_heads.py --run runs/tiny
    .venv/bin/python scripts/bench_action_heads.py --run runs/tiny --mode onestep --steps 1,2,5,10

Trains (or finds trained) the run's `--mode` policy twice, with `policy.action_head.type` ddpm and
flow and everything else equal (cache, decouplers, aggregator config, seed, steps), into
`<run>/bench-heads/<type>/`. Then, on the cache's test clips (no stage selects on them), with the
streams computed once per clip under the cache's noise and shared by both heads, for each K in
`--steps`: the action error of the sampled chunk (MSE of unnormalised actions per clip, the same
head noise per clip for both heads), paired per clip: the mean difference flow - ddpm with a
paired bootstrap 95% interval (scipy.stats.bootstrap) and the Wilcoxon signed-rank p-value; and the
latency of the head alone (context encoding and K steps, batch 1) and of a whole control step
(`predict`), heads and K interleaved round by round, medians and p95.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from svam.config import load_config
from svam.data.teacher_cache import CURRENT, teacher_cache_loader
from svam.eval.measure import fixed_threads, noise_generators, summary_ms
from svam.policy.configuration_policy import HEAD_TYPES
from svam.policy.modeling_policy import ShortcutPolicy
from svam.policy.train import is_policy_trained, policy_paths, train_policy
from svam.seeding import keyed_generator


def trained(config, mode: str, head: str, run: Path) -> Path:
    config = copy.deepcopy(config)
    config.train_policy.mode = mode
    config.policy.action_head.type = head
    config.train_policy.output_dir = str(run / "bench-heads" / head)
    if not is_policy_trained(config):
        train_policy(config)
    return policy_paths(config).output


def action_errors(policies, batches, steps, seed) -> dict[tuple[str, int], np.ndarray]:
    """Per-clip MSE of unnormalised actions, per (head, K)."""
    errors: dict[tuple[str, int], list[float]] = defaultdict(list)
    first = next(iter(policies.values()))
    for batch in batches:
        keys, instructions = list(batch["key"]), list(batch["instruction"])
        streams = first.streams(
            batch[CURRENT], instructions, noise_generators(seed, keys, "cache_noise")
        )
        truth = batch["actions"].float()
        for head, policy in policies.items():
            state = batch["state"][:, 0].float() if policy.config.use_state else None
            for k in steps:
                generators = [keyed_generator(seed, "bench-heads", key, k) for key in keys]
                chunk = policy.act(streams, instructions, state, generators, k).cpu()
                errors[head, k] += (chunk - truth).square().mean((1, 2)).tolist()
    return {key: np.asarray(value) for key, value in errors.items()}


def latencies(policies, batch, steps, rounds, warmup) -> dict[tuple[str, str, int], dict]:
    """(head, "head" or "step", K) -> ms summary, everything interleaved round by round."""
    times: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    frames, instruction = batch[CURRENT][:1], [batch["instruction"][0]]
    first = next(iter(policies.values()))
    streams = first.streams(frames, instruction, torch.Generator().manual_seed(0))
    for round_ in range(warmup + rounds):
        for head, policy in policies.items():
            state = batch["state"][:1, 0].float() if policy.config.use_state else None
            text = policy.text(instruction)
            for k in steps:
                generator = torch.Generator().manual_seed(round_)
                start = time.perf_counter()
                cond = policy.net.condition(streams, text, state)
                policy.net.head.sample(cond, generator, k)
                head_time = time.perf_counter() - start
                start = time.perf_counter()
                policy.predict(frames, instruction, state, generator, k)
                step_time = time.perf_counter() - start
                if round_ >= warmup:
                    times[head, "head", k].append(head_time)
                    times[head, "step", k].append(step_time)
    return {key: summary_ms(value) for key, value in times.items()}


def paired(flow: np.ndarray, ddpm: np.ndarray, seed: int) -> dict:
    diff = flow - ddpm
    interval = stats.bootstrap(
        (flow, ddpm),
        lambda a, b: np.mean(a - b),
        paired=True,
        vectorized=False,
        n_resamples=2000,
        random_state=seed,
    ).confidence_interval
    p = stats.wilcoxon(flow, ddpm).pvalue if np.any(diff != 0) else 1.0
    return {"mean": float(diff.mean()), "ci": [interval.low, interval.high], "p": float(p)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="tiny", help="the config the run was built with")
    parser.add_argument("--run", required=True, help="run directory (with cache, decouplers)")
    parser.add_argument("--mode", default="shortcut", help="policy kind to train both heads for")
    parser.add_argument("--steps", default="1,2,5,10", help="comma-separated K")
    parser.add_argument("--clips", type=int, default=256, help="test clips (evenly spaced)")
    parser.add_argument("--rounds", type=int, default=30, help="latency rounds")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args()
    run = Path(args.run)
    config = load_config(
        args.config, [f"run.root={run.parent}", f"run.name={run.name}", *args.overrides]
    )
    steps = [int(k) for k in args.steps.split(",")]
    seed = config.run.seed
    directories = {head: trained(config, args.mode, head, run) for head in HEAD_TYPES}
    with fixed_threads(config.eval.threads):
        policies = {
            head: ShortcutPolicy.from_pretrained(path) for head, path in directories.items()
        }
        cache = policy_paths(config).cache
        arrays = [CURRENT, "state", "actions"]
        loader = teacher_cache_loader(
            cache, "test", batch_size=16, arrays=arrays, shuffle=False, max_clips=args.clips
        )
        batches = list(loader)
        errors = action_errors(policies, batches, steps, seed)
        timing = latencies(policies, batches[0], steps, args.rounds, warmup=3)
    clips = len(next(iter(errors.values())))
    print(
        f"{args.mode} policy, {clips} test clips of {cache}, {config.train_policy.steps} "
        f"training steps per head; latency: medians (p95) of {args.rounds} interleaved rounds, "
        f"{config.eval.threads or torch.get_num_threads()} thread(s), batch 1"
    )
    print("| K | head | action MSE (mean per clip) | head ms | control step ms |")
    print("|---:|---|---:|---:|---:|")
    results = []
    for k in steps:
        for head in HEAD_TYPES:
            mse = errors[head, k]
            h, s = timing[head, "head", k], timing[head, "step", k]
            print(
                f"| {k} | {head} | {mse.mean():.4g} | {h['median']:.2f} ({h['p95']:.2f}) | "
                f"{s['median']:.1f} ({s['p95']:.1f}) |"
            )
            results.append(
                {"k": k, "head": head, "mse": float(mse.mean()), "head_ms": h, "step_ms": s}
            )
    print("\nflow - ddpm, paired per clip (bootstrap 95% CI, Wilcoxon signed-rank p):")
    comparisons = {}
    for k in steps:
        c = paired(errors["flow", k], errors["ddpm", k], seed)
        comparisons[k] = c
        print(f"  K={k}: {c['mean']:+.4g} [{c['ci'][0]:+.4g}, {c['ci'][1]:+.4g}], p={c['p']:.3g}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": results, "flow_minus_ddpm": comparisons, "clips": clips}, indent=2)
        )


if __name__ == "__main__":
    main()
