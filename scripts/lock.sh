#!/usr/bin/env bash
# Re-resolve requirements.lock, the version of every package scripts/install.sh installs, from
# pyproject.toml's dependencies. Run it after changing a dependency and commit both files; a fresh
# clone then installs exactly what was tested, whatever has been released since.
# Usage: [UV=path/to/uv] scripts/lock.sh [uv pip compile options, e.g. -c constraints.txt]
set -euo pipefail
uv=${UV:-uv}
cd "$(dirname "$0")/.."
requirements=$(mktemp --suffix=.in)
trap 'rm -f "$requirements"' EXIT
python3 - "$requirements" <<'PY'
import sys, tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
# Installed without their declared dependencies (which pull in xformers, open3d, gradio...), at
# the versions scripts/install.sh pins.
no_deps = ("depth-anything-3", "evo")
# torch + torchvision: a pair known to work together with timm on each architecture (PyPI's
# torchvision does not import beside a CPU-only torch here; see shared DESIGN.md).
torch_pairs = [
    "torch==2.14.1; platform_machine != 'aarch64'",
    "torchvision==0.29.1; platform_machine != 'aarch64'",
    "torch==2.9.1; platform_machine == 'aarch64'",
    "torchvision==0.24.1; platform_machine == 'aarch64'",
]
deps = project["dependencies"] + project["optional-dependencies"]["dev"]
deps = [d for d in deps if not d.startswith(no_deps + ("torch>", "torchvision"))] + torch_pairs
open(sys.argv[1], "w").write("\n".join(deps) + "\n")
PY
"$uv" pip compile "$requirements" --universal --python-version 3.11 --no-header --no-annotate --quiet \
  --output-file requirements.lock "$@"
echo "lock: requirements.lock ($(grep -c '==' requirements.lock) pinned packages)"
