#!/usr/bin/env bash
# Installs the peer frameworks that scripts/bench_peers.py compares fedjax_sim against, each in
# its own virtual environment, so that none of them touches the project's environment:
#
#   fedjax  FedJAX 0.0.17 on its last working stack (jax/jaxlib 0.4.23, numpy<2, scipy<1.13,
#           dm-haiku 0.0.11, optax 0.1.7, chex 0.1.85, tensorflow-cpu 2.15.1)
#   flower  Flower 1.42 simulation (flwr[simulation], Ray) with PyTorch CPU clients
#   pfl     pfl-research 0.6 (Apple's pfl) with its PyTorch backend
#
#   bash scripts/setup_peers.sh                      # all three, under ~/.cache/fedjax_sim_peers
#   bash scripts/setup_peers.sh --prefix /tmp/peers fedjax
#   bash scripts/setup_peers.sh --python python3.11 --force flower pfl
#
# Layout: PREFIX/<peer>/venv (the environment), PREFIX/<peer>/pip.log (the whole pip log),
# PREFIX/<peer>/status (`ok` or `failed`), PREFIX/<peer>/versions.txt (pip freeze) or
# PREFIX/<peer>/error.txt (why it failed: the tail of pip's output). bench_peers.py reads the
# status and error files and reports a failed or missing peer as unavailable, with the reason.
# Every peer needs Python 3.11 (FedJAX's pinned jaxlib 0.4.23 and TF 2.15 have no wheels for
# 3.13; Flower 1.42 needs >= 3.11; pfl 0.6 needs < 3.13).
#
# Environment: TORCH_SPEC overrides the PyTorch requirement (default: a local CPU-only wheel
# when pip's find-links has one, else `torch`, which on Linux is the larger CUDA build).
# Exit status: 0 when every requested peer installed, 1 otherwise (the others still install).
set -uo pipefail

PREFIX="${HOME}/.cache/fedjax_sim_peers"
PYTHON=""
FORCE=0
PEERS=()
ALL_PEERS=(fedjax flower pfl)

usage() {
  sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --prefix) PREFIX="$2"; shift 2 ;;
    --prefix=*) PREFIX="${1#*=}"; shift ;;
    --python) PYTHON="$2"; shift 2 ;;
    --python=*) PYTHON="${1#*=}"; shift ;;
    --force) FORCE=1; shift ;;
    -h|--help) usage 0 ;;
    fedjax|flower|pfl) PEERS+=("$1"); shift ;;
    *) echo "setup_peers.sh: unknown argument '$1' (peers: ${ALL_PEERS[*]})" >&2; usage 2 ;;
  esac
done
[[ ${#PEERS[@]} -eq 0 ]] && PEERS=("${ALL_PEERS[@]}")

# A Python 3.11 interpreter that can make a venv.
find_python() {
  local cand
  for cand in "$PYTHON" python3.11 /usr/bin/python3.11 /usr/local/bin/python3.11 \
      "$HOME/.pyenv/versions/"3.11*/bin/python3.11; do
    [[ -z "$cand" ]] && continue
    # sys.executable: the real interpreter, not a pyenv shim.
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c \
        'import sys, venv, ensurepip; assert sys.version_info[:2] == (3, 11); print(sys.executable)' \
        2>/dev/null; then
      return 0
    fi
  done
  return 1
}

# The PyTorch requirement: a CPU-only local wheel if pip's find-links holds one.
torch_spec() {
  if [[ -n "${TORCH_SPEC:-}" ]]; then echo "$TORCH_SPEC"; return; fi
  local links dir whl
  links="${PIP_FIND_LINKS:-$(pip config get global.find-links 2>/dev/null || true)}"
  for dir in $links; do
    dir="${dir#file://}"
    whl=$(ls -1 "$dir"/torch-*+cpu-cp311-*.whl 2>/dev/null | sort -V | tail -n 1)
    if [[ -n "$whl" ]]; then
      whl=$(basename "$whl")
      echo "torch==$(echo "$whl" | cut -d- -f2)"
      return
    fi
  done
  echo "torch"
}

requirements() {
  case "$1" in
    fedjax)
      echo "fedjax==0.0.17 jax==0.4.23 jaxlib==0.4.23 numpy<2 scipy<1.13 dm-haiku==0.0.11" \
        "optax==0.1.7 chex==0.1.85 tensorflow-cpu==2.15.1"
      ;;
    flower) echo "flwr[simulation]==1.42.* $(torch_spec)" ;;
    pfl) echo "pfl[pytorch]==0.6.* $(torch_spec)" ;;
  esac
}

