#!/usr/bin/env bash
# Set up a fresh machine for svam: MuJoCo's EGL libraries (Debian), a virtualenv, the locked
# dependencies (requirements.lock) and svam.
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

# 3. uv, a fast installer (pinned), then every package at the version requirements.lock pins
#    (scripts/lock.sh re-resolves it from pyproject.toml): a fresh clone installs what was tested,
#    whatever has been released since.
$pip install "uv==0.13.9" 2> >(grep -v "^WARNING: Location" >&2)
uv="$venv/bin/uv"
# uv does not read pip's configuration: hand it this machine's package mirrors, if any (pip merges
# every index, so uv looks at all of them too).
for key in index-url extra-index-url find-links; do
  value=$("$venv/bin/pip" config get "global.$key" 2>/dev/null || true)
  [ -z "$value" ] && continue
  case $key in
    index-url) export UV_DEFAULT_INDEX=$value ;;
    extra-index-url) export UV_INDEX=$value UV_INDEX_STRATEGY=unsafe-best-match ;;
    find-links) export UV_FIND_LINKS=${value// /,} ;;
  esac
done
export UV_LINK_MODE=copy  # the cache and the virtualenv may sit on different filesystems
install="$uv pip install --quiet --python $venv/bin/python"
$install -r requirements.lock
# depth-anything-3 (and evo, which its API imports) without their declared dependencies, which
# pull in xformers, open3d, gradio and more that svam never uses; what depth_anything_3.api really
# imports is listed in pyproject.toml.
$install --no-deps "depth-anything-3==0.1.1" "evo==1.38.1"
$install --no-deps -e .
"$venv/bin/python" -c "import svam.teachers, svam.distill, svam.policy, depth_anything_3.api, metaworld, timm, diffusers" >/dev/null 2>&1 \
  || { echo "install: the environment in $venv does not import; see the pip output above" >&2; exit 1; }
echo "install: ready ($venv)"
