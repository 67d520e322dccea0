#!/usr/bin/env bash
# One call on the GPU machine: build the extension, run the GPU tests, the parity scripts on the
# cuda backend at 7B shapes, and the kernel benchmarks; logs and a summary table under $OUT.
#   STAGES="build test parity bench engine epd" bash scripts/device_check.sh
# Stages: build; test (all GPU tests) or enginetest (the engine/EPD/IPC ones only); parity;
# bench (kernels); engine (bench_decode, bench_offline); epd (bench_epd on one GPU, arena shared
# and copied); epdmulti (bench_epd with EPD_PLACEMENT, default "E:0,1 P:0 D:1"); profile (per-kernel
# decode profile at batch 1 and 8); image (GPU preprocessing, LLaVA-NeXT and cache GPU tests, bench_preprocess,
# bench_epd with 2 JPEGs per request; with encodefirst, 1080p again with encode_first off); switch
# (shared weights, role switches); serve (the OpenAI-server sweep); profile_stages (per-stage costs
# for the simulator: $OUT/costs_h200.json);
# dynamic (a shifting workload through the OpenAI server, static vs --dynamic); encprofile (an encoder's
# GPU time per image by kernel: scripts/profile_encoder.py); burst (the 1080p burst BURST_RUNS times per
# placement of BURST_PLACEMENTS, '|'-separated, with timelines); jpegtest (preprocessing GPU tests);
# noregress (bench_epd on this tree vs an earlier one in BASE_TREE, alternating, twice); determ (batch-invariant
# mode: tests/test_deterministic.py on the GPU, bench_decode with and without it, bench_epd with it);
# splits (decode attention's GPU tests, bench_decode at batches 1-32: the split rule); ttft (idle-engine
# TTFT of one fresh 336x336 PNG in epd, pd and aggregated: bench_epd's one-at-a-time pass, its stamps);
# visattn (attention kernels vs SDPA flash and cuDNN; the tower with its attention swapped: scripts/ab_vision_attention.py);
# fmhatiles (the attention tile A/B, EPD_FMHA_TILES=0-3: prefill/dense GPU tests, attention bench, the tower at batch 32).
# Older A/Bs kept for reruns: abpen (decode graphs with and
# without the penalty ops), prebench (with image: bench_preprocess), onecheck (with image: the token check
# with one encoder), batchab (1080p bursts, encoder batches of 16 then 8), timeline (1080p bursts with
# stamps, layer yields on / off / on).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
STAGES=${STAGES:-"build test parity bench engine"}
# The image's default CXX wrapper (/opt/gcc/bin/g++) miscompiles TORCH_CHECK messages with numbers.
export CXX=/usr/bin/g++
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} EPD_CACHE_DIR=/tmp/epd-cache
if ls .whl/*.whl >/dev/null 2>&1; then  # multiprocess + dill; .whl/http/: the http extra and the openai client
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl $(ls .whl/http/*.whl 2>/dev/null) \
    && export PYTHONPATH=/tmp/site
fi
SUMMARY="$OUT/summary.md"
# the device's copy of .git may be stale: pass EPD_COMMIT=$(git rev-parse --short HEAD) from here
echo "# device_check $(date -u +%FT%TZ) tree of commit ${EPD_COMMIT:-unknown}" > "$SUMMARY"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader >> "$SUMMARY" 2>&1

stage() {  # stage NAME CMD...: run, log, record status and time
  local name=$1; shift
  local t0=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "| $name | rc=$rc | $(( $(date +%s) - t0 ))s |" >> "$SUMMARY"
  tail -n 25 "$OUT/$name.log"
  return $rc
}

if [[ " $STAGES " == *" build "* ]]; then
  stage build python3 -m epd_kernels.build || { echo "build failed"; exit 1; }
fi
if [[ " $STAGES " == *" test "* ]]; then
  stage pytest_gpu python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests
elif [[ " $STAGES " == *" enginetest "* ]]; then
  stage pytest_gpu_engine python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_cuda_engine.py \
    tests/test_epd.py tests/test_arena.py tests/test_migration.py
fi
llava7b() {  # the random LLaVA-1.5-7B-shaped checkpoint, made once per machine
  [[ -f /tmp/llava-7b/config.json ]] || stage make_llava7b python3 scripts/make_random_model.py --shape llava-7b \
    --out /tmp/llava-7b
}
if [[ " $STAGES " == *" parity "* ]]; then
  llava7b
  for s in logits vision decode; do
    stage "parity_${s}_7b" python3 "parity/$s.py" --model /tmp/llava-7b --dtype bfloat16 --device cuda \
      --backend cuda --steps "${PARITY_STEPS:-64}"
  done
  stage make_llama7b python3 scripts/make_random_model.py --shape llama2-7b --out /tmp/llama-7b
  for s in logits decode; do
    stage "parity_${s}_llama7b" python3 "parity/$s.py" --model /tmp/llama-7b --dtype bfloat16 --device cuda \
      --backend cuda --steps "${PARITY_STEPS:-64}"
  done
  stage parity_tiny_torch_cuda python3 parity/logits.py --device cuda --backend torch
fi
if [[ " $STAGES " == *" bench "* ]]; then
  stage bench_kernels python3 scripts/bench_kernels.py --json "$OUT/bench_kernels.json" --md "$OUT/bench_kernels.md"
  cat "$OUT/bench_kernels.md" >> "$SUMMARY"
fi
if [[ " $STAGES " == *" engine "* ]]; then
  llava7b
  stage bench_decode python3 scripts/bench_decode.py --model /tmp/llava-7b --batches 1,8,32,128 \
    --multi-step 1,8 --steps 32 --serve-time
  # batch 256 at 640 tokens needs ~88 GB of KV: at 640 on a 141 GB card (issue 16), 320 on 80 GB ones
  mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1)
  stage bench_decode_256 python3 scripts/bench_decode.py --model /tmp/llava-7b --batches 256 \
    --context "$(( ${mem_mib:-0} > 120000 ? 640 : 320 ))" --multi-step 1,8 --steps 32 --no-hf
  stage bench_offline python3 scripts/bench_offline.py --model /tmp/llava-7b
  grep -h "^|\|time to first\|capture" "$OUT/bench_decode.log" "$OUT/bench_decode_256.log" \
    "$OUT/bench_offline.log" >> "$SUMMARY"
fi
if [[ " $STAGES " == *" abpen "* ]]; then  # same-run A/B: decode graphs with and without the penalty ops
  llava7b
  for round in 1 2; do
    for variant in with without; do
      flag=""; [[ $variant == without ]] && flag="--without-penalty-ops"
      stage "bench_decode_${variant}_pen_$round" python3 scripts/bench_decode.py --model /tmp/llava-7b \
        --batches 1,8,32,128 --multi-step 8 --steps 24 --no-hf $flag
      echo "penalty ops $variant, round $round:" >> "$SUMMARY"
      grep -h "^| [0-9]" "$OUT/bench_decode_${variant}_pen_$round.log" >> "$SUMMARY"
    done
  done
fi
if [[ " $STAGES " == *" splits "* ]]; then  # issue 16: decode attention's small-batch split rule, as code
  llava7b
  stage pytest_attn_decode python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_kernels_attn_decode.py
  stage bench_decode_splits python3 scripts/bench_decode.py --model /tmp/llava-7b --batches 1,2,4,8,32 \
    --multi-step 8 --steps 24 --no-hf
  echo "bench_decode (2 CTAs per SM below one per SM):" >> "$SUMMARY"
  grep -h "^| [0-9]" "$OUT/bench_decode_splits.log" >> "$SUMMARY"
fi
if [[ " $STAGES " == *" visattn "* ]]; then  # issue 16: the tower's attention, ours vs SDPA flash / cuDNN
  llava7b
  stage bench_attn python3 -m epd_kernels.attn_varlen.bench
  grep -h "prefill\|vision" "$OUT/bench_attn.log" >> "$SUMMARY"
  stage ab_vision_attention python3 scripts/ab_vision_attention.py --model /tmp/llava-7b --batches 1,8,32
  grep -h "^|\|difference\|unavailable" "$OUT/ab_vision_attention.log" >> "$SUMMARY"
fi
if [[ " $STAGES " == *" fmhatiles "* ]]; then  # issue 16: attention tile A/B (EPD_FMHA_TILES=0..3), tests + benches
  llava7b
  for v in 0 1 2 3; do
    EPD_FMHA_TILES=$v stage "pytest_fmha_tiles$v" python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider \
      tests/test_kernels_attn_prefill.py -k "dense or long or mixed"
    EPD_FMHA_TILES=$v stage "bench_attn_tiles$v" python3 -m epd_kernels.attn_varlen.bench
    echo "attention bench, EPD_FMHA_TILES=$v: $(tail -n 1 "$OUT/pytest_fmha_tiles$v.log")" >> "$SUMMARY"
    grep -h "8x640\|16x577" "$OUT/bench_attn_tiles$v.log" | grep "flash" >> "$SUMMARY"
  done
  for v in 0 2 0 2; do  # the tower at batch 32, today's tiles and variant 2 alternating
    EPD_FMHA_TILES=$v stage "profile_encoder_tiles$v" python3 scripts/profile_encoder.py --model /tmp/llava-7b \
      --size 336x336 --batch 32 --batches-in-a-row 8
    echo "tower, EPD_FMHA_TILES=$v: $(grep -h "^| 32 |" "$OUT/profile_encoder_tiles$v.log" | head -n 1)" >> "$SUMMARY"
  done
fi
if [[ " $STAGES " == *" ttft "* ]]; then  # issue 16: idle-engine TTFT, 1 fresh 336x336 PNG, from arrival, every mode
  llava7b
  for mode in epd pd; do
    stage "bench_epd_ttft_$mode" python3 scripts/bench_epd.py --model /tmp/llava-7b --mode "$mode" \
      --placement "$([[ $mode == pd ]] && echo 'P:0 D:0' || echo 'E:0 P:0 D:0')" --requests 8 --check-requests 8 \
      --max-tokens 8
    echo "idle TTFT, $mode:" >> "$SUMMARY"
    grep -h -A4 "^idle-engine TTFT" "$OUT/bench_epd_ttft_$mode.log" | grep "^| [a-z]" >> "$SUMMARY"
  done
fi
if [[ " $STAGES " == *" determ "* ]]; then  # issue 16: batch-invariant mode: its GPU tests, its cost, EPD == aggregated
  llava7b
  stage pytest_deterministic python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_deterministic.py
  stage parity_decode_7b_det python3 parity/decode.py --model /tmp/llava-7b --dtype bfloat16 --device cuda \
    --backend cuda --steps 64 --deterministic
  for det in "" "--deterministic"; do
    stage "bench_decode${det:+_det}" python3 scripts/bench_decode.py --model /tmp/llava-7b --batches 1,8,32,128 \
      --multi-step 8 --steps 24 --no-hf $det
    echo "bench_decode $det:" >> "$SUMMARY"; grep -h "^| [0-9]" "$OUT/bench_decode${det:+_det}.log" >> "$SUMMARY"
  done
  stage bench_epd_det python3 scripts/bench_epd.py --model /tmp/llava-7b --placement "E:0,0 P:0 D:0" --requests 32 \
    --images 2 --check-requests 6 --deterministic
  grep -h "token-for-token\|^| epd\|^| aggregated" "$OUT/bench_epd_det.log" >> "$SUMMARY"
fi
if [[ " $STAGES " == *" profile "* ]]; then
  llava7b
  stage profile_decode python3 scripts/profile_decode.py --model /tmp/llava-7b --batch 1,8
  grep -h "^## \|^timed" "$OUT/profile_decode.log" >> "$SUMMARY"
fi
if [[ " $STAGES " == *" epd "* ]]; then
  llava7b
  # shared arena, KV sized from GPU memory by the stages; then copied KV with a fixed size
  stage bench_epd_shared python3 scripts/bench_epd.py --model /tmp/llava-7b --placement "E:0,0 P:0 D:0"
  stage bench_epd_copy python3 scripts/bench_epd.py --model /tmp/llava-7b --placement "E:0,0 P:0 D:0" --no-share \
    --check-requests 2 --kv-cache-tokens 16384
  grep -h "^|\|one at a time\|copy\|pull_blocks\|KV tokens" "$OUT"/bench_epd_*.log >> "$SUMMARY"
fi
if [[ " $STAGES " == *" epdmulti "* ]]; then
  export NCCL_NVLS_ENABLE=0
  llava7b
  stage bench_epd_multi python3 scripts/bench_epd.py --model /tmp/llava-7b --placement "${EPD_PLACEMENT:-E:0,1 P:0 D:1}"
  grep -h "^|\|one at a time\|copy\|pull_blocks" "$OUT/bench_epd_multi.log" >> "$SUMMARY"
fi
if [[ " $STAGES " == *" image "* ]]; then  # issue 13: GPU preprocessing, LLaVA-NeXT, TTFT under image-heavy load
  stage pytest_gpu_image python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_kernels_image.py \
    tests/test_preprocess.py tests/test_llava_next.py tests/test_epd.py tests/test_cuda_engine.py \
    tests/test_encode_role.py tests/test_mm_cache.py
  [[ " $STAGES " == *" prebench "* ]] && stage bench_preprocess python3 scripts/bench_preprocess.py \
    --json "$OUT/bench_preprocess.json"
  llava7b
  # 48 requests x 2 JPEGs at once, three sizes; GPU preprocessing (auto), then PIL threads (cpu: the before)
  stage bench_epd_images python3 scripts/bench_epd.py --model /tmp/llava-7b --placement "E:0,0 P:0 D:0" \
    --requests 48 --images 2 --image-size "${IMAGE_SIZES:-336x336,1920x1080,4032x3024}" --image-format jpeg \
    --max-tokens 16 --check-requests 4 --image-preprocess "${IMAGE_PREPROCESS:-auto,cpu}"
  grep -h "^| \|encode share\|one at a time\|differ" "$OUT/bench_epd_images.log" >> "$SUMMARY"
  if [[ " $STAGES " == *" encodefirst "* ]]; then  # the before of encode_first: prefills do not wait for encoders
    stage bench_epd_no_encode_first python3 scripts/bench_epd.py --model /tmp/llava-7b --placement "E:0,0 P:0 D:0" \
      --requests 48 --images 2 --image-size 1920x1080 --image-format jpeg --max-tokens 16 --check-requests 2 \
      --image-preprocess auto --no-encode-first
    grep -h "^| \|encode share" "$OUT/bench_epd_no_encode_first.log" | grep -v "^| image emb\|^| KV" >> "$SUMMARY"
  fi
  if [[ " $STAGES " == *" batch16 "* ]]; then  # encoder batches of 16 items (the default is 8)
    stage bench_epd_batch16 python3 scripts/bench_epd.py --model /tmp/llava-7b --placement "E:0,0 P:0 D:0" \
      --requests 48 --images 2 --image-size 1920x1080 --image-format jpeg --max-tokens 16 --check-requests 2 \
      --image-preprocess auto --max-images-per-batch 16
    grep -h "^| \|encode share" "$OUT/bench_epd_batch16.log" | grep -v "^| image emb\|^| KV" >> "$SUMMARY"
  fi
  if [[ " $STAGES " == *" onecheck "* ]]; then  # one encoder: does the token check depend on the split?
    stage bench_epd_one_encoder python3 scripts/bench_epd.py --model /tmp/llava-7b --placement "E:0 P:0 D:0" \
      --requests 8 --images 2 --image-size 1920x1080 --image-format jpeg --max-tokens 16 --check-requests 6 \
      --image-preprocess cpu,auto
    grep -h "one at a time\|differ" "$OUT/bench_epd_one_encoder.log" >> "$SUMMARY"
  fi
  if [[ " $STAGES " == *" next7b "* ]]; then
    [[ -f /tmp/llava-next-7b/config.json ]] || stage make_next7b python3 scripts/make_random_model.py \
      --shape llava-next-7b --out /tmp/llava-next-7b --device cuda
    stage parity_logits_next7b python3 parity/logits.py --model /tmp/llava-next-7b --dtype bfloat16 --device cuda \
      --backend cuda
    grep -h "ratio\|PASS\|FAIL" "$OUT/parity_logits_next7b.log" | tail -n 8 >> "$SUMMARY"
  fi
fi
if [[ " $STAGES " == *" switch "* ]]; then  # issue 14: weights shared over CUDA IPC, role switches timed
  llava7b
  stage pytest_gpu_switch python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_weights.py \
    tests/test_cuda_engine.py tests/test_epd.py
  stage bench_switch python3 scripts/bench_switch.py --model /tmp/llava-7b
  grep -h "^| \|GPU used\|switch \|one at a time" "$OUT/bench_switch.log" >> "$SUMMARY"
fi
if [[ " $STAGES " == *" batchab "* ]]; then  # issue 13: 1080p bursts, encoder batches of 16 then 8 items, same run
  llava7b
  for items in 16 8; do
    stage "bench_epd_items$items" python3 scripts/bench_epd.py --model /tmp/llava-7b --placement "E:0,0 P:0 D:0" \
      --requests 48 --images 2 --image-size 1920x1080 --image-format jpeg --max-tokens 16 --check-requests 2 \
      --image-preprocess auto --max-images-per-batch "$items" --timeline "$OUT/tl_items$items"
    echo "encoder batches of $items items:" >> "$SUMMARY"
    grep -h "^| \|encode share" "$OUT/bench_epd_items$items.log" | grep -v "^| image emb\|^| KV\|^| hand" >> "$SUMMARY"
  done
  (cd "$OUT" && tar czf timelines.tgz tl_* && rm -rf tl_*)
fi
if [[ " $STAGES " == *" timeline "* ]]; then  # issue 13: 1080p bursts with per-request stamps, layer yields on/off/on
  llava7b
  stage pytest_gpu_busy python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_busy_board.py
  for run in yield_a:4 noyield:0 yield_b:4; do
    IFS=: read -r label every <<< "$run"
    stage "bench_epd_$label" env EPD_YIELD_EVERY="$every" python3 scripts/bench_epd.py --model /tmp/llava-7b \
      --placement "E:0,0 P:0 D:0" --requests 48 --images 2 --image-size 1920x1080 --image-format jpeg \
      --max-tokens 16 --check-requests 2 --image-preprocess auto --timeline "$OUT/tl_$label"
    echo "layer yields every $every ($label):" >> "$SUMMARY"
    grep -h "^| \|encode share" "$OUT/bench_epd_$label.log" | grep -v "^| image emb\|^| KV\|^| hand" >> "$SUMMARY"
  done
  (cd "$OUT" && tar czf timelines.tgz tl_* && rm -rf tl_*)
fi
if [[ " $STAGES " == *" jpegtest "* ]]; then  # the preprocessing / encode-role GPU tests (nvjpeg's no-wait test too)
  stage pytest_gpu_jpeg python3 -m pytest -m gpu -q --tb=short -p no:cacheprovider tests/test_preprocess.py \
    tests/test_encode_role.py
fi
if [[ " $STAGES " == *" noregress "* ]]; then  # issue 18: same-host stages still map arenas; this tree vs BASE_TREE
  llava7b
  BASE=${BASE_TREE:-.base}  # an earlier tree (git archive), its kernels the same as this one's
  cp epd_kernels/_epd_C*.so "$BASE/kernels/"
  for round in 1 2; do
    for tree in head base; do
      dir=.; [[ $tree == base ]] && dir=$BASE
      stage "bench_epd_${tree}_$round" bash -c "cd '$dir' && python3 scripts/bench_epd.py --model /tmp/llava-7b \
        --placement 'E:0,0 P:0 D:0' --check-requests 2"
      echo "$tree tree, round $round:" >> "$SUMMARY"
      grep -h "^| \|stages started\|one at a time" "$OUT/bench_epd_${tree}_$round.log" >> "$SUMMARY"
    done
  done
fi
if [[ " $STAGES " == *" encprofile "* ]]; then  # issue 13/16: an encoder's GPU time per image, by kernel
  llava7b
  for size in ${ENC_SIZES:-1920x1080}; do
    for conn in ${ENC_CONNECTIONS:-8 32}; do  # CUDA's hardware queues per context (the workers run 32)
      stage "profile_encoder_${size}_c$conn" env CUDA_DEVICE_MAX_CONNECTIONS="$conn" python3 scripts/profile_encoder.py \
        --model /tmp/llava-7b --size "$size" --batch "${ENC_BATCHES:-8,32}"
      echo "CUDA_DEVICE_MAX_CONNECTIONS=$conn:" >> "$SUMMARY"
      sed -n '/^## summary/,$p' "$OUT/profile_encoder_${size}_c$conn.log" >> "$SUMMARY"
      grep -A8 "preprocess steps" "$OUT/profile_encoder_${size}_c$conn.log" >> "$SUMMARY"
    done
  done
fi
if [[ " $STAGES " == *" burst "* ]]; then  # issue 13: the 1080p burst per placement, BURST_RUNS times, with stamps
  llava7b
  IFS='|' read -ra placements <<< "${BURST_PLACEMENTS:-E:0,0 P:0 D:0}"
  for run in $(seq 1 "${BURST_RUNS:-2}"); do
    for i in "${!placements[@]}"; do
      stage "bench_epd_burst${run}_p$i" python3 scripts/bench_epd.py --model /tmp/llava-7b --placement "${placements[$i]}" \
        --requests 48 --images 2 --image-size "${BURST_SIZE:-1920x1080}" --image-format jpeg --max-tokens 16 \
        --check-requests 2 --image-preprocess auto --timeline "$OUT/tl_burst${run}_p$i"
      echo "burst $run, ${placements[$i]}:" >> "$SUMMARY"
      grep -h "^| \|encode share" "$OUT/bench_epd_burst${run}_p$i.log" | grep -v "^| image emb\|^| KV\|^| hand" >> "$SUMMARY"
    done
  done
  (cd "$OUT" && tar czf timelines.tgz tl_* && rm -rf tl_*)
fi
if [[ " $STAGES " == *" profile_stages "* ]]; then  # issue 15: the per-stage cost profile a simulator is fitted from
  llava7b
  stage profile_stages python3 scripts/profile_stages.py --model /tmp/llava-7b --backend cuda --device cuda \
    --dtype bfloat16 --out "$OUT/costs_h200.json" --prefill-tokens 16,256,1024,2048,4000
  grep -h "^## \|^| \|^wrote" "$OUT/profile_stages.log" >> "$SUMMARY"
fi
if [[ " $STAGES " == *" dynamic "* ]]; then  # issue 15: a shifting workload, static vs --dynamic, same placement
  llava7b
  PH=${DYN_PHASES:-"requests=400,rate=40,images=2,size=1920x1080,max_tokens=10;requests=400,rate=40,images=0,max_tokens=128"}
  for run in "static|" "dynamic|--dynamic"; do
    IFS='|' read -r label extra <<< "$run"
    stage "dyn_$label" env MODEL=/tmp/llava-7b BACKEND=cuda DTYPE=bfloat16 PYTHON=python3 MODES=epd \
      EPD_PLACEMENT="${DYN_PLACEMENT:-E:0,0 P:0 D:0}" SERVER_ARGS="$extra" PHASES="$PH" timeout 240 \
      bash scripts/serve_sweep.sh "/tmp/dyn_runs/$label"
    grep -h "SLO attainment\|= phase\|goodput\|^TTFT\|^TPOT" "$OUT/dyn_$label.log" | head -n 16 >> "$SUMMARY"
  done
  grep -h "dynamic:" /tmp/dyn_runs/dynamic/epd/server.log | head -n 20 >> "$SUMMARY"
  (cd /tmp/dyn_runs && tar czf "$OUT/dyn_runs.tgz" .)
fi
if [[ " $STAGES " == *" serve "* ]]; then  # OpenAI server sweep (scripts/serve_sweep.sh), one GPU by default
  llava7b
  stage serve_sweep env MODEL=/tmp/llava-7b BACKEND=cuda DTYPE=bfloat16 PYTHON=python3 \
    MODES="${SERVE_MODES:-aggregated pd epd}" RATES="${SERVE_RATES:-2,4,8,16}" NUM_REQUESTS="${SERVE_REQUESTS:-40}" \
    IMAGES="${SERVE_IMAGES:-1}" SIZES="${SERVE_SIZES:-336x336}" timeout "${SERVE_TIMEOUT:-3000}" \
    bash scripts/serve_sweep.sh /tmp/serve_runs
  (cd /tmp/serve_runs && tar czf "$OUT/serve_runs.tgz" .)
  find /tmp/serve_runs/plots -name "*.png" | head -n 5 | while read -r png; do
    cp "$png" "$OUT/$(basename "$(dirname "$png")")_$(basename "$png")"
  done
  grep -h "goodput\|attainment\|^| " "$OUT/serve_sweep.log" | tail -n 60 >> "$SUMMARY"
fi
grep -h "PASS\|FAIL\|passed\|failed" "$OUT"/*.log | tail -n 60 >> "$SUMMARY"
cat "$SUMMARY"
