#!/usr/bin/env bash
# Latency hiding over an emulated network (issue 4).
#
# Runs a real two-process deployment -- attention replica 0 and expert worker 0 as separate
# "hosts" in their own network namespaces -- with a link delay between them, and measures
# decode throughput for every (delay, micro-batches m) point with `tandem bench serve`.
#
#   tandem-a (attention, HTTP 10.77.0.1:18100) --veth-- tandem-r ("the wire") --veth-- tandem-e (expert, 10.77.1.2:18200)
#
# The delay is ONE-WAY per direction (RTT = 2 x delay). Every dispatch and every combine pays
# it once. Two ways to apply it, chosen automatically (--mode):
#   netem  tandem-r forwards IP; `tc qdisc ... netem delay Xms [rate R]` on both of its
#          egress devices (tr0 toward the replica, tr1 toward the worker).
#   proxy  used when the kernel has no sch_netem (CONFIG_NET_SCH_NETEM unset, as in some VMs):
#          tandem-r does NOT forward; a userspace TCP relay in tandem-r listens on
#          10.77.0.2:18200 and forwards to the worker, holding every chunk for X ms in each
#          direction (a pipe with latency, not a stop-and-wait). --rate uses tbf there.
#
# Needs root, iproute2 (ip, tc), python3 (results, and the relay in proxy mode), util-linux
# (taskset). Where something is missing it prints "skipped: <why>" and exits 0, so CI can call
# it anywhere. Output: one JSON document on stdout (progress goes to stderr); --out FILE also
# writes it there. Exit status 1 when a point failed (its row carries the error and log tails).
#
# Usage: bench/netns_latency.sh [--quick] [--model DIR] [--delays "0 1 5"] [--mbs "1 2 3 4"]
#          [--mode auto|netem|proxy] [--rate 1gbit] [--concurrency 16] [--prompts 16]
#          [--input-len 32] [--output-len 32] [--bin target/release/tandem] [--out FILE]
#          [--keep-logs DIR] [--nice N] [--repeat R]
#
# --nice N runs the deployment and the load generator at that niceness (e.g. -10 on a machine
# shared with compile jobs); --repeat R measures R runs per point on the same deployment and
# keeps the one with the highest output throughput (all runs are listed in the row).
set -u

skip() { echo "skipped: $*"; exit 0; }
die() { echo "netns_latency: $*" >&2; exit 1; }
log() { echo "[netns_latency $(date +%T)] $*" >&2; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DELAYS="0 1 5"
MBS="1 2 3 4"
MODE=auto
RATE=""
CONC=16
PROMPTS=16
IN_LEN=32
OUT_LEN=32
MODEL=""
BIN="${TANDEM_BIN:-$ROOT/target/release/tandem}"
OUT=""
KEEP_LOGS=""
QUICK=0
NICE=""
REPEAT=1
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1; DELAYS="0 5"; MBS="1 3"; PROMPTS=8; CONC=8; OUT_LEN=8; shift ;;
        --model) MODEL="$2"; shift 2 ;;
        --delays) DELAYS="$2"; shift 2 ;;
        --mbs) MBS="$2"; shift 2 ;;
        --mode) MODE="$2"; shift 2 ;;
        --rate) RATE="$2"; shift 2 ;;
        --concurrency) CONC="$2"; shift 2 ;;
        --prompts) PROMPTS="$2"; shift 2 ;;
        --input-len) IN_LEN="$2"; shift 2 ;;
        --output-len) OUT_LEN="$2"; shift 2 ;;
        --bin) BIN="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --keep-logs) KEEP_LOGS="$2"; shift 2 ;;
        --nice) NICE="$2"; shift 2 ;;
        --repeat) REPEAT="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed 's/^# \{0,1\}//;/^set -u/d'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

