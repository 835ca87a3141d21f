#!/usr/bin/env bash
# One command for a GPU machine (issue 14): install the carried wheels, run the `cuda` tests and short versions
# of every benchmark on CUDA within a time budget, write raw JSON and a Markdown summary.
#
#   bench/gpu_check.sh WHEELS_DIR OUT_DIR [--budget-seconds 480] [--only STEPS] [--skip STEPS] [--export DIR]
#                                         [--fresh-venv]
#
# The machine's Python must already have torch and torchvision (2.11 / 0.26 or newer); they are used as they
# are, never reinstalled. WHEELS_DIR comes from bench/gpu_wheels.sh (see bench/README.md, "GPU check"). No
# network is used: pip installs with --no-index from WHEELS_DIR only.
#
# Steps (each under `timeout`, its share of --budget-seconds; a step that fails or times out is recorded and
# the next one runs): setup, tests, forward, classify, profile, classify_fronts, classify_before, classify16,
# classify16_fronts, text, style, faces, faces_e2e, abuse, then
# the summary. --only / --skip take comma-separated step names (setup always runs; the venv is reused unless
# --fresh-venv). OUT_DIR gets: env.json, steps.json, pytest-cuda.xml, <step>.json (+ .md), logs/, summary.md,
# results.json (everything merged) and gpu-check.tar.gz (all of it); --export DIR copies summary.md,
# results.json and gpu-check.tar.gz to DIR (three files, for a runner that brings back only a few).
#
# Environment: GPU_CHECK_PYTHON (the machine's Python, default python3), GPU_CHECK_VENV (default
# /tmp/gpu-check-venv), GPU_CHECK_IN_FLIGHT_MAX (CNN_IN_FLIGHT_MAX of the load benchmarks' servers, default
# 1024, so the concurrency levels are admitted rather than shed), GPU_CHECK_ALLOW_CPU=1 (no GPU: the same
# steps on the CPU with tiny sizes and durations, to prove the plumbing; give it --budget-seconds 1500).
set -uo pipefail

usage() { sed -n '5,6p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 2 ]] || usage
WHEELS=$1 OUT=$2; shift 2
BUDGET=480 ONLY="" SKIP="" EXPORT="" FRESH=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --budget-seconds) BUDGET=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --skip) SKIP=$2; shift 2 ;;
    --export) EXPORT=$2; shift 2 ;;
    --fresh-venv) FRESH=1; shift ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
START=$(date +%s)
DEADLINE=$((START + BUDGET))
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[[ -d $WHEELS ]] || { echo "no wheels folder: $WHEELS" >&2; exit 2; }
WHEELS=$(cd "$WHEELS" && pwd)
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
# a previous run's files only (OUT_DIR may hold other things)
OUTPUTS=(env.json steps.tsv steps.json pytest-cuda.xml summary.md results.json gpu-check.tar.gz style.json)
for f in forward classify classify-fronts classify-before classify16 classify16-fronts text faces-gallery faces-e2e abuse; do OUTPUTS+=("$f.json" "$f.md"); done
for f in "${OUTPUTS[@]}"; do rm -f "${OUT:?}/$f"; done
rm -rf "${OUT:?}/logs" && mkdir -p "$OUT/logs" || exit 2
BASE_PY=${GPU_CHECK_PYTHON:-python3}
VENV=${GPU_CHECK_VENV:-/tmp/gpu-check-venv}
PY=$VENV/bin/python
WORK=$(mktemp -d /tmp/gpu-check-work.XXXXXX)
STEPS_TSV=$OUT/steps.tsv
: >"$STEPS_TSV"
CPU_MODE=${GPU_CHECK_ALLOW_CPU:-0}
SUMMARY_RESERVE=15

say() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }
wanted() {  # is step $1 selected by --only / --skip?
  [[ -n $ONLY && ",$ONLY," != *",$1,"* ]] && return 1
  [[ -n $SKIP && ",$SKIP," == *",$1,"* ]] && return 1
  return 0
}
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$STEPS_TSV"; }  # name rc seconds budget status