# The import that proves the install works, printing the versions bench_peers.py records.
check_import() {
  local mods
  case "$1" in
    fedjax) mods="fedjax jax jaxlib haiku optax tensorflow" ;;
    flower) mods="flwr ray torch" ;;
    pfl) mods="pfl pfl.model.pytorch torch" ;;
  esac
  echo "import importlib, importlib.metadata as m
for mod in '$mods'.split(): importlib.import_module(mod)
dists = {'fedjax': 'fedjax jax jaxlib dm-haiku optax chex numpy tensorflow-cpu',
         'flower': 'flwr ray torch numpy', 'pfl': 'pfl torch numpy'}['$1']
print(' '.join(d + '==' + m.version(d) for d in dists.split()))"
}

fail() {  # peer dir message
  local peer="$1" dir="$2" msg="$3"
  echo "failed" >"$dir/status"
  printf '%s\n' "$msg" >"$dir/error.txt"
  echo "[$peer] FAILED: $msg" >&2
  if [[ -f "$dir/pip.log" ]]; then
    echo "[$peer] last lines of $dir/pip.log:" >&2
    tail -n 25 "$dir/pip.log" | sed "s/^/[$peer]   /" >&2
  fi
}

install_peer() {
  local peer="$1" py="$2" dir="$PREFIX/$1"
  local venv="$dir/venv"
  mkdir -p "$dir"
  if [[ $FORCE -eq 0 && -f "$dir/status" && "$(cat "$dir/status")" == ok ]] &&
      "$venv/bin/python" -c "$(check_import "$peer")" >/dev/null 2>&1; then
    echo "[$peer] already installed in $venv (--force to reinstall)"
    return 0
  fi
  rm -rf "$venv" "$dir/status" "$dir/error.txt" "$dir/versions.txt"
  echo "[$peer] creating $venv with $py"
  if ! "$py" -m venv "$venv" >"$dir/pip.log" 2>&1; then
    fail "$peer" "$dir" "python -m venv failed: $(tail -n 3 "$dir/pip.log" | tr '\n' ' ')"
    return 1
  fi
  local reqs
  read -r -a reqs <<<"$(requirements "$peer")"
  echo "[$peer] pip install ${reqs[*]} (log: $dir/pip.log)"
  {
    "$venv/bin/python" -m pip install --upgrade pip "setuptools<81" wheel &&
      "$venv/bin/python" -m pip install "${reqs[@]}"
  } >>"$dir/pip.log" 2>&1
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    local why
    why=$(grep -E '^(ERROR|error):|No matching distribution|ResolutionImpossible|conflict' \
      "$dir/pip.log" | head -n 8)
    fail "$peer" "$dir" "pip install ${reqs[*]} exited $rc: ${why:-$(tail -n 5 "$dir/pip.log")}"
    return 1
  fi
  local out
  if ! out=$("$venv/bin/python" -c "$(check_import "$peer")" 2>&1); then
    echo "$out" >>"$dir/pip.log"
    fail "$peer" "$dir" "installed, but the import check failed: $(echo "$out" | tail -n 3)"
    return 1
  fi
  "$venv/bin/python" -m pip freeze >"$dir/versions.txt" 2>/dev/null
  echo "ok" >"$dir/status"
  echo "[$peer] ok: $out"
}

PY=$(find_python)
if [[ -z "$PY" ]]; then
  for peer in "${PEERS[@]}"; do
    mkdir -p "$PREFIX/$peer"
    fail "$peer" "$PREFIX/$peer" \
      "no Python 3.11 with venv and ensurepip found (pass --python /path/to/python3.11)"
  done
  exit 1
fi

status=0
for peer in "${PEERS[@]}"; do
  install_peer "$peer" "$PY" || status=1
done
echo "peers under $PREFIX:"
for peer in "${PEERS[@]}"; do
  echo "  $peer: $(cat "$PREFIX/$peer/status" 2>/dev/null || echo missing)"
done
exit $status
