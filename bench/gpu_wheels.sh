#!/usr/bin/env bash
# Prepare the wheels folder that bench/gpu_check.sh installs from on a GPU machine without internet.
#
#   bench/gpu_wheels.sh WHEELS_DIR [--python-version 3.12] [--faiss cpu|gpu] [--max-mib 45]
#
# Run it on a machine that reaches the package registry (any OS/Python with pip): it downloads, for the
# target's Python and Linux x86-64, binary wheels of the project's runtime dependencies (pyproject.toml)
# WITHOUT torch, torchvision, nvidia-* and triton (the GPU machine has its own), plus pytest and setuptools
# (to install the project itself), and writes WHEELS_DIR/requirements.txt, the list gpu_check.sh installs.
#
# Left out (GPU_WHEELS_SKIP, space-separated): large packages the H200 image already has (numpy, pillow,
# opencv-python-headless, onnx, onnxruntime, matplotlib and their dependencies); pip on the GPU machine takes
# them from its own Python. pygments (1.2 MB, required by pytest 9) is carried: the image's listing does not
# name it, and a run of gpu_check.sh from a Python 3.12 + torch 2.11 environment without it stopped at set-up.
# Set GPU_WHEELS_SKIP= (empty) for a machine that has only torch and torchvision.
#
# FAISS: faiss-gpu 1.15.1 is a 135 MB wheel that also needs the CUDA 12 runtime and cuBLAS wheels (hundreds
# of MB; the H200 image has CUDA 13), far over the 64 MiB a device call carries, so the default is faiss-cpu
# (the gallery then searches on the CPU; the service and the benchmarks say so). --faiss gpu tries anyway.
#
# The folder and the checkout travel together (64 MiB per call): the script prints both sizes and fails
# when the wheels exceed --max-mib or both together exceed GPU_WHEELS_TOTAL_MIB (default 62).
set -euo pipefail

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 1 ]] || usage
DEST=$1; shift
PYVER=3.12
FAISS=cpu
MAX_MIB=${GPU_WHEELS_MAX_MIB:-45}
TOTAL_MIB=${GPU_WHEELS_TOTAL_MIB:-62}
while [[ $# -gt 0 ]]; do
  case $1 in
    --python-version) PYVER=$2; shift 2 ;;
    --faiss) FAISS=$2; shift 2 ;;
    --max-mib) MAX_MIB=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
[[ $FAISS == cpu || $FAISS == gpu ]] || { echo "--faiss takes cpu or gpu" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${GPU_WHEELS_PYTHON:-}
if [[ -z $PY ]]; then
  if [[ -x $ROOT/.venv/bin/python ]]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
# packages of the H200 image (as listed for it) that are large: carried only when GPU_WHEELS_SKIP says so
SKIP=${GPU_WHEELS_SKIP-numpy pillow opencv-python-headless onnx onnxruntime matplotlib contourpy fonttools kiwisolver protobuf sympy mpmath ml-dtypes}
# manylinux tags up to glibc 2.34 (the image is Ubuntu 24.04-based: Python 3.12.3); pip matches tags exactly
PLATFORMS=${GPU_WHEELS_PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64}

mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
if compgen -G "$DEST/*.whl" >/dev/null; then
  echo "# $DEST already holds wheels: remove them first (two versions of one package stop the install)" >&2
  exit 1
fi

# the requirement list: pyproject's dependencies for linux x86-64 minus torch/torchvision/nvidia-*/triton and
# the skip list, faiss-gpu replaced by faiss-cpu of the same version unless --faiss gpu
REQS=$("$PY" - "$ROOT/pyproject.toml" "$FAISS" "$SKIP" <<'EOF'
import re, sys, tomllib
pyproject, faiss, skip = sys.argv[1], sys.argv[2], set(sys.argv[3].split())
deps = tomllib.load(open(pyproject, "rb"))["project"]["dependencies"]
out = []
def norm(n): return re.sub(r"[-_.]+", "-", n).lower()
for d in deps:
    req, _, marker = d.partition(";")
    req, marker = req.strip(), marker.strip()
    name = norm(re.match(r"[A-Za-z0-9_.\-]+", req).group(0))
    if name in ("torch", "torchvision", "triton") or name.startswith("nvidia-") or name in skip:
        continue
    if name.startswith("faiss"):
        # the linux x86-64 entry (faiss-gpu==X) decides the version; the other platform's entry is dropped
        if "sys_platform == 'linux'" not in marker.replace('"', "'"):
            continue
        version = re.search(r"==\s*([0-9][^,\s]*)", req)
        pin = f"=={version.group(1)}" if version else ""
        out.append(f"faiss-{faiss}{pin}")
        continue
    out.append(req)
out += ["pytest>=8"]
print("\n".join(out))
EOF
)
echo "# target: CPython $PYVER, linux x86-64 ($PLATFORMS)"
echo "# carried requirements:"; sed 's/^/#   /' <<<"$REQS"
echo "# left to the GPU machine's Python: torch torchvision nvidia-* triton $SKIP"

PLAT_ARGS=()
for p in $PLATFORMS; do PLAT_ARGS+=(--platform "$p"); done
printf '%s\n' "$REQS" >"$DEST/requirements.txt"
# setuptools (+ wheel, which older pips ask for): the build backend of `pip install -e .` on the GPU machine
"$PY" -m pip download --disable-pip-version-check --only-binary=:all: --implementation cp \
  --python-version "$PYVER" "${PLAT_ARGS[@]}" -d "$DEST" -r "$DEST/requirements.txt" "setuptools>=68" wheel

# drop what the skip list names (pulled in as dependencies, e.g. numpy by faiss): the GPU machine has them
for name in $SKIP; do
  pat=$(tr '-' '_' <<<"$name")
  for f in "$DEST"/*.whl; do
    base=$(basename "$f")
    dist=${base%%-*}
    if [[ ${dist,,} == "${pat,,}" ]]; then echo "# dropped $base (on the GPU machine already)"; rm -f "$f"; fi
  done
done

wheels=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
checkout=$(bash "$ROOT/bench/gpu_slim.sh" travel-bytes)  # what travels now (after `gpu_slim.sh aside` too)
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
echo "# wheels: $(ls "$DEST"/*.whl | wc -l) files, $(mib "$wheels") MiB in $DEST"
ls -S "$DEST"/*.whl | head -5 | while read -r f; do echo "#   $(mib "$(stat -c %s "$f")") MiB $(basename "$f")"; done
echo "# checkout (tracked + untracked, not ignored): $(mib "$checkout") MiB; together $(mib $((wheels + checkout))) MiB"
if awk -v w="$wheels" -v m="$MAX_MIB" 'BEGIN {exit !(w > m * 1048576)}'; then
  echo "# FAIL: the wheels exceed $MAX_MIB MiB" >&2; exit 1
fi
if awk -v t="$((wheels + checkout))" -v m="$TOTAL_MIB" 'BEGIN {exit !(t > m * 1048576)}'; then
  echo "# FAIL: wheels + checkout exceed $TOTAL_MIB MiB (a device call carries 64 MiB)" >&2; exit 1
fi
echo "# ok: carry this folder with the checkout and run bench/gpu_check.sh $DEST OUT_DIR there"