# The steps' nominal seconds add up to 465, the default budget less SUMMARY_RESERVE; they are estimates (no GPU run
# has calibrated them): a step that needs more is cut by its timeout and recorded as such.
# run_step NAME NOMINAL_SECONDS CMD...: under `timeout`, which interrupts its whole process group (the servers a
# benchmark started too) with SIGINT, so pytest still writes its junit XML and uvicorn shuts down cleanly
run_step() {
  local name=$1 nominal=$2; shift 2
  if ! wanted "$name"; then record "$name" "" 0 0 "not selected"; return; fi
  local now left budget t0 rc status
  now=$(date +%s)
  left=$((DEADLINE - now - SUMMARY_RESERVE))
  budget=$((nominal * BUDGET / 480))
  ((budget > left)) && budget=$left
  if ((budget < 10)); then
    say "$name: skipped, ${left}s of the budget left"; record "$name" "" 0 "$budget" "no time left"; return
  fi
  local script
  script=$(printf '%s\n' "$@" | grep -m1 -E '^(bench[.][a-z_]+|pytest)$' || true)
  say "$name: up to ${budget}s: ${script:-$1} (command and output: logs/$name.log)"
  t0=$(date +%s)
  echo "# $*" >"$OUT/logs/$name.log"
  timeout -s INT -k 10 "$budget" "$@" >>"$OUT/logs/$name.log" 2>&1
  rc=$?
  local took=$(($(date +%s) - t0))
  case $rc in
    0) status=ok ;;
    124|137) status="timed out" ;;
    *) status="failed" ;;
  esac
  [[ $name == tests && $rc == 5 ]] && status="ok (no cuda tests collected)"
  record "$name" "$rc" "$took" "$budget" "$status"
  say "$name: $status (rc $rc) in ${took}s"
  if [[ $status != ok* ]]; then tail -n 15 "$OUT/logs/$name.log" | sed 's/^/    /'; fi
}