# ---------------------------------------------------------------------------------------
# Can we run here at all?
[ "$(id -u)" = 0 ] || skip "needs root (network namespaces, tc)"
command -v ip >/dev/null || skip "'ip' not found (apt-get install iproute2)"
command -v tc >/dev/null || skip "'tc' not found (apt-get install iproute2)"
command -v python3 >/dev/null || skip "python3 not found (used for the results and the delay relay)"
[ -x "$BIN" ] || skip "$BIN not built (cargo build --release -p tandem-cli)"
if [ -n "$MODEL" ]; then
    [ -f "$MODEL/config.json" ] || die "--model $MODEL has no config.json"
    MODEL=$(cd "$MODEL" && pwd)
fi
PRE=()
[ -n "$NICE" ] && PRE=(nice -n "$NICE")
PIN_A=(); PIN_E=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
    PIN_A=(taskset -c 0); PIN_E=(taskset -c 1)
else
    log "taskset missing or fewer than 2 cores: processes are not pinned"
fi

NS_A=tandem-a; NS_R=tandem-r; NS_E=tandem-e
probe_err=$(ip netns add tandem-probe 2>&1) || skip "cannot create a network namespace: $probe_err"
ip netns del tandem-probe

WORK=$(mktemp -d /tmp/tandem-netns.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]:-}"; do
        [ -n "$p" ] && kill -TERM "$p" 2>/dev/null
    done
    sleep 0.5
    for p in "${PIDS[@]:-}"; do
        [ -n "$p" ] && kill -KILL "$p" 2>/dev/null
    done
    for ns in $NS_A $NS_R $NS_E; do ip netns del "$ns" 2>/dev/null; done
    if [ -n "$KEEP_LOGS" ]; then mkdir -p "$KEEP_LOGS" && cp -r "$WORK"/. "$KEEP_LOGS"/; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------
# Topology
for ns in $NS_A $NS_R $NS_E; do ip netns del "$ns" 2>/dev/null; done
set -e
for ns in $NS_A $NS_R $NS_E; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip link add ta0 netns $NS_A type veth peer name tr0 netns $NS_R
ip link add te0 netns $NS_E type veth peer name tr1 netns $NS_R
ip -n $NS_A addr add 10.77.0.1/24 dev ta0
ip -n $NS_R addr add 10.77.0.2/24 dev tr0
ip -n $NS_R addr add 10.77.1.1/24 dev tr1
ip -n $NS_E addr add 10.77.1.2/24 dev te0
for d in "$NS_A ta0" "$NS_R tr0" "$NS_R tr1" "$NS_E te0"; do
    set -- $d; ip -n "$1" link set "$2" up
done
ip -n $NS_A route add 10.77.1.0/24 via 10.77.0.2
ip -n $NS_E route add 10.77.0.0/24 via 10.77.1.1
set +e

if [ "$MODE" = auto ]; then
    if err=$(ip netns exec $NS_R tc qdisc add dev tr0 root netem delay 1ms 2>&1); then
        MODE=netem
    else
        MODE=proxy
        NETEM_ERR="tc qdisc add ... netem: ${err}"
        log "netem unavailable ($err): using the userspace delay relay"
    fi
    ip netns exec $NS_R tc qdisc del dev tr0 root 2>/dev/null
fi
NETEM_ERR="${NETEM_ERR:-}"
case "$MODE" in
    netem)
        ip netns exec $NS_R sysctl -qw net.ipv4.ip_forward=1 || die "enabling forwarding"
        EXPERT_ADDR=10.77.1.2:18200 ;;
    proxy)
        ip netns exec $NS_R sysctl -qw net.ipv4.ip_forward=0 2>/dev/null
        EXPERT_ADDR=10.77.0.2:18200 ;;
    *) die "--mode must be auto, netem or proxy" ;;
esac
ATT_ADDR=10.77.0.1:18100

# The relay for proxy mode: per connection and direction, a reader thread stamps every chunk
# with arrival + delay and a writer thread sends it when that time comes, so several messages
# can be in flight on the "wire" at once.
cat >"$WORK/delay_relay.py" <<'EOF'
import socket, sys, threading, time, queue
listen, target, delay = sys.argv[1], sys.argv[2], float(sys.argv[3]) / 1000.0
def hp(s):
    h, p = s.rsplit(":", 1); return h, int(p)
