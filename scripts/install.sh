#!/usr/bin/env bash
# Set up a fresh machine for svam: MuJoCo's EGL libraries (Debian), a virtualenv, torch, and svam.
# Usage: scripts/install.sh [VENV_DIR]   (the Makefile calls it once; it is safe to re-run)
set -euo pipefail
venv=${1:-.venv}
cd "$(dirname "$0")/.."

# 1. System libraries for headless MuJoCo rendering (MUJOCO_GL=egl).
egl_packages="libegl1 libegl-mesa0 libgl1-mesa-dri"
missing=$(for p in $egl_packages; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"; done)
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "install: apt-get install $missing"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "install: warning: missing system packages for MuJoCo rendering: $missing (run: sudo apt-get install $missing)" >&2
  fi
fi

# 2. The virtualenv.
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip="$venv/bin/pip --disable-pip-version-check -q"

# 3. torch + torchvision: a pair known to work together with timm on this architecture.
#    (PyPI's torchvision does not import beside a CPU-only torch here; see shared DESIGN.md.)
case "$(uname -m)" in
  aarch64|arm64) torch_pair="torch==2.9.1 torchvision==0.24.1" ;;
  *) torch_pair="torch==2.14.1 torchvision==0.29.1" ;;
esac
$pip install $torch_pair 2> >(grep -v "^WARNING: Location" >&2)

# 4. svam's dependencies from pyproject.toml. depth-anything-3 (and evo, which its API imports)
#    are installed without their declared dependencies, which pull in xformers, open3d, gradio and
#    more that svam never uses; what depth_anything_3.api really imports is listed in pyproject.
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
"$venv/bin/python" - "$requirements" <<'PY'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
no_deps = ("depth-anything-3", "evo")
deps = project["dependencies"] + project["optional-dependencies"]["dev"]
open(sys.argv[1], "w").write("\n".join(d for d in deps if not d.startswith(no_deps)) + "\n")
PY
$pip install -r "$requirements" 2> >(grep -v "^WARNING: Location" >&2)
$pip install --no-deps "depth-anything-3==0.1.1" "evo==1.38.1" 2> >(grep -v "^WARNING: Location" >&2)
$pip install --no-deps -e . 2> >(grep -v "^WARNING: Location" >&2)
"$venv/bin/python" -c "import svam, teachers, distill, policy, depth_anything_3.api, metaworld, timm, diffusers" >/dev/null 2>&1 \
  || { echo "install: the environment in $venv does not import; see the pip output above" >&2; exit 1; }
echo "install: ready ($venv)"
