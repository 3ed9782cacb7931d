#!/usr/bin/env bash
# CONNECT (and WebSocket) bulk throughput per data path: one 2 GiB
# compute->tenant stream through consolegate with --datapath copy,
# splice, uring and sockmap (DATAPATHS; uring and sockmap apply to CONNECT
# only, so they are skipped for the ws front), RUNS times each,
# interleaved; DATAPATHS may include "direct" (the client reads the flood
# server itself: the loopback ceiling, no proxy). Prints one line per run:
# MB/s, the proxy's own CPU-seconds per GB (/proc/<pid>/stat utime+stime)
# and the whole system's busy CPU-seconds per GB (/proc/stat, every
# process and kernel worker; noisy on a shared machine).
#   cargo build --release -p consolegate -p consolegate-bench
#   bench/scripts/datapath.sh           # B=bytes (2 GiB) RUNS=3 FRONTS="connect ws"
#                                       # DATAPATHS="copy splice uring sockmap"
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
L=$root/target/release/loadgen
C=$root/target/release/consolegate
B=${B:-2147483648}
RUNS=${RUNS:-3}
FRONTS=${FRONTS:-connect ws}
DATAPATHS=${DATAPATHS:-copy splice uring sockmap}
TCK=$(getconf CLK_TCK)
D=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$D"; }
trap cleanup EXIT

busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }
proc_cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }

flood() {
    : > "$D/flood.out"
    "$L" flood-server --listen 127.0.0.1:0 --bytes "$B" --clients 1 > "$D/flood.out" &
    FP=$!; pids+=("$FP")
    for _ in $(seq 100); do grep -q listening "$D/flood.out" && break; sleep 0.05; done
    ADDR=$(sed -n 's/.*"addr":"\([^"]*\)".*/\1/p' "$D/flood.out" | head -1)
}

proxy() { # $1 = datapath
    printf '[[token]]\ntoken = "benchtok"\nkind = "serial"\ntarget = "%s"\n' "$ADDR" > "$D/t.toml"
    rm -f "$D/ready"
    "$C" serve --ws-listen 127.0.0.1:0 --connect-listen 127.0.0.1:0 --plain-http \
        --datapath "$1" --token-file "$D/t.toml" --ready-file "$D/ready" 2> "$D/proxy.log" &
    PROXY=$!; pids+=("$PROXY")
    for _ in $(seq 100); do [ -f "$D/ready" ] && break; sleep 0.05; done
    WS=$(sed -n 's/.*"websocket":\["\([^"]*\)".*/\1/p' "$D/ready")
    CN=$(sed -n 's/.*"connect":\["\([^"]*\)".*/\1/p' "$D/ready")
}

for run in $(seq "$RUNS"); do
    for front in $FRONTS; do
        for dp in $DATAPATHS; do
            [ "$front" = ws ] && { [ "$dp" = uring ] || [ "$dp" = sockmap ] || [ "$dp" = direct ]; } && continue
            flood
            if [ "$dp" = direct ]; then
                s0=$(busy)
                out=$("$L" raw --target "$ADDR" --bytes "$B")
                s1=$(busy)
                wait "$FP" || true
                mbs=$(sed -n 's/.*"mb_per_s":\([0-9.]*\).*/\1/p' <<< "$out")
                awk -v r="$run" -v m="$mbs" -v gb="$(awk -v b="$B" 'BEGIN{print b/1e9}')" \
                    -v sc=$((s1 - s0)) -v t="$TCK" \
                    'BEGIN{printf "run=%s front=raw     datapath=direct  (no proxy) MB/s=%8.0f proxy_cpu_s_per_GB=-     system_cpu_s_per_GB=%.3f\n", r, m, sc/t/gb}'
                continue
            fi
            proxy "$dp"
            s0=$(busy); p0=$(proc_cpu "$PROXY")
            if [ "$front" = connect ]; then
                out=$("$L" raw --target "$ADDR" --via "$CN" --token benchtok --bytes "$B")
            else
                out=$("$L" ws --proxy "$WS" --path "/websockify?token=benchtok" --bytes "$B")
            fi
            s1=$(busy); p1=$(proc_cpu "$PROXY")
            wait "$FP" || true
            used=$(grep -o 'datapath="[a-z]*"' "$D/proxy.log" | tail -1)
            kill "$PROXY"; wait "$PROXY" 2>/dev/null || true
            mbs=$(sed -n 's/.*"mb_per_s":\([0-9.]*\).*/\1/p' <<< "$out")
            gb=$(awk -v b="$B" 'BEGIN{print b/1e9}')
            awk -v r="$run" -v f="$front" -v d="$dp" -v u="$used" -v m="$mbs" -v gb="$gb" \
                -v pc=$((p1 - p0)) -v sc=$((s1 - s0)) -v t="$TCK" \
                'BEGIN{printf "run=%s front=%-7s datapath=%-7s (%s) MB/s=%8.0f proxy_cpu_s_per_GB=%.3f system_cpu_s_per_GB=%.3f\n", r, f, d, u, m, pc/t/gb, sc/t/gb}'
        done
    done
done
