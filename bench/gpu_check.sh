#!/usr/bin/env bash
# The GPU checks. Default, the decoder's: the main job with the full preset on the whole
# default corpus, with a decoder budget that fits one data-centre GPU in about 8 minutes all told,
# then the two evaluations (decoder_eval.py trains the no-codes decoder with the same budget), then
# the acceptance figures as one JSON line (GPU_CHECK). With --engine, the engine's and the
# server's: the same main job with a shorter decoder budget (speed does not need a good decoder),
# then bench/bench_generate.py (loop over plain sampling at N_CAND 1, 4, 8),
# bench/bench_server.py (1-16 clients, a shorter memory run) and bench/bench_parallel.py
# (plan-parallel rendering, PARALLEL 1/2/4), their summaries as one JSON line (GPU_CHECK_ENGINE).
# Each is sized to fit one 10-minute run.
#
#   bash bench/gpu_check.sh            # on a GPU machine (set-up included: uv + locked environment)
#   bash bench/gpu_check.sh --engine   # the engine and server check instead
#   bash bench/gpu_check.sh --tiny     # the same path on CPU with the tiny preset, in about a minute (with --engine too)
#
# Budgets are knobs: DECODER_MINUTES (default 2; 1 with --engine), PLANNER_STEPS (default 4000; 500
# with --engine), EVAL_POSITIONS (default 200), VAL_ROWS (default 300), LONG_REQUESTS (the server's
# memory run with --engine, default 100), PARALLEL_PROMPTS (bench_parallel's prompts with --engine, default 12). Everything goes to a separate folder (GPU_CHECK_DIR,
# default out/gpu_check), so the artifacts of the main job are left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TINY=0
ENGINE=0
for a in "$@"; do
  case "$a" in
    --tiny) TINY=1 ;;
    --engine) ENGINE=1 ;;
    *) echo "error: unknown option $a (use --tiny, --engine)" >&2; exit 2 ;;
  esac
done
# NEXT_SPEED_PYTHON: an interpreter that already has the environment (the test suite uses its own)
if [ -n "${NEXT_SPEED_PYTHON:-}" ]; then
  PY=("$NEXT_SPEED_PYTHON")
else
  source scripts/bootstrap.sh
  PY=("${UV[@]}" run --frozen --project "$ROOT" python)
fi
DIR=${GPU_CHECK_DIR:-out/gpu_check}
mkdir -p "$DIR"
cd "$DIR"
unset OUT_DIR BS LR WARMUP OUT_PATH OUT_META
T0=$(date +%s)
if [ "$TINY" = 1 ]; then
  PRESET=tiny "${PY[@]}" -m next_speed.cli run
  EXTRA=(EMB_MODEL=cache/tiny/encoder DEVICE=cpu MAX_NEW_TOKENS=8 EVAL_POSITIONS=${EVAL_POSITIONS:-6} VAL_ROWS=${VAL_ROWS:-8})
  BENCH=(--sentences 2 --repeats 1 --dtypes auto)
  SERVER=(--c1-requests 2 --per-client 1 --sentences 1 --long ${LONG_REQUESTS:-8} --bf16 0 --unpacked 0)
  PAR_ARGS=(--prompts 2 --sentences 4 --n-cand 1,2)
elif [ "$ENGINE" = 1 ]; then
  PRESET=full TIME_BUDGET=${DECODER_MINUTES:-1} STEPS=${PLANNER_STEPS:-500} "${PY[@]}" -m next_speed.cli run
  EXTRA=(DEVICE=${DEVICE:-auto})  # bench_generate measures on the CPU unless told
  BENCH=(--repeats 2 --dtypes auto)
  SERVER=(--long ${LONG_REQUESTS:-100})
  PAR_ARGS=(--prompts ${PARALLEL_PROMPTS:-12})
else
  PRESET=full TIME_BUDGET=${DECODER_MINUTES:-2} STEPS=${PLANNER_STEPS:-4000} "${PY[@]}" -m next_speed.cli run
  EXTRA=(EVAL_POSITIONS=${EVAL_POSITIONS:-200} VAL_ROWS=${VAL_ROWS:-300})
fi
T1=$(date +%s)
if [ "$ENGINE" = 1 ]; then
  # the tiny preset's generation settings (its random stand-in encoder never repeats by cosine)
  [ "$TINY" = 1 ] && EXTRA=(EMB_MODEL=cache/tiny/encoder DEVICE=cpu MAX_NEW_TOKENS=8 REPEAT_COS=1.01)
  env "${EXTRA[@]}" "${PY[@]}" "$ROOT/bench/bench_generate.py" "${BENCH[@]}" --out bench_generate.json
  env "${EXTRA[@]}" "${PY[@]}" "$ROOT/bench/bench_server.py" "${SERVER[@]}" --out bench_server.json
  env "${EXTRA[@]}" "${PY[@]}" "$ROOT/bench/bench_parallel.py" "${PAR_ARGS[@]}" --out bench_parallel.json
  T2=$(date +%s)
  "${PY[@]}" - "$T1" "$T0" "$T2" <<'PY'
import json, sys
t1, t0, t2 = (int(x) for x in sys.argv[1:])
g = json.load(open("bench_generate.json"))
s = json.load(open("bench_server.json"))["summary"]
par = json.load(open("bench_parallel.json"))["summary"]
import torch
print("GPU_CHECK_ENGINE " + json.dumps({"device": torch.cuda.get_device_name(0) if g["device"].startswith("cuda") else g["device"], "main_job_s": t1 - t0, "benches_s": t2 - t1,
      **{f"generate_{k}": v for k, v in g["summary"].items()}, **{f"server_{k}": v for k, v in s.items()},
      **{f"parallel_{k}": v for k, v in par.items()}}))
PY
  exit 0
fi
env "${EXTRA[@]}" "${PY[@]}" "$ROOT/decoder_eval.py"
env "${EXTRA[@]}" "${PY[@]}" "$ROOT/code_agreement_eval.py"
T2=$(date +%s)
"${PY[@]}" - "$T1" "$T0" "$T2" <<'PY'
import json, sys
t1, t0, t2 = (int(x) for x in sys.argv[1:])
d = json.load(open("out/decoder_eval.json"))["summary"]
a = json.load(open("out/code_agreement.json"))["summary"]
import torch
print("GPU_CHECK " + json.dumps({"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
      "main_job_s": t1 - t0, "evals_s": t2 - t1, **{f"decoder_{k}": v for k, v in d.items()},
      **{f"agreement_{k}": v for k, v in a.items()}}))
PY
