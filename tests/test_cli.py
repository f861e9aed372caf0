import json
import os
import subprocess
import sys

import pytest

from svam.cli import STAGES, build_parser, main

VERBS = [stage.verb for stage in STAGES] + ["demo", "shards"]


def test_console_script_help():
    result = subprocess.run(
        [sys.executable, "-m", "svam.cli", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for verb in VERBS:
        assert verb in result.stdout


@pytest.mark.parametrize("verb", VERBS + ["shards inspect", "shards verify"])
def test_every_verb_explains_itself(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*verb.split(), "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: svam " + verb)
    assert len(text.splitlines()) < 40  # one screen


def test_unknown_config_key_is_one_line(capsys):
    assert main(["collect", "collect.taks=[reach-v3]"]) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("svam collect: error: unknown config key 'collect.taks'") and "\n" not in err
    )


def test_unknown_task_is_one_line(tmp_path, capsys):
    assert main(["collect", f"run.root={tmp_path}", "collect.tasks=[pick-plase-v3]"]) == 1
    err = capsys.readouterr().err.strip()
    assert "pick-plase-v3" in err and "pick-place-v3" in err and "\n" not in err
    assert not any(tmp_path.rglob("*.tar"))


def test_shards_inspect_and_verify(synthetic_episodes, capsys):
    assert main(["shards", "inspect", str(synthetic_episodes)]) == 0
    out = capsys.readouterr().out
    assert "episodes shards, schema v1" in out and "shard-00002.tar" in out
    assert "frames     uint8    (20, 8, 8, 3)" in out
    assert main(["shards", "verify", str(synthetic_episodes)]) == 0
    assert "OK (3 shards, 8 samples" in capsys.readouterr().out


def test_shards_verify_fails_on_corruption(synthetic_episodes, capsys):
    shard = synthetic_episodes / "shard-00000.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF  # inside an array member: same size, same headers
    shard.write_bytes(bytes(data))
    assert main(["shards", "verify", str(synthetic_episodes)]) == 1
    assert "shard-00000.tar: sha256 does not match" in capsys.readouterr().err
    shard.write_bytes(b"garbage")
    assert main(["shards", "verify", str(synthetic_episodes)]) == 1
    assert "shard-00000.tar: 7 bytes" in capsys.readouterr().err


def test_run_flag_sets_the_run_name():
    args = build_parser().parse_args(["collect", "--run", "exp1", "collect.workers=1"])
    assert args.run == "exp1" and args.overrides == ["collect.workers=1"]


def test_demo_runs_every_stage_and_resumes(micro_demo, capsys):
    run, out = micro_demo
    args = ["demo", "--config", "micro", f"run.root={run.parent}"]
    stages = [stage.verb for stage in STAGES]
    ran = [line[len("demo: ") :] for line in out.splitlines() if line.startswith("demo: ")]
    assert ran[:-1] == stages and ran[-1].startswith("done in")
    report = run / "eval" / "report.json"
    assert f"report: {report.with_name('report.md')}" in out
    written = json.loads(report.read_text())
    modes = written["modes"]
    assert list(modes) == ["onestep", "shortcut", "multistep:2", "partial:0.5", "blind"]
    assert all(result["status"] == "ok" for result in modes.values())
    assert written["settings"]["split"] == "test" and written["sampling_floor"] is not None
    policies = (run / "policy").iterdir()
    assert sorted(p.name for p in policies if not p.name.endswith("-train")) == [
        *(f".{kind}.lock" for kind in ("blind", "multistep", "onestep", "shortcut")),
        "blind",
        "multistep",
        "onestep",
        "shortcut",
    ]
    headline = out[out.rindex("| mode |") :].splitlines()
    assert len(headline) == 3 + len(modes)  # the table (and its sampling floor) ends the output
    episodes = run / "episodes" / "shard-00000.tar"
    before = episodes.stat().st_mtime_ns, report.stat().st_mtime_ns
    assert main(args) == 0
    out = capsys.readouterr().out
    for verb in stages:
        assert f"demo: {verb}: already done for this config, skipped" in out
    assert (episodes.stat().st_mtime_ns, report.stat().st_mtime_ns) == before


def test_model_packages_install_inside_svams_namespace(tmp_path):
    """Installed, the model folders import as svam.teachers, svam.distill and svam.policy, and
    nothing named `teachers`, `distill` or `policy` is importable from a clean interpreter, so
    another distribution's module of that name can neither shadow svam's nor be shadowed."""
    script = (
        "import importlib.util, svam.teachers, svam.distill, svam.policy;"
        "from svam.policy import ShortcutPolicy; from svam.distill import Decoupler;"
        "print(*(importlib.util.find_spec(name) is None for name in"
        " ('teachers', 'distill', 'policy')))"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "True"]