def pump(src, dst):
    q = queue.Queue()
    def reader():
        try:
            while True:
                b = src.recv(1 << 20)
                q.put((time.monotonic() + delay, b))
                if not b: return
        except OSError:
            q.put((0.0, b""))
    def writer():
        try:
            while True:
                t, b = q.get()
                dt = t - time.monotonic()
                if dt > 0: time.sleep(dt)
                if not b:
                    dst.shutdown(socket.SHUT_WR); return
                dst.sendall(b)
        except OSError:
            pass
        finally:
            try: src.shutdown(socket.SHUT_RD)
            except OSError: pass
    for f in (reader, writer): threading.Thread(target=f, daemon=True).start()
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(hp(listen)); ls.listen(64)
print(f"relay {listen} -> {target}, {delay*1e3:.1f} ms each way", flush=True)
while True:
    c, _ = ls.accept()
    try:
        u = socket.create_connection(hp(target), timeout=5); u.settimeout(None)
    except OSError as e:
        print(f"relay: connect {target}: {e}", flush=True); c.close(); continue
    for s in (c, u): s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pump(c, u); pump(u, c)
EOF

set_link() { # $1 = delay in ms: shape the wire for netem mode, or the rate for proxy mode
    local dev
    for dev in tr0 tr1; do
        ip netns exec $NS_R tc qdisc del dev $dev root 2>/dev/null
        if [ "$MODE" = netem ]; then
            ip netns exec $NS_R tc qdisc add dev $dev root netem delay "${1}ms" limit 100000 \
                ${RATE:+rate $RATE} || die "tc netem on $dev failed"
        elif [ -n "$RATE" ]; then
            ip netns exec $NS_R tc qdisc add dev $dev root tbf rate "$RATE" burst 256kb latency 50ms \
                || die "tc tbf on $dev failed"
        fi
    done
}

