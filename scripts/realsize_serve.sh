#!/usr/bin/env bash
# llama-server vs tandem serve on the same GGUF: ready time, then tandem bench serve 128/128 at 1 and 8 clients.
# Usage: scripts/realsize_serve.sh FILE NAME (TANDEM, LLBIN, RES_DIR override the defaults)
set -u
F=$1; NAME=$2; T=${TANDEM:-target/release/tandem}; B=${LLBIN:-$HOME/.cache/tandem-peers/llbuild/bin}; PORT=8097
export LD_LIBRARY_PATH=$B TANDEM_LOG=info
RES=${RES_DIR:-/tmp}/serve-$NAME-$(date +%H%M); mkdir -p $RES
for e in llama tandem; do
  cat "$F" > /dev/null
  t0=$(date +%s.%N)
  if [ $e = llama ]; then
    $B/llama-server -m "$F" --host 127.0.0.1 --port $PORT --parallel 8 --cont-batching -c 16384 -t 2 --no-webui --no-repack > $RES/$e.log 2>&1 &
  else
    $T serve --model "$F" --served-model-name $NAME --port $PORT > $RES/$e.log 2>&1 &
  fi
  P=$!
  for _ in $(seq 1200); do curl -sf http://127.0.0.1:$PORT/health >/dev/null 2>&1 && break; sleep 0.25; done
  echo "$e ready after $(python3 -c "print(round($(date +%s.%N)-$t0,1))") s"
  for c in 1 8; do
    n=$(( c == 1 ? 2 : 8 ))
    $T bench serve --base-url http://127.0.0.1:$PORT --model "$F" --served-model-name $NAME --dataset-name random \
      --random-input-len 128 --random-output-len 128 --num-prompts $n --max-concurrency $c --ignore-eos --seed $c \
      --disable-tqdm > $RES/$e-c$c.txt 2>&1
    printf "%-7s c=%s %s tok/s  TTFT %s ms  TPOT %s ms\n" $e $c "$(grep 'Output token throughput' $RES/$e-c$c.txt | head -1 | awk '{print $NF}')" \
      "$(grep 'Median TTFT' $RES/$e-c$c.txt | awk '{print $NF}')" "$(grep 'Median TPOT' $RES/$e-c$c.txt | awk '{print $NF}')"
  done
  echo "$e peak RSS $(grep VmHWM /proc/$P/status)"
  kill $P; wait $P 2>/dev/null
done
echo "results in $RES"
