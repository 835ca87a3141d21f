#!/usr/bin/env bash
# Move the shipped weights that bench/gpu_check.sh does not use out of the working tree before a device call, and
# back after it.
#
#   bench/gpu_slim.sh aside [DIR]     # move them to DIR (default: ../gpu-slim-aside, outside the checkout)
#   bench/gpu_slim.sh restore [DIR]   # move them back and check them against git
#   bench/gpu_slim.sh list            # the files, one per line
#   bench/gpu_slim.sh size            # MiB of the checkout with and without them (either side of `aside`)
#   bench/gpu_slim.sh travel-bytes    # bytes of what a device call carries now: the tracked and untracked,
#                                     # not ignored files that exist (bench/gpu_wheels.sh's check uses it)
#
# Why: a device call carries the working tree and the wheels together, 64 MiB at most (bench/gpu_wheels.sh checks
# 62). The shipped weights are most of the checkout; the GPU check serves resnet50 (random weights allowed),
# agnews-vdcnn9, lfw-face-resnet and cifar10-resnet56 (the default classifier) and tiny models in its cuda tests,
# so the other weights files stay behind. Moved files show as deleted in `git status` until `restore`: never
# commit in between.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# the weights gpu_check.sh never loads (tests/test_gpu_slim.py checks that it names none of them)
SLIM=(
  weights/agnews-wordcnn.pt
  weights/cifar10-ensemble.pt
  weights/cifar10-ensemble-40k.pt
  weights/cifar10-resnet32.pt
  weights/cifar10-resnet20.pt
  weights/cifar10-whitened-convnet.pt
  weights/cifar10-whitened-convnet-30.pt
  weights/cifar10-wrn-16-2.pt
  weights/cifar10-se-resnet20.pt
  weights/lfw-face-resnet.onnx
  weights/lfw-face-ensemble.pt
)

usage() { sed -n '5,8p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 1 ]] || usage
cmd=$1
DIR=${2:-$ROOT/../gpu-slim-aside}
cd "$ROOT"

# Files moved aside are still listed by git (as deleted): only the files present count, so this works either side
# of `aside` (du over the list failed on the missing ones and, under `set -e`, ended the script without a word).
travel_bytes() {
  local total=0 f
  while IFS= read -r -d '' f; do
    [[ -f $f && ! -L $f ]] && total=$((total + $(stat -c %s -- "$f")))
  done < <(git ls-files -z --cached --others --exclude-standard)
  echo "$total"
}
# the slim files' sizes as git records them (present or aside)
slim_bytes() {
  local total=0 f
  for f in "${SLIM[@]}"; do
    if git cat-file -e "HEAD:$f" 2>/dev/null; then total=$((total + $(git cat-file -s "HEAD:$f"))); fi
  done
  echo "$total"
}
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

case $cmd in
  list) printf '%s\n' "${SLIM[@]}" ;;
  travel-bytes) travel_bytes ;;
  size)
    without=$(travel_bytes)
    for f in "${SLIM[@]}"; do [[ -f $f ]] && without=$((without - $(stat -c %s -- "$f"))); done
    all=$((without + $(slim_bytes)))
    echo "checkout $(mib "$all") MiB; without the files gpu_check.sh does not use $(mib "$without") MiB" ;;
  aside)
    mkdir -p "$DIR"
    for f in "${SLIM[@]}"; do
      [[ -e $DIR/$(basename "$f") ]] && { echo "$DIR already holds $(basename "$f"): restore first" >&2; exit 1; }
    done
    for f in "${SLIM[@]}"; do [[ -e $f ]] && mv "$f" "$DIR/"; done
    echo "# moved ${#SLIM[@]} files to $DIR; run 'bench/gpu_slim.sh restore' after the device call" ;;
  restore)
    for f in "${SLIM[@]}"; do
      [[ -e $DIR/$(basename "$f") ]] && mv "$DIR/$(basename "$f")" "$f"
    done
    missing=$(git ls-files --deleted -- "${SLIM[@]}")
    [[ -z $missing ]] || { echo "still missing (git checkout -- them): $missing" >&2; exit 1; }
    git diff --quiet -- "${SLIM[@]}" || { echo "restored files differ from git" >&2; exit 1; }
    echo "# restored; the weights match git" ;;
  *) usage ;;
esac