# ------------------------------------------------------------------------------------------------ setup
setup() {
  if [[ $FRESH == 1 || ! -f $VENV/.gpu_check_ready ]]; then
    rm -rf "$VENV"
    say "venv $VENV (--system-site-packages) from $BASE_PY"
    "$BASE_PY" -m venv --system-site-packages "$VENV" \
      || { say "venv with pip failed (no ensurepip?): again --without-pip"; rm -rf "$VENV";
           "$BASE_PY" -m venv --system-site-packages --without-pip "$VENV"; } || return 1
    # --system-site-packages reaches the base interpreter's packages, not those of a venv that python3 may itself
    # be (the H200 image's python3 is /opt/torch/.venv): add that Python's own site dirs after the venv's own
    local site
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
    "$BASE_PY" - "$site/_gpu_check_base_site.pth" <<'EOF' || return 1
import site, sys
dirs = [d for d in site.getsitepackages() + [site.getusersitepackages()] if d]
with open(sys.argv[1], "w") as f:
    for d in dirs:
        f.write(f"import site; site.addsitedir({d!r})\n")
print("# base site dirs: " + ", ".join(dirs))
EOF
  else
    say "reusing venv $VENV (--fresh-venv rebuilds it)"
  fi
  local pip=("$PY" -m pip)
  if ! "${pip[@]}" --version >/dev/null 2>&1; then pip=("$BASE_PY" -m pip --python "$PY"); fi
  "${pip[@]}" --version || return 1
  local reqs=$WHEELS/requirements.txt
  if [[ ! -f $reqs ]]; then  # a folder made by hand: install every wheel in it
    reqs=$WORK/requirements.txt
    ls "$WHEELS"/*.whl >"$reqs"
  fi
  say "pip install --no-index --find-links $WHEELS -r $reqs"
  "${pip[@]}" install --disable-pip-version-check --no-input --no-index --find-links "$WHEELS" \
    -r "$reqs" || return 1
  say "pip install --no-deps -e $ROOT"
  "${pip[@]}" install --disable-pip-version-check --no-input --no-index --find-links "$WHEELS" \
    --no-deps -e "$ROOT" \
    || "${pip[@]}" install --disable-pip-version-check --no-input --no-index --no-deps \
      --no-build-isolation -e "$ROOT" \
    || say "WARNING: the project did not install; it still runs from the checkout (PYTHONPATH)"
  touch "$VENV/.gpu_check_ready"
}

run_setup() {
  say "setup (output in logs/setup.log)"
  local t0 rc
  t0=$(date +%s)
  setup >"$OUT/logs/setup.log" 2>&1
  rc=$?
  record setup "$rc" $(($(date +%s) - t0)) 0 "$([[ $rc == 0 ]] && echo ok || echo failed)"
  if [[ $rc != 0 ]]; then
    tail -n 25 "$OUT/logs/setup.log"
    say "setup failed (rc $rc): no step can run"
  fi
  return "$rc"
}

export PYTHONUNBUFFERED=1 CNN_ALLOW_DOWNLOADS=false
# pip sees WHEELS_DIR and nothing else: no config file, index or find-links of this machine
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
unset PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CONSTRAINT PIP_REQUIREMENT
cd "$ROOT" || exit 2
[[ -e cnn_apps.egg-info ]] && EGG_INFO_BEFORE=1
run_setup || SETUP_FAILED=1
# the editable build leaves its metadata in the checkout; the venv does not need it
[[ -z ${EGG_INFO_BEFORE:-} ]] && rm -rf cnn_apps.egg-info
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}  # the checkout wins over any installed copy

# versions, CUDA, the packages that matter (env.json), printed too
if [[ -z ${SETUP_FAILED:-} ]]; then
  "$PY" - "$OUT/env.json" "$VENV" <<'EOF' 2>>"$OUT/logs/setup.log"
import importlib, importlib.metadata as md, importlib.util, json, os, platform, sys
out, venv = sys.argv[1], sys.argv[2]
env = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
       "cpus": os.cpu_count(), "packages": {}}
for dist in ("torch", "torchvision", "numpy", "pillow", "fastapi", "starlette", "uvicorn", "pydantic",
             "pydantic-settings", "python-multipart", "httpx", "prometheus-client", "faiss-cpu", "faiss-gpu",
             "opencv-python-headless", "onnxruntime", "onnxruntime-gpu", "onnx", "pytest", "schemathesis", "cnn-apps"):
    try:
        env["packages"][dist] = md.version(dist)
    except md.PackageNotFoundError:
        pass
import torch
env["torch_file"] = torch.__file__
env["torch_from_venv"] = torch.__file__.startswith(os.path.realpath(venv))
env["cuda_available"] = torch.cuda.is_available()
env["torch_cuda"] = torch.version.cuda
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count,
                  "capability": f"{p.major}.{p.minor}", "bf16": torch.cuda.is_bf16_supported(),
                  "cudnn": torch.backends.cudnn.version()}
for mod, probe in (("faiss", lambda m: {"gpus": m.get_num_gpus(), "StandardGpuResources":
                                         hasattr(m, "StandardGpuResources")}),
                   ("cv2", lambda m: {"version": m.__version__, "CascadeClassifier": hasattr(m, "CascadeClassifier")}),
                   ("onnxruntime", lambda m: {"providers": m.get_available_providers()}),
                   ("schemathesis", lambda m: {})):
    try:
        env[mod] = probe(importlib.import_module(mod))
    except Exception as exc:  # absent or broken: the steps that need it say so
        env[mod] = {"error": f"{type(exc).__name__}: {exc}"}
missing = [m for m in ("fastapi", "uvicorn", "pydantic_settings", "multipart", "prometheus_client", "httpx", "faiss",
                       "PIL", "cv2", "pytest") if importlib.util.find_spec(m) is None]
env["missing_modules"] = missing
json.dump(env, open(out, "w"), indent=2)
pk = env["packages"]
print(f"python {env['python']} ({sys.executable}); torch {pk.get('torch')} from {env['torch_file']}"
      f"{' (INSIDE the venv: reinstalled!)' if env['torch_from_venv'] else ''}; torchvision {pk.get('torchvision')}")
print(f"torch.cuda.is_available() = {env['cuda_available']} (CUDA {env['torch_cuda']}); gpu: {env.get('gpu')}")
print("packages: " + ", ".join(f"{k} {v}" for k, v in pk.items() if k not in ("torch", "torchvision")))
print(f"faiss: {env['faiss']}; cv2: {env['cv2']}; onnxruntime: {env['onnxruntime']}")
if missing:
    print(f"MISSING modules: {missing}")
EOF
  [[ $? == 0 ]] || say "WARNING: the environment report failed (logs/setup.log)"
  CUDA_OK=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
fi

# ------------------------------------------------------------------------------------------------ parameters
if [[ -n ${SETUP_FAILED:-} ]]; then
  :
elif [[ ${CUDA_OK:-0} == 1 ]]; then
  DEV=cuda
  FWD=(--batch-sizes 1,16,64,256 --decode-batch-sizes 64 --seconds 1.5 --warmup 5)
  CLS=(--concurrency 32,128 --duration 8 --warmup 2 --batch-size 64)
  PROF=(--concurrency 128 --client-processes 2 --warmup 4 --duration 3)
  CLS16=(--concurrency 8,32 --duration 6 --warmup 2 --batch-size 128 --batch-queue 2048)
  # several HTTP processes in front of the one model process, and a load generator in several processes too
  FRONTS=(--front-workers 8 --client-processes 4)
  CLSF=(--concurrency 128,256 --duration 8 --warmup 2 --batch-size 64)
  CLS16F=(--concurrency 32,64 --duration 6 --warmup 2 --batch-size 128 --batch-queue 2048)
  TXT=(--forward-batch-sizes 1,64,256 --forward-duration 1.5 --concurrency 128 --duration 5 --warmup 1.5
       --batch-size 64)
  STY=(--size 512 --steps 300 --variants ours,reference --jobs 3 --concurrent 2)
  FACES=(--sizes 100k --dims 128 --kinds flat,ivf --queries 200 --single-queries 50 --enroll-calls 10 --gpu)
  E2E=(--gallery-size 100000 --concurrency 8,32 --duration 5 --warmup 1.5)
  ABUSE=(--phases crafted,overload --overload-seconds 5 --probe-spawn-s 2)
elif [[ $CPU_MODE == 1 ]]; then
  DEV=cpu
  say "no CUDA: GPU_CHECK_ALLOW_CPU=1, so the same steps run on the CPU with tiny sizes (plumbing only)"
  FWD=(--batch-sizes 1,2 --decode-batch-sizes 4 --seconds 0.3 --warmup 1)
  CLS=(--concurrency 1,2 --duration 2 --warmup 0.5 --batch-size 64)
  PROF=(--concurrency 2 --warmup 1 --duration 1)
  CLS16=(--concurrency 1 --duration 2 --warmup 0.5 --batch-size 128 --batch-queue 2048)
  FRONTS=(--front-workers 2 --client-processes 2)
  CLSF=(--concurrency 2 --duration 2 --warmup 0.5 --batch-size 64)
  CLS16F=(--concurrency 2 --duration 2 --warmup 0.5 --batch-size 128 --batch-queue 2048)
  TXT=(--forward-batch-sizes 1,8 --forward-duration 0.5 --concurrency 2 --duration 2 --warmup 0.5 --batch-size 64)
  STY=(--size 64 --steps 5 --variants ours,reference --jobs 2 --concurrent 2)
  FACES=(--sizes 2000 --dims 128 --kinds flat,ivf --queries 50 --single-queries 10 --enroll-calls 5 --chunk 100 --gpu)
  E2E=(--gallery-size 2000 --chunk 100 --concurrency 2 --duration 2 --warmup 0.5)
  ABUSE=(--phases crafted,overload --overload-seconds 3 --overload-clients 8 --probe-spawn-s 3)
else
  say "torch.cuda.is_available() is False: nothing to measure (GPU_CHECK_ALLOW_CPU=1 runs the steps on the CPU)"
  NO_DEVICE=1
fi

# ------------------------------------------------------------------------------------------------ steps
if [[ -z ${SETUP_FAILED:-} && -z ${NO_DEVICE:-} ]]; then
  export CNN_DATA_DIR=$WORK/data
  IN_FLIGHT=${GPU_CHECK_IN_FLIGHT_MAX:-1024}
  # the load benchmarks' servers inherit these: only the application under test is loaded, and the concurrency
  # levels are admitted instead of answered 503 by the per-application in-flight bound (default 32)
  LOAD_ENV=(env CNN_FACE_MODELS= CNN_STYLE_ENABLED=false CNN_IN_FLIGHT_MAX="$IN_FLIGHT" CNN_LOG_LEVEL=warning)

  # tests: only the modules that hold `cuda` tests are collected. Collecting the whole suite imported modules that
  # need what is not carried (schemathesis, PyYAML): a collection error failed the step although every cuda
  # test had run (found by a CPU-mode run from Python 3.12 + torch 2.11 without them)
  mapfile -t CUDA_TEST_FILES < <(grep -rlE --include='*.py' 'pytest[.]mark[.]cuda' tests | sort)
  run_step tests 40 "$PY" -m pytest -m cuda -q -rfEs --durations=10 -p no:cacheprovider \
    --continue-on-collection-errors --junitxml="$OUT/pytest-cuda.xml" "${CUDA_TEST_FILES[@]}"

  run_step forward 40 "$PY" -m bench.gpu_forward --device "$DEV" --model resnet50 "${FWD[@]}" \
    --json "$OUT/forward.json" --markdown "$OUT/forward.md"

  run_step classify 45 "${LOAD_ENV[@]}" CNN_TEXT_MODELS= "$PY" -m bench.classify_load --matrix --model resnet50 \
    --batching on "${CLS[@]}" --device "$DEV" --server-log-dir "$OUT/logs/classify" \
    --json "$OUT/classify.json" --markdown "$OUT/classify.md"

  # the same load inside torch.profiler: which operators took the CPU and the GPU, how busy the GPU was
  run_step profile 25 "${LOAD_ENV[@]}" CNN_TEXT_MODELS= CNN_BATCH_MAX_SIZE=64 "$PY" -m bench.profile_service \
    --route classify --model resnet50 --allow-untrained --device "$DEV" "${PROF[@]}" \
    --json "$OUT/profile-classify.json" --markdown "$OUT/profile-classify.md"

  # the same model behind front workers (`serve --front-workers`): HTTP parsed by several processes, batches and
  # forwards in one model process
  run_step classify_fronts 40 "${LOAD_ENV[@]}" CNN_TEXT_MODELS= "$PY" -m bench.classify_load --matrix \
    --model resnet50 --batching on "${CLSF[@]}" "${FRONTS[@]}" --device "$DEV" \
    --server-log-dir "$OUT/logs/classify_fronts" --json "$OUT/classify-fronts.json" \
    --markdown "$OUT/classify-fronts.md"

  # the same load with the GPU settings of issue 14 undone (CPU decode, no batch buckets, torch's default thread
  # count): what they change, measured in the same run
  run_step classify_before 25 "${LOAD_ENV[@]}" CNN_TEXT_MODELS= CNN_GPU_DECODE=off CNN_BATCH_BUCKETS=off \
    CNN_TORCH_THREADS="$(nproc)" "$PY" -m bench.classify_load --matrix --model resnet50 \
    --batching on "${CLS[@]}" --device "$DEV" --server-log-dir "$OUT/logs/classify_before" \
    --json "$OUT/classify-before.json" --markdown "$OUT/classify-before.md"

  run_step classify16 40 "${LOAD_ENV[@]}" CNN_TEXT_MODELS= "$PY" -m bench.classify_load --matrix --model resnet50 \
    --batching on --images-per-request 16 "${CLS16[@]}" --device "$DEV" \
    --server-log-dir "$OUT/logs/classify16" --json "$OUT/classify16.json" --markdown "$OUT/classify16.md"

  run_step classify16_fronts 30 "${LOAD_ENV[@]}" CNN_TEXT_MODELS= "$PY" -m bench.classify_load --matrix \
    --model resnet50 --batching on --images-per-request 16 "${CLS16F[@]}" "${FRONTS[@]}" --device "$DEV" \
    --server-log-dir "$OUT/logs/classify16_fronts" --json "$OUT/classify16-fronts.json" \
    --markdown "$OUT/classify16-fronts.md"

  run_step text 45 "${LOAD_ENV[@]}" "$PY" -m bench.text_load --model agnews-vdcnn9 --device "$DEV" \
    --batching on,off "${TXT[@]}" --server-log-dir "$OUT/logs/text" \
    --json "$OUT/text.json" --markdown "$OUT/text.md"

  run_step style 45 "$PY" -m bench.style_speed --device "$DEV" "${STY[@]}" --json "$OUT/style.json"

  run_step faces 30 "$PY" -m bench.faces_gallery "${FACES[@]}" --tmp-dir "$WORK" --out "$OUT/faces-gallery.json"

  # the H200 image's OpenCV has no Haar cascade: the e2e server serves detector=none (the upload is the face)
  "$PY" -c "
import sys
from bench.classify_load import make_test_image
open(sys.argv[1], 'wb').write(make_test_image(160))" "$WORK/face.jpg"
  run_step faces_e2e 40 env CNN_DEVICE="$DEV" CNN_FACE_DETECTOR=none CNN_IN_FLIGHT_MAX="$IN_FLIGHT" \
    "$PY" -m bench.faces_gallery --e2e-model lfw-face-resnet --image "$WORK/face.jpg" "${E2E[@]}" \
    --tmp-dir "$WORK" --out "$OUT/faces-e2e.json"

  run_step abuse 20 "$PY" -m bench.abuse --device "$DEV" "${ABUSE[@]}" --server-log-dir "$OUT/logs/abuse" \
    --json "$OUT/abuse.json" --markdown "$OUT/abuse.md"
fi

# ------------------------------------------------------------------------------------------------ summary
SUMMARY_PY=$PY
[[ -x $SUMMARY_PY ]] || SUMMARY_PY=$BASE_PY
timeout 60 "$SUMMARY_PY" -m bench.gpu_summary "$OUT" --budget-seconds "$BUDGET" \
  --elapsed-seconds $(($(date +%s) - START)) >"$OUT/logs/summary.log" 2>&1 \
  || { say "summary failed:"; tail -n 20 "$OUT/logs/summary.log"; }
rm -rf "$WORK"
tar -czf "$WORK.tar.gz" -C "$OUT" --exclude=gpu-check.tar.gz . 2>/dev/null && mv "$WORK.tar.gz" "$OUT/gpu-check.tar.gz"
if [[ -n $EXPORT ]]; then
  mkdir -p "$EXPORT" && cp -f "$OUT/summary.md" "$OUT/results.json" "$OUT/gpu-check.tar.gz" "$EXPORT/" 2>/dev/null
fi
echo
[[ -f $OUT/summary.md ]] && cat "$OUT/summary.md"
say "done in $(($(date +%s) - START))s (budget ${BUDGET}s); results in $OUT${EXPORT:+, copied to $EXPORT}"
# exit status: 0 when the set-up worked, a device was there and every selected step passed
[[ -z ${SETUP_FAILED:-} && -z ${NO_DEVICE:-} ]] \
  && awk -F'\t' '$5 == "failed" || $5 == "timed out" {bad = 1} END {exit bad}' "$STEPS_TSV"