stop_pids() { # in the order given (replica first, so that it leaves the membership cleanly)
    local p
    for p in "$@"; do
        kill -TERM "$p" 2>/dev/null
        for _ in $(seq 1 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
        kill -KILL "$p" 2>/dev/null; wait "$p" 2>/dev/null
    done
    PIDS=()
}

MODEL_ARGS=()
[ -n "$MODEL" ] && MODEL_ARGS=(--model "$MODEL")

# One (delay, m) point. Writes $WORK/point-D-M.json (bench result) or .err (why it failed).
run_point() {
    local d=$1 m=$2 tag="d$1-m$2" dep="$WORK/dep-d$1-m$2.toml"
    cat >"$dep" <<EOF
attention_replicas = 1
expert_workers = 1
micro_batches = $m
max_num_seqs = 32
threads_per_worker = 1
pin_cores = false
[addresses]
attention = ["$ATT_ADDR"]
expert = ["$EXPERT_ADDR"]
EOF
    set_link "$d"
    local relay="" expert att
    if [ "$MODE" = proxy ]; then
        ip netns exec $NS_R "${PRE[@]}" python3 -u "$WORK/delay_relay.py" "$EXPERT_ADDR" 10.77.1.2:18200 "$d" \
            >"$WORK/$tag-relay.log" 2>&1 &
        relay=$!
    fi
    ip netns exec $NS_E "${PRE[@]}" "${PIN_E[@]}" "$BIN" serve --deployment "$dep" --role expert --rank 0 \
        --host 10.77.1.2 --port 18200 "${MODEL_ARGS[@]}" >"$WORK/$tag-expert.log" 2>&1 &
    expert=$!
    PIDS=($relay $expert)
    # Start the replica once the worker listens (the first run also writes the demo model).
    for _ in $(seq 1 600); do
        grep -q "listening on" "$WORK/$tag-expert.log" 2>/dev/null && break
        kill -0 $expert 2>/dev/null || break
        sleep 0.2
    done
    ip netns exec $NS_A "${PRE[@]}" "${PIN_A[@]}" "$BIN" serve --deployment "$dep" --role attention --rank 0 \
        "${MODEL_ARGS[@]}" >"$WORK/$tag-attention.log" 2>&1 &
    att=$!
    PIDS=($relay $expert $att)
    local ok=0
    for _ in $(seq 1 180); do
        if ip netns exec $NS_A "$BIN" status "$dep" --timeout-s 3 >"$WORK/$tag-status.json" 2>/dev/null; then
            ok=1; break
        fi
        kill -0 $expert 2>/dev/null && kill -0 $att 2>/dev/null || break
        sleep 1
    done
    if [ $ok = 0 ]; then
        { echo "not healthy after start"; tail -n 20 "$WORK/$tag-expert.log" "$WORK/$tag-attention.log" "$WORK/$tag-status.json"; } \
            >"$WORK/point-$tag.err" 2>&1
        stop_pids $att $expert $relay
        return
    fi
    # A short warm-up (page faults, first allocations), then the measured run.
    local bench=(ip netns exec $NS_A "${PRE[@]}" "$BIN" bench serve --host 10.77.0.1 --port 18100
        --random-input-len "$IN_LEN" --random-output-len "$OUT_LEN" --ignore-eos --disable-tqdm
        --seed 1 --request-timeout 300)
    # Long commands run in the background so that a signal reaches the trap at once.
    timeout 300 "${bench[@]}" --num-prompts 2 --max-concurrency 2 --random-output-len 4 \
        >"$WORK/$tag-warmup.log" 2>&1 &
    PIDS=($relay $expert $att $!); wait $!
    local load0 r rc=0
    load0=$(cut -d' ' -f1 /proc/loadavg)
    for r in $(seq 1 "$REPEAT"); do
        timeout 600 "${bench[@]}" --num-prompts "$PROMPTS" --max-concurrency "$CONC" \
            --result-filename "$WORK/bench-$tag-r$r.json" >"$WORK/$tag-bench-r$r.log" 2>&1 &
        PIDS=($relay $expert $att $!); wait $! || { rc=$?; break; }
    done
    PIDS=($relay $expert $att)
    if [ $rc = 0 ]; then
        python3 - "$WORK/point-$tag.json" "$d" "$m" "$load0" "$WORK"/bench-$tag-r*.json <<'EOF'
import json, sys
runs = [json.load(open(f)) for f in sys.argv[5:]]
r = max(runs, key=lambda x: x.get("output_throughput") or 0)
out = {"delay_ms": float(sys.argv[2]), "m": int(sys.argv[3]),
       "completed": r.get("completed"), "failed": r.get("failed"),
       "duration_s": r.get("duration"),
       "output_tok_s": r.get("output_throughput"),
       "mean_tpot_ms": r.get("mean_tpot_ms"), "median_itl_ms": r.get("median_itl_ms"),
       "mean_ttft_ms": r.get("mean_ttft_ms"),
       "loadavg_1m_before": float(sys.argv[4])}
if len(runs) > 1:
    out["runs_output_tok_s"] = [round(x.get("output_throughput") or 0, 2) for x in runs]
    out["runs_mean_tpot_ms"] = [round(x.get("mean_tpot_ms") or 0, 1) for x in runs]
tp = out["mean_tpot_ms"]
out["decode_tok_s_from_tpot"] = (None if not tp else round(
    min(r.get("max_concurrency") or 1, r.get("num_prompts") or 1) * 1000.0 / tp, 2))
errs = [e for e in r.get("errors", []) if e]
if errs: out["errors"] = errs[:3]
json.dump(out, open(sys.argv[1], "w"))
EOF
    else
        { echo "bench serve failed (rc $rc)"; tail -n 30 "$WORK"/$tag-bench-r*.log;
          tail -n 20 "$WORK/$tag-attention.log" "$WORK/$tag-expert.log"; } >"$WORK/point-$tag.err" 2>&1
    fi
    # Engine-side counters before stopping (busy fractions of the workers, if exported).
    ip netns exec $NS_A curl -s --max-time 5 "http://$ATT_ADDR/metrics" >"$WORK/$tag-metrics.txt" 2>/dev/null
    stop_pids $att $expert $relay
}

log "mode=$MODE delays=[$DELAYS] m=[$MBS] concurrency=$CONC prompts=$PROMPTS in=$IN_LEN out=$OUT_LEN rate=${RATE:-unlimited}"
for d in $DELAYS; do
    for m in $MBS; do
        log "delay ${d} ms, m=$m"
        run_point "$d" "$m"
        if [ -f "$WORK/point-d$d-m$m.json" ]; then
            log "  $(cat "$WORK/point-d$d-m$m.json")"
        else
            log "  FAILED: $(head -n 1 "$WORK/point-d$d-m$m.err" 2>/dev/null)"
        fi
    done
done

# ---------------------------------------------------------------------------------------
# One JSON document.
NL_NICE="$NICE" NL_REPEAT="$REPEAT" NL_COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null) \
python3 - "$WORK" "$MODE" "$NETEM_ERR" "$RATE" "$CONC" "$PROMPTS" "$IN_LEN" "$OUT_LEN" \
    "${MODEL:-demo (embedded)}" "$QUICK" "$DELAYS" "$MBS" "${#PIN_A[@]}" >"$WORK/result.json" <<'EOF'
