"""Success against device speed: each mode's closed-loop success under async timing when a control
step costs its published-size FLOPs on a device of a given sustained throughput.

    .venv/bin/python scripts/sweep_control_budget.py --run runs/tiny
    .venv/bin/python scripts/sweep_control_budget.py --run runs/tiny --tflops 25,100,400 \\
        --modes onestep,shortcut,multistep:5 --episodes-per-task 16

For each throughput (TFLOP/s) runs `svam eval` with eval.timing=async and eval.device_tflops set,
into `<run>/eval-sweep/<tflops>/` (seeded with the run's eval/ records, so only the episodes run
again), and once with eval.timing=wait (the infinitely fast device: async with no delay is exactly
wait). Every point runs the same episodes, so the modes compare pair by pair at each speed. Writes
`<run>/eval-sweep/sweep.json`, `sweep.md` (success and delay per mode and speed) and
`success_vs_device.png` (success with 95% Wilson intervals against TFLOP/s, log scale).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from svam.config import load_config
from svam.eval.evaluate import evaluate
from svam.eval.report import wilson_interval

WAIT = "wait"


def point(args, run: Path, tflops: float | None) -> dict:
    """The report of one sweep point (None: wait timing)."""
    name = WAIT if tflops is None else f"{tflops:g}"
    out = run / "eval-sweep" / name
    if not out.exists() and (run / "eval").is_dir():
        shutil.copytree(run / "eval", out)
    overrides = [
        f"run.root={run.parent}",
        f"run.name={run.name}",
        f"eval.output_dir={out}",
        "eval.tensorboard=false",
        f"eval.timing={'wait' if tflops is None else 'async'}",
        *args.overrides,
    ]
    if tflops is not None:
        overrides.append(f"eval.device_tflops={tflops}")
    if args.modes:
        overrides.append(f"eval.modes=[{args.modes}]")
    if args.episodes_per_task:
        overrides.append(f"eval.episodes_per_task={args.episodes_per_task}")
    evaluate(load_config(args.config, overrides))
    return json.loads((out / "report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="tiny", help="the config the run was built with")
    parser.add_argument("--run", required=True, help="run directory (trained policies)")
    parser.add_argument("--tflops", default="12.5,50,200,800", help="device TFLOP/s to sweep")
    parser.add_argument("--modes", help="comma-separated modes (default: eval.modes)")
    parser.add_argument("--episodes-per-task", type=int, help="default: eval.episodes_per_task")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args()
    run = Path(args.run)
    speeds = sorted(float(x) for x in args.tflops.split(","))
    reports = {speed: point(args, run, speed) for speed in speeds}
    reports[None] = point(args, run, None)
    modes = [m for m, entry in reports[None]["modes"].items() if entry["status"] == "ok"]
    table = {}
    for mode in modes:
        table[mode] = []
        for speed, report in reports.items():
            entry = report["modes"][mode]
            success, timing = entry["success"], entry["timing"]
            low, high = wilson_interval(success["successes"], success["episodes"])
            table[mode].append(
                {
                    "tflops": speed,
                    "ms": timing.get("ms", 0.0),
                    "delay_steps": timing.get("delay_steps", 0),
                    "successes": success["successes"],
                    "episodes": success["episodes"],
                    "rate": success["rate"],
                    "ci": [low, high],
                }
            )
    out = run / "eval-sweep"
    (out / "sweep.json").write_text(json.dumps(table, indent=2) + "\n")
    header = " | ".join(["mode", *(f"{s:g} TFLOP/s" for s in speeds), "wait (infinitely fast)"])
    lines = [f"| {header} |", "|---" + "|---:" * (len(speeds) + 1) + "|"]
    for mode, points in table.items():
        cells = [
            f"{p['successes']}/{p['episodes']} ({p['delay_steps']} steps, {p['ms']:.0f} ms)"
            if p["tflops"] is not None
            else f"{p['successes']}/{p['episodes']}"
            for p in points
        ]
        lines.append(f"| `{mode}` | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    (out / "sweep.md").write_text(text + "\n")
    print(text)
    plot(table, speeds, out / "success_vs_device.png")
    print(f"-> {out}")


def plot(table: dict, speeds: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    wait_x = speeds[-1] * 4  # the infinitely fast device, drawn right of the sweep
    for offset, (mode, points) in enumerate(table.items()):
        xs = [p["tflops"] or wait_x for p in points]
        xs = [x * (1 + 0.04 * (offset - len(table) / 2)) for x in xs]  # side by side
        rates = [p["rate"] for p in points]
        below = [p["rate"] - p["ci"][0] for p in points]
        above = [p["ci"][1] - p["rate"] for p in points]
        ax.errorbar(xs, rates, yerr=[below, above], marker="o", capsize=3, label=mode)
    ax.set_xscale("log")
    ax.minorticks_off()
    ticks = [*speeds, wait_x]
    ax.set_xticks(ticks, [*(f"{s:g}" for s in speeds), "wait"])
    ax.set_xlabel("device throughput, TFLOP/s at the published size (async timing)")
    ax.set_ylabel("success rate (95% Wilson CI)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
