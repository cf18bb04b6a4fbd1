#!/usr/bin/env bash
# Side by side at real size: llama-bench and tandem bench decode on the same GGUF, A B A B,
# the file read into the page cache before each run. Usage: scripts/realsize_decode.sh FILE [PAIRS] (TANDEM, LLBIN override the binaries)
set -u
F=$1; N=${2:-3}; T=${TANDEM:-target/release/tandem}; B=${LLBIN:-$HOME/.cache/tandem-peers/llbuild/bin}
export LD_LIBRARY_PATH=$B TANDEM_LOG=warn
lscpu | grep -E "Model name|^CPU\(s\)"; uptime
for i in $(seq $N); do
  cat "$F" > /dev/null; echo "pair $i $(date +%T) load $(cut -d' ' -f1 /proc/loadavg) cached $(fincore -n -o RES "$F")"
  /usr/bin/time -f "llama wall %e s peak %M KB" $B/llama-bench -m "$F" -t 2 -p 0 -n 32 -r 1 --repack 0 2>&1 | grep -E "tg32|peak"
  cat "$F" > /dev/null
  /usr/bin/time -f "tandem wall %e s peak %M KB" $T bench decode --model "$F" --batch 1 --threads 2 > /tmp/rs-td.json 2>/tmp/rs-td.err
  python3 -c "import json;d=json.load(open('/tmp/rs-td.json'));print('tandem tok/s %.2f roofline %.3f measured %.1f GB/s' % (d['tokens_per_s'], d['roofline_fraction'], d['measured_bandwidth_gb_s']))"
  tail -1 /tmp/rs-td.err
done
uptime
