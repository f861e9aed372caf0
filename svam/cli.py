"""The `svam` command line: one verb per pipeline stage; each verb parses, loads the config, calls the stage.

svam <verb> [--config FILE] [--run NAME] [key=value ...]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from svam import __version__
from svam.config import Config, load_config


@dataclass(frozen=True)
class Stage:
    verb: str
    summary: str
    description: str
    entry: str
    """'module:function' taking (config, **options)."""
    done: str | None = None
    """'module:function' telling whether the run already holds this stage's output for the config."""
    options: tuple[str, ...] = ()
    """Stage options the verb takes as flags: 'out_dir' (--out) and 'dry_run' (--dry-run)."""
    demo_entry: str | None = None
    """What `svam demo` runs for this stage instead of `entry` (with its own `demo_done`)."""
    demo_done: str | None = None

    def load(self, demo: bool = False) -> Callable:
        return _import(self.demo_entry if demo and self.demo_entry else self.entry)

    def is_done(self, config: Config, demo: bool = False) -> bool:
        done = self.demo_done if demo and self.demo_entry else self.done
        return done is not None and _import(done)(config)


def _import(entry: str) -> Callable:
    module, function = entry.split(":")
    return getattr(importlib.import_module(module), function)


STAGES = [
    Stage(
        "collect",
        "roll out Meta-World scripted experts into episode shards",
        """Runs Meta-World v3 tasks (collect.tasks) with the package's scripted expert policies for
        collect.episodes_per_task seeds each, rendering RGB and metric depth from collect.camera at
        collect.image_size, in collect.workers processes. Keeps successful episodes (unless
        collect.keep_failed) and writes them as webdataset shards with a manifest.json.
        Reads: nothing. Writes: runs/<name>/episodes/ (or --out).""",
        "svam.collect:collect",
        done="svam.collect:is_collected",
        options=("out_dir",),
    ),
    Stage(
        "train-teacher",
        "train or fine-tune the video diffusion teacher on episode clips",
        """Trains the SVD-architecture UNet to predict the future clip from the current frame and
        the instruction (EDM denoising loss; VAE frozen, warmed up first when built from scratch),
        with accelerate, EMA weights, tensorboard scalars and sample grids, and checkpoints that
        resume exactly (train_teacher.* keys). Runs under `accelerate launch` / `torchrun`.
        Reads: runs/<name>/episodes/. Writes: runs/<name>/teacher/ (diffusers layout) and
        runs/<name>/teacher-train/ (checkpoints, sample grids).""",
        "svam.teachers.train:train_teacher",
        done="svam.teachers.train:is_trained",
    ),
    Stage(
        "cache-teachers",
        "cache the teacher's multi-step foresight as DINOv2 / Depth Anything 3 targets",
        """Generates every clip's future with the teacher's multi-step sampling (cache.* keys),
        encodes it with DINOv2 (semantic) and Depth Anything 3 (geometric) as distillation
        targets, encodes the real current frame as reference tokens, and writes them with the
        clip's frames, actions and state into teacher-cache shards with a manifest.json.
        Resumable (a re-run redoes only unfinished shards); runs unchanged on many processes
        and nodes under `torchrun` or `accelerate launch`, each rank writing its own shards.
        Reads: episodes/, teacher/. Writes: runs/<name>/cache/ (or --out).""",
        "svam.teachers.cache:cache_teachers",
        done="svam.teachers.cache:is_cached",
        options=("out_dir", "dry_run"),
    ),
    Stage(
        "distill",
        "train the semantic and geometric decouplers on the teacher cache",
        """Trains the semantic and geometric decouplers (decouplers.* sizes, distill.* training
        keys) to map the teacher's one-step features, read from the cache or computed on the fly
        by the teacher when the cache holds none, to the cached multi-step foresight tokens
        (MSE + cosine loss), with accelerate (mixed precision; DDP under `accelerate launch` or
        `torchrun`), tensorboard scalars and checkpoints it resumes from exactly. Keeps each
        branch's best decoupler by validation fidelity and reports fidelity per future frame
        against two baselines (nothing moves; a linear probe), as fidelity.json and fidelity.md.
        Reads: cache/ (teacher/ on the fly). Writes: runs/<name>/decouplers/ (or --out).""",
        "svam.distill.train:distill",
        done="svam.distill.train:is_distilled",
        options=("out_dir",),
    ),
    Stage(
        "train-policy",
        "train the Uni-Perceiver and the diffusion action policy",
        """Trains the aggregator and the diffusion action head of one policy kind
        (train_policy.mode: shortcut, onestep, or multistep, which runs every multistep:K and
        partial:F mode) with the teacher, encoders and decouplers frozen; streams come from the
        cache (one-step features, decoupler foresight, cached N-step targets). accelerate, EMA
        weights, tensorboard, checkpoints it resumes from exactly; normalisers fitted on the
        train split. `svam demo` trains every kind eval.modes needs.
        Reads: cache/, teacher/, decouplers/. Writes: runs/<name>/policy/<mode>/ (or --out).""",
        "svam.policy.train:train_policy",
        done="svam.policy.train:is_policy_trained",
        options=("out_dir",),
        demo_entry="svam.policy.train:train_evaluated_policies",
        demo_done="svam.policy.train:are_evaluated_policies_trained",
    ),
    Stage(
        "eval",
        "the latency–fidelity report of every foresight mode",
        """Measures each mode of eval.modes (blind, onestep, shortcut, multistep:K, partial:F)
        side by side: control-step latency (median, p95; modes interleaved, threads fixed, batch
        1), FLOPs per step by part against this machine's measured matmul peak and at the
        published size (configs/svd-xt.yaml, counted on `meta`), foresight fidelity against the
        cache's N-step targets (skill against "nothing moves", standardised NMSE, centred cosine,
        depth against the teacher and the world) under the cache's noise and fresh noise with the
        teacher's sampling floor, and action error, on test clips no stage selected on; and task
        success in Meta-World closed loop on seeds never used for collection, the same episodes
        and noise in every mode (lockstep batches of eval.batch_size in eval.workers processes,
        a few rollouts as GIFs), compared mode against mode with exact paired tests. Writes
        report.md (headline table, the answers to "does the shortcut beat raw one-step features,
        how far is it from full multi-step foresight, and does vision matter at all", with the
        smallest difference the run could detect), report.json, PNG plots with the Pareto front,
        and tensorboard figures. A rerun reuses every measurement whose inputs did not change; a
        mode without a policy is reported as missing. A cache without test clips is refused.
        Reads: policy/, cache/, teacher/, decouplers/. Writes: runs/<name>/eval/.""",
        "svam.eval.evaluate:evaluate",
        done="svam.eval.evaluate:is_evaluated",
        options=("out_dir",),
    ),
]
STAGES_BY_VERB = {stage.verb: stage for stage in STAGES}


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default="tiny",
        help="YAML config file, or the name of one in configs/ (default: tiny, the embedded default)",
    )
    parser.add_argument(
        "--run", help="run name: outputs go to <run.root>/<NAME>/ (overrides run.name)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. collect.workers=1"
    )


