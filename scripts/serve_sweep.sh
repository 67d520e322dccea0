#!/usr/bin/env bash
# Serving sweep: for each mode, start scripts/serve.py, wait for GET /health == 200, run
# scripts/bench_serve.py over the rates for every (images per request, image size), stop the server
# (SIGTERM, bounded wait, then SIGKILL of its process group), next mode; then plot each
# (images, size) across the modes with scripts/plot_serve.py.
#
#   MODEL=/path/to/llava-1.5-7b-hf scripts/serve_sweep.sh [OUT_DIR]
#   MODEL=... PD_PLACEMENT="P:0 D:1" EPD_PLACEMENT="E:0,1 P:2 D:3" scripts/serve_sweep.sh runs/x4
#   MODEL=... MODES="epd" IMAGES="2" SIZES="336x336" RATES="1,2,4,8,16" scripts/serve_sweep.sh
#
# Environment (defaults for one GPU):
#   MODEL            HF checkpoint directory (required)
#   MODES            "aggregated pd epd"
#   AGG_DEVICE       cuda:0            (aggregated: --device)
#   PD_PLACEMENT     "P:0 D:0"         (pd: --placement)
#   EPD_PLACEMENT    "E:0,0 P:0 D:0"   (epd: --placement)
#   HOST / PORT      127.0.0.1 / 8000
#   BACKEND / DTYPE  auto / auto       (scripts/serve.py --backend / --dtype)
#   RATES            1,2,4,8           NUM_REQUESTS 100
#   IMAGES           "1 2 4"           SIZES "336x336 1920x1080"
#   WORKLOAD         epd-synthetic     SLO_TTFT 1.4  SLO_TPOT 0.04
#   PHASES           a multi-phase workload (bench_serve.py --phases) instead of RATES x IMAGES x SIZES:
#                    one run per mode, named "phases"
#   REQUEST_TIMEOUT  300 (s, per request)
#   HEALTH_TIMEOUT   900 (s to wait for /health after start; model load + graph capture)
#   STOP_TIMEOUT     60  (s to wait after SIGTERM before SIGKILL)
#   SERVER_ARGS      extra scripts/serve.py flags (word-split), e.g. "--max-num-seqs 128"
#   BENCH_ARGS       extra scripts/bench_serve.py flags (word-split; default "--ignore-eos")
#   PYTHON           python
# Output: OUT_DIR/<mode>/{server.log, img<N>_<WxH>.json, img<N>_<WxH>.jsonl}, OUT_DIR/plots/img<N>_<WxH>/*.png
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL="${MODEL:?set MODEL to an HF checkpoint directory}"
OUT_DIR="${1:-${OUT_DIR:-runs/serve_sweep_$(date -u +%Y%m%d_%H%M%S)}}"
MODES="${MODES:-aggregated pd epd}"
AGG_DEVICE="${AGG_DEVICE:-cuda:0}"
PD_PLACEMENT="${PD_PLACEMENT:-P:0 D:0}"
EPD_PLACEMENT="${EPD_PLACEMENT:-E:0,0 P:0 D:0}"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-8000}"
BACKEND="${BACKEND:-auto}"
DTYPE="${DTYPE:-auto}"
RATES="${RATES:-1,2,4,8}"
NUM_REQUESTS="${NUM_REQUESTS:-100}"
IMAGES="${IMAGES:-1 2 4}"
SIZES="${SIZES:-336x336 1920x1080}"
WORKLOAD="${WORKLOAD:-epd-synthetic}"
SLO_TTFT="${SLO_TTFT:-1.4}"
SLO_TPOT="${SLO_TPOT:-0.04}"
REQUEST_TIMEOUT="${REQUEST_TIMEOUT:-300}"
HEALTH_TIMEOUT="${HEALTH_TIMEOUT:-900}"
STOP_TIMEOUT="${STOP_TIMEOUT:-60}"
SERVER_ARGS="${SERVER_ARGS:-}"
BENCH_ARGS="${BENCH_ARGS-"--ignore-eos"}"  # unset: --ignore-eos; set (even empty): as given
PYTHON="${PYTHON:-python}"
BASE_URL="http://${HOST}:${PORT}"
# scripts/serve.py (ipc/serve_cli.py) refuses to start without a shared secret; a random one per sweep
if [[ -z "${EPD_AUTHKEY:-}" ]]; then
    EPD_AUTHKEY="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
fi
export EPD_AUTHKEY

SERVER_PID=""

log() { echo "[serve_sweep $(date -u +%H:%M:%S)] $*" >&2; }

# HTTP status of GET $1 ("000" when nothing answers), bounded to 5 s
http_status() {
    if command -v curl >/dev/null 2>&1; then
        curl -s -o /dev/null -m 5 -w '%{http_code}' "$1" 2>/dev/null || true
    else
        "$PYTHON" - "$1" <<'PY' 2>/dev/null || echo 000
import sys, urllib.error, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
PY
    fi
}

