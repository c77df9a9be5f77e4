#!/usr/bin/env bash
# GPU checks and timings in one run, for a machine with a CUDA GPU and medvit's dependencies
# (the package itself need not be installed: it runs from this checkout).
#
#   bash benchmarks/gpu_run.sh [OUT_DIR] [PART]        # PART: all (default), checks, brain
#
# checks: the CUDA tests (bf16 autocast, determinism, kill-and-resume on CUDA, every model family
#         against the CPU: tests/test_cuda.py), then the model, switch and peer benchmarks on
#         CUDA and bench_gpu.py (paper sizes, TF32, compile, CSwin head padding, host waits per
#         step) -> OUT_DIR/RESULTS_cuda.md, all_cuda.json and gpu_cuda.json.
# brain:  the detector stages of workflows/studies/brain.yaml (synthetic data, split, YOLOv8n
#         training, detection metrics, PTP) -> OUT_DIR/brain_detector.tgz.
# Each part has a time limit (seconds: TEST_LIMIT, BENCH_LIMIT, GPU_LIMIT, BRAIN_LIMIT) so the
# whole run fits a lease; BENCHES picks the benchmarks (default: models peers switches) and
# MODELS_ARGS adds arguments to bench_models.py (default: --passes 1 --in-process: a GPU does not
# need the CPU's three passes in fresh processes). docs/performance.md and docs/brain.md give
# what it measured.
set -u
OUT_DIR=$(mkdir -p "${1:-gpu_out}" && cd "${1:-gpu_out}" && pwd)
PART=${2:-all}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 YOLO_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
medvit() { "$PY" -m medvit.cli "$@"; }
stage() { echo "== $1 ($(date +%T))"; }

stage machine
nvidia-smi -L
"$PY" -c "import torch, timm, monai, ultralytics; print('torch', torch.__version__, torch.cuda.get_device_name(0), \
'| timm', timm.__version__, '| monai', monai.__version__, '| ultralytics', ultralytics.__version__)" || exit 1

if [ "$PART" = all ] || [ "$PART" = checks ]; then
    stage "CUDA tests"
    timeout "${TEST_LIMIT:-180}" "$PY" -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_speed.py tests/test_cuda.py \
        -k "cuda or bf16" 2>&1 | tee "$OUT_DIR/tests_cuda.log" | tail -n 15

    stage "benchmarks on CUDA"
    R=benchmarks/results
    mkdir -p "$R"
    BENCHES=${BENCHES:-models peers switches}
    for b in $BENCHES; do
        extra=""
        [ "$b" = switches ] && extra="--quick"   # torch.compile per model: quick sizes keep it short
        [ "$b" = models ] && extra="${MODELS_ARGS:---passes 1 --in-process}"
        timeout "${BENCH_LIMIT:-150}" "$PY" "benchmarks/bench_$b.py" --device cuda $extra --out "$R/$b.json" \
            2>&1 | tail -n 20
    done

    stage "paper sizes, TF32, compile, head padding, host waits (bench_gpu.py)"
    timeout "${GPU_LIMIT:-360}" "$PY" benchmarks/bench_gpu.py --device cuda --out "$R/gpu.json"
    "$PY" benchmarks/run_all.py --device cuda --report-only --only "$(echo $BENCHES gpu | tr ' ' ,)" --study none \
        --note "GPU run by benchmarks/gpu_run.sh: $BENCHES gpu (switches at quick sizes). The targets were set for the 2-core CPU (RESULTS.md); at the CPU's sizes a GPU is bound by kernel launches"
    cp benchmarks/RESULTS.md "$OUT_DIR/RESULTS_cuda.md"
    cp "$R"/all_cuda.json "$OUT_DIR/"
    [ -f "$R/gpu.json" ] && cp "$R/gpu.json" "$OUT_DIR/gpu_cuda.json"
fi

if [ "$PART" = all ] || [ "$PART" = brain ]; then
    stage "brain study: detector stages"
    S=workflows/studies/brain.yaml
    D=results/brain
    mkdir -p "$D/logs"
    (
        set -e
        read -r N SIZE SEED < <("$PY" -c "from medvit.config import load_study; s = load_study('$S'); \
b = s['tasks']['brain']['synthetic']; print(b['patients'], b['image_size'], s['seed'])")
        medvit synth brain --patients "$N" --image-size "$SIZE" --seed "$SEED" --out "$D/data/brain" > "$D/logs/synth.log" 2>&1
        medvit split --config "$S" --task brain --out "$D/brain/split.csv" > "$D/logs/split.log" 2>&1
        stage detect
        timeout "${BRAIN_LIMIT:-330}" "$PY" -m medvit.cli detect --config "$S" --task brain --split "$D/brain/split.csv" \
            --out "$D/brain/detector" > "$D/logs/detect.log" 2>&1
        medvit evaluate --config "$S" --task brain --model detector --predictions "$D/brain/detector/predictions.csv" \
            --out "$D/brain/detector/metrics.json" > "$D/logs/evaluate.log" 2>&1
        medvit ptp --config "$S" --task brain --predictions "$D/brain/detector/predictions.csv" --section detection \
            --out "$D/brain/detector/ptp.json" > "$D/logs/ptp.log" 2>&1
    ) || { echo "brain stages failed:"; tail -n 30 "$D"/logs/*.log; }
    tar czf "$OUT_DIR/brain_detector.tgz" -C "$D" logs brain/split.csv \
        $(cd "$D" && ls brain/detector/*.json brain/detector/*.csv brain/detector/*.png brain/detector/ultralytics/results.csv \
          brain/detector/ultralytics/args.yaml 2>/dev/null)
    "$PY" - "$D/brain/detector" <<'EOF'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
for name in ("detection_metrics.json", "ptp.json"):
    if (d / name).exists():
        data = json.loads((d / name).read_text())
        print(name, json.dumps(data.get("splits") or data, default=str)[:1500])
EOF
fi
stage done