def _config_from(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.run:
        overrides.append(f"run.name={args.run}")
    return load_config(args.config, overrides)


def _run_stage(stage: Stage, args: argparse.Namespace) -> int:
    config = _config_from(args)
    options = {name: getattr(args, name) for name in stage.options if getattr(args, name)}
    stage.load()(config, **options)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    """Every stage in order on one run directory, skipping stages whose output is complete;
    ends with the report's path and headline table."""
    import time

    from tqdm.auto import tqdm

    config = _config_from(args)
    start = time.perf_counter()
    with tqdm(total=len(STAGES), desc="demo", unit="stage", position=0) as bar:
        for index, stage in enumerate(STAGES, 1):
            bar.set_description(f"demo [{index}/{len(STAGES)}] {stage.verb}")
            if stage.is_done(config, demo=True):
                tqdm.write(f"demo: {stage.verb}: already done for this config, skipped")
            else:
                tqdm.write(f"demo: {stage.verb}")
                stage.load(demo=True)(config)
            bar.update()
    from svam.eval.evaluate import REPORT_JSON, evaluate_dir
    from svam.eval.report import headline_table

    report = evaluate_dir(config)
    minutes, seconds = divmod(int(time.perf_counter() - start), 60)
    print(f"\ndemo: done in {minutes}m{seconds:02d}s; report: {report / 'report.md'}\n")
    print(headline_table(json.loads((report / REPORT_JSON).read_text())))
    return 0


def _shards_inspect(args: argparse.Namespace) -> int:
    from svam.data.shards import MANIFEST_NAME, ShardSet

    shard_set = ShardSet.open(args.path, verify=False)
    manifest = shard_set.manifest
    print(f"{shard_set.root}: {manifest['kind']} shards, schema v{manifest['schema_version']}")
    hidden = ("shards", "schema", "episodes", "splits")
    summary = {k: v for k, v in manifest.items() if k not in hidden}
    print(textwrap.indent(json.dumps(summary, indent=2, sort_keys=True), "  "))
    splits = manifest.get("splits")
    if splits:  # a teacher cache: clips and episodes per split, the fractions that cut them
        from svam.data.episodes import SPLITS

        sizes = ", ".join(
            f"{name} {manifest['counts'].get(name, 0)} clips / {splits['episodes'][name]} episodes"
            for name in SPLITS
            if name in splits["episodes"]
        )
        print(
            f"splits: {sizes} (by episode, stratified by task: data.val_fraction="
            f"{splits['val_fraction']}, data.test_fraction={splits['test_fraction']})"
        )
    print(f"shards ({len(manifest['shards'])}, listed in {MANIFEST_NAME}):")
    for shard in manifest["shards"]:
        print(
            f"  {shard['name']}  {shard['samples']:>5} samples  {shard['bytes']:>12,} B  {shard['sha256'][:16]}"
        )
    print("schema:")
    for name, spec in manifest["schema"]["arrays"].items():
        print(f"  {name:<10} {spec['dtype']:<8} {tuple(spec['dims'])}  {spec['doc']}")
    print(f"  meta.json  {', '.join(manifest['schema']['meta'])}")
    key, arrays, meta = next(shard_set.samples(shard_set.shard_paths[:1]))
    print(f"first sample '{key}':")
    for name, array in arrays.items():
        print(f"  {name:<10} {str(array.dtype):<8} {tuple(array.shape)}")
    print(f"  meta       {json.dumps(meta, sort_keys=True)}")
    return 0


def _shards_verify(args: argparse.Namespace) -> int:
    from svam.data.shards import ShardSet

    shard_set = ShardSet.open(args.path, verify=True)
    count = sum(1 for _ in shard_set.samples())
    print(
        f"{shard_set.root}: OK ({len(shard_set.shard_paths)} shards, {count} samples: field "
        "digests, counts, keys, members and sha256 match the manifest)"
    )
    return 0


def _import_lerobot(args: argparse.Namespace) -> int:
    from svam.lerobot_io import import_lerobot

    import_lerobot(_config_from(args), args.path, args.out_dir)
    return 0


def _export_lerobot(args: argparse.Namespace) -> int:
    from svam.lerobot_io import export_lerobot

    export_lerobot(_config_from(args), args.source, args.out)
    return 0


def _pretrain_encoders(args: argparse.Namespace) -> int:
    from svam.teachers.pretrain import pretrain_encoders

    pretrain_encoders(_config_from(args), args.out_dir)
    return 0


def _add_pretrain_verb(verbs) -> None:
    pretrain = verbs.add_parser(
        "pretrain-encoders",
        help="train the geometric encoder on the simulator's depth (no real weights at hand)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Train the configured Depth Anything 3 architecture (encoders.geometric_model at
            encoders.geometric_image_size) with its own depth head on the train episodes' frames,
            supervised by their metric depth (pretrain_encoders.* keys; accelerate, checkpoints,
            exact resume), and write a Depth Anything 3 directory that
            encoders.geometric_weights loads exactly as real weights. Refused when
            encoders.geometric_weights is given: there is nothing to pretrain.
            Reads: runs/<name>/episodes/. Writes: runs/<name>/encoders/geometric/ (or --out)."""
        ),
    )
    _add_config_arguments(pretrain)
    pretrain.add_argument("--out", dest="out_dir", help="write the encoder here instead")
    pretrain.set_defaults(handler=_pretrain_encoders)


def _add_lerobot_verbs(verbs) -> None:
    """`svam import lerobot PATH` and `svam export lerobot RUN_OR_SHARDS OUT`."""
    importer = verbs.add_parser(
        "import",
        help="import a dataset of another format as episode shards",
        description="Bring your own data: datasets of other formats as svam episode shards.",
    )
    formats = importer.add_subparsers(dest="format", metavar="FORMAT", required=True)
    lerobot = formats.add_parser(
        "lerobot",
        help="a local LeRobot dataset (v2.0, v2.1 or v3.0)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Import a LeRobot dataset directory (nothing is fetched from a hub) into episode shards
            that train-teacher and every later stage read. The layout is told by meta/info.json's
            codebase_version: v2.x (one parquet and one mp4 per episode) or v3.0 (many episodes per
            file). Frames come from lerobot.camera (default: the first camera in info.json's
            features), decoded with PyAV by timestamp and resized to lerobot.image_size (default
            collect.image_size); state from lerobot.state, actions from lerobot.action (their
            dimensions are taken from the data by every later stage); the instruction from the
            episode's task; lerobot.fps subsamples. Episodes decode in lerobot.workers processes,
            a shard at a time, in bounded memory; an interrupted import re-run resumes and ends
            byte-identical to an uninterrupted one. Imported episodes hold no depth: the stages
            that use the simulator's depth say so and skip it.
            Writes: runs/<name>/episodes/ (or --out)."""
        ),
    )
    lerobot.add_argument(
        "path", type=Path, help="LeRobot dataset directory (holding meta/info.json)"
    )
    lerobot.add_argument("--out", dest="out_dir", help="write the episode shards here instead")
    _add_config_arguments(lerobot)
    lerobot.set_defaults(handler=_import_lerobot)

    exporter = verbs.add_parser(
        "export",
        help="export episode shards in another format",
        description="svam episode shards in other formats.",
    )
    formats = exporter.add_subparsers(dest="format", metavar="FORMAT", required=True)
    lerobot = formats.add_parser(
        "lerobot",
        help="as a LeRobot v3.0 dataset",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Write a run's episode shards (or any episode shard directory) as a LeRobot v3.0
            dataset: parquet data (state, action, timestamps, indices), one AV1 mp4 per camera
            file (lerobot's defaults: libsvtav1, yuv420p, keyframe every 2 frames, crf 30;
            lerobot.video_* keys), meta/info.json, tasks, episodes with per-episode statistics
            and stats.json, so lerobot and the tools around it read it. svam's task name, seed
            and success ride along as svam/* episode columns, which an import reads back.
            Depth is not exported. Built beside OUT and put in place when complete."""
        ),
    )
    lerobot.add_argument("source", help="a run name, a run directory or an episode shard directory")
    lerobot.add_argument("out", type=Path, help="the dataset directory to create")
    _add_config_arguments(lerobot)
    lerobot.set_defaults(handler=_export_lerobot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="svam",
        description="Distil one-step shortcut video-action models (S-VAM) for robots. "
        "Each verb is one pipeline stage; all stages of a run share runs/<name>/.",
        epilog="`svam VERB --help` explains a verb. `svam demo` runs the whole loop on the embedded default.",
    )
    parser.add_argument("--version", action="version", version=f"svam {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for stage in STAGES:
        sub = verbs.add_parser(
            stage.verb,
            help=stage.summary,
            description=stage.summary + ".\n\n" + textwrap.dedent("        " + stage.description),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_config_arguments(sub)
        if "out_dir" in stage.options:
            sub.add_argument(
                "--out", dest="out_dir", help="write the output here instead of the run directory"
            )
        if "dry_run" in stage.options:
            sub.add_argument(
                "--dry-run",
                action="store_true",
                help="print the plan and an estimate, write nothing",
            )
        sub.set_defaults(handler=lambda args, stage=stage: _run_stage(stage, args))
    demo = verbs.add_parser(
        "demo",
        help="run every stage on the embedded default, resuming where it stopped",
        description="Runs the pipeline's stages in order on one run directory "
        "(default config: configs/tiny.yaml, Meta-World with tiny models on the CPU).",
    )
    _add_config_arguments(demo)
    demo.set_defaults(handler=_run_demo)
    _add_pretrain_verb(verbs)
    _add_lerobot_verbs(verbs)
    shards = verbs.add_parser(
        "shards", help="inspect or verify a shard set", description="Shard-set tools."
    )
    shard_verbs = shards.add_subparsers(dest="shards_verb", metavar="ACTION", required=True)
    inspect = shard_verbs.add_parser(
        "inspect",
        help="print the manifest, the schema and a sample's shapes",
        description="Print a "
        "shard set's manifest summary, its shards, its schema and the first sample's shapes.",
    )
    inspect.add_argument("path", type=Path, help="shard-set directory (holding manifest.json)")
    inspect.set_defaults(handler=_shards_inspect)
    verify = shard_verbs.add_parser(
        "verify",
        help="check every shard against the manifest",
        description="Check manifest.json against the shards: its field digests (an edited "
        "manifest is refused naming the field), sample counts, every shard's keys and each "
        "sample's members, sizes and sha256; then decode every sample against the schema.",
    )
    verify.add_argument("path", type=Path, help="shard-set directory (holding manifest.json)")
    verify.set_defaults(handler=_shards_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):  # `svam shards inspect PATH | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes a verb's positionals in one run, so `import lerobot PATH --out X key=value`
    # leaves the overrides after the option unclaimed: they are still overrides.
    if (
        extra
        and hasattr(args, "overrides")
        and all("=" in a and not a.startswith("-") for a in extra)
    ):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.handler(args)
    except (ValueError, OSError) as exc:
        if os.environ.get("SVAM_DEBUG"):
            raise
        print(f"svam {args.verb}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"svam {args.verb}: interrupted", file=sys.stderr)
        return 130
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Under torchrun or accelerate launch, tear the process group down before exit: gloo's
    threads left to the interpreter's shutdown can abort a rank that has finished its work."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