stop_server() {
    [[ -n "$SERVER_PID" ]] || return 0
    local pid="$SERVER_PID"
    SERVER_PID=""
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping the server (pid $pid, SIGTERM)"
        kill -TERM "$pid" 2>/dev/null || true
        local waited=0
        while kill -0 "$pid" 2>/dev/null && (( waited < STOP_TIMEOUT )); do
            sleep 1
            waited=$((waited + 1))
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "server pid $pid still up after ${STOP_TIMEOUT}s: SIGKILL to its process group"
            kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
}
trap stop_server EXIT
trap 'stop_server; exit 130' INT
trap 'stop_server; exit 143' TERM

# start_server MODE LOGFILE: scripts/serve.py in its own session (so a stuck one is killed with its stages)
start_server() {
    local mode="$1" logfile="$2"
    local args=(--model "$MODEL" --mode "$mode" --host "$HOST" --port "$PORT" --backend "$BACKEND" --dtype "$DTYPE")
    case "$mode" in
        aggregated) args+=(--device "$AGG_DEVICE") ;;
        pd) args+=(--placement "$PD_PLACEMENT") ;;
        epd) args+=(--placement "$EPD_PLACEMENT") ;;
        *) log "unknown mode $mode (expected aggregated, pd or epd)"; return 2 ;;
    esac
    # shellcheck disable=SC2206  # SERVER_ARGS is meant to be word-split
    args+=($SERVER_ARGS)
    log "starting: $PYTHON scripts/serve.py ${args[*]} (log: $logfile)"
    if command -v setsid >/dev/null 2>&1; then
        setsid "$PYTHON" "$ROOT/scripts/serve.py" "${args[@]}" >"$logfile" 2>&1 &
    else
        "$PYTHON" "$ROOT/scripts/serve.py" "${args[@]}" >"$logfile" 2>&1 &
    fi
    SERVER_PID=$!
    local waited=0 status
    while (( waited < HEALTH_TIMEOUT )); do
        status="$(http_status "$BASE_URL/health")"
        if [[ "$status" == "200" ]]; then
            log "server up after ${waited}s ($mode)"
            return 0
        fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            log "the server exited during start-up; last lines of $logfile:"
            tail -n 20 "$logfile" >&2 || true
            SERVER_PID=""
            return 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    log "no 200 from $BASE_URL/health within ${HEALTH_TIMEOUT}s; last lines of $logfile:"
    tail -n 20 "$logfile" >&2 || true
    stop_server
    return 1
}

if [[ "$(http_status "$BASE_URL/health")" != "000" ]]; then
    log "something already answers on $BASE_URL; stop it or pick another PORT"
    exit 2
fi
mkdir -p "$OUT_DIR"
log "output: $OUT_DIR; modes: $MODES; rates: $RATES; images: $IMAGES; sizes: $SIZES"

failed_modes=()
for mode in $MODES; do
    mkdir -p "$OUT_DIR/$mode"
    if ! start_server "$mode" "$OUT_DIR/$mode/server.log"; then
        failed_modes+=("$mode")
        continue
    fi
    for n in $IMAGES; do
        for size in $SIZES; do
            name="img${n}_${size}"
            load=(--rates "$RATES" --num-requests "$NUM_REQUESTS" --images-per-request "$n" --image-size "$size")
            if [[ -n "${PHASES:-}" ]]; then
                name="phases"
                load=(--phases "$PHASES")
            fi
            log "$mode: $name"
            # shellcheck disable=SC2086  # BENCH_ARGS is meant to be word-split
            if ! "$PYTHON" "$ROOT/scripts/bench_serve.py" --base-url "$BASE_URL" --workload "$WORKLOAD" \
                "${load[@]}" --slo-ttft "$SLO_TTFT" --slo-tpot "$SLO_TPOT" --request-timeout "$REQUEST_TIMEOUT" \
                --label "$mode" --records "$OUT_DIR/$mode/$name.jsonl" --out "$OUT_DIR/$mode/$name.json" \
                $BENCH_ARGS; then
                log "$mode $name: bench_serve.py failed (see above)"
            fi
            if ! kill -0 "$SERVER_PID" 2>/dev/null; then
                log "$mode: the server died; last lines of its log:"
                tail -n 20 "$OUT_DIR/$mode/server.log" >&2 || true
                SERVER_PID=""
                failed_modes+=("$mode")
                continue 3
            fi
            [[ -z "${PHASES:-}" ]] || break 2
        done
    done
    stop_server
done

for n in $IMAGES; do
    for size in $SIZES; do
        name="img${n}_${size}"
        inputs=()
        for mode in $MODES; do
            if [[ -f "$OUT_DIR/$mode/$name.json" ]]; then
                inputs+=("$OUT_DIR/$mode/$name.json")
            fi
        done
        (( ${#inputs[@]} )) || continue
        "$PYTHON" "$ROOT/scripts/plot_serve.py" "${inputs[@]}" --slo-ttft "$SLO_TTFT" --slo-tpot "$SLO_TPOT" \
            --out-dir "$OUT_DIR/plots/$name" || log "plot_serve.py failed for $name (matplotlib installed?)"
    done
done

if (( ${#failed_modes[@]} )); then
    log "done with failures in: ${failed_modes[*]}; output in $OUT_DIR"
    exit 1
fi
log "done; output in $OUT_DIR"