import json, os, platform, sys, glob, re
(work, mode, netem_err, rate, conc, prompts, inl, outl, model, quick, delays, mbs,
 pinned) = sys.argv[1:]
cpu = ""
try:
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except Exception:
    pass
rows = []
for d in delays.split():
    for m in mbs.split():
        tag = f"d{d}-m{m}"
        p = os.path.join(work, f"point-{tag}.json")
        if os.path.exists(p):
            row = json.load(open(p))
        else:
            e = os.path.join(work, f"point-{tag}.err")
            row = {"delay_ms": float(d), "m": int(m), "error":
                   open(e).read()[-2000:] if os.path.exists(e) else "no result"}
        mt = os.path.join(work, f"{tag}-metrics.txt")
        if os.path.exists(mt):
            busy = {}
            for line in open(mt):
                if line.startswith("tandem_worker_busy_fraction"):
                    k, v = line.rsplit(" ", 1)
                    busy[k[len("tandem_worker_busy_fraction"):]] = float(v)
            if busy:
                row["worker_busy_fraction"] = busy
        rows.append(row)
for r in rows:
    base = next((x for x in rows if x["delay_ms"] == r["delay_ms"] and x["m"] == 1
                 and x.get("output_tok_s")), None)
    if base and r.get("output_tok_s"):
        r["ratio_to_m1"] = round(r["output_tok_s"] / base["output_tok_s"], 3)
    if r.get("output_tok_s"):
        r["output_tok_s"] = round(r["output_tok_s"], 2)
doc = {
    "machine": {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
                "loadavg": open("/proc/loadavg").read().split()[:3]},
    "settings": {
        "mode": mode,
        "mode_note": ("tc netem on both egress devices of the router namespace" if mode == "netem"
                      else "userspace TCP relay in the router namespace (no sch_netem: "
                           + netem_err.strip() + ")"),
        "delay": "one-way per direction; RTT = 2 x delay_ms",
        "rate": rate or "unlimited", "quick": quick == "1",
        "nice": os.environ.get("NL_NICE") or None, "repeat": int(os.environ.get("NL_REPEAT") or 1),
        "model": model, "tandem_commit": os.environ.get("NL_COMMIT") or None,
        "attention_replicas": 1, "expert_workers": 1, "threads_per_worker": 1,
        "pinning": "attention: taskset -c 0, expert: taskset -c 1" if pinned != "0" else "none",
        "workload": {"max_concurrency": int(conc), "num_prompts": int(prompts),
                     "input_len": int(inl), "output_len": int(outl), "ignore_eos": True},
        "max_num_seqs": 32,
    },
    "rows": rows,
}
print(json.dumps(doc, indent=2))
EOF
cat "$WORK/result.json"
[ -n "$OUT" ] && cp "$WORK/result.json" "$OUT"
# Every point is attempted; the exit status says whether one failed (rows carry the errors).
if ls "$WORK"/point-*.err >/dev/null 2>&1; then
    log "some points failed (see the rows' \"error\")"
    exit 1
fi
exit 0
