#!/usr/bin/env bash
# One bulk compute->tenant stream (a framebuffer flood) three ways on loopback:
# direct, through consolegate's WebSocket front end (plain HTTP, binary
# frames) and through its CONNECT front end. Prints one JSON line each.
#   cargo build --release -p consolegate -p consolegate-bench
#   bench/scripts/bulk.sh            # B=bytes (default 2 GiB)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
L=$root/target/release/loadgen
C=$root/target/release/consolegate
B=${B:-2147483648}
D=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$D"; }
trap cleanup EXIT

flood() {
    : > "$D/flood.out"
    "$L" flood-server --listen 127.0.0.1:0 --bytes "$B" --clients 1 > "$D/flood.out" &
    FP=$!; pids+=("$FP")
    for _ in $(seq 100); do grep -q listening "$D/flood.out" && break; sleep 0.05; done
    ADDR=$(sed -n 's/.*"addr":"\([^"]*\)".*/\1/p' "$D/flood.out" | head -1)
}

flood
echo "direct  $("$L" raw --target "$ADDR" --bytes "$B")"
wait "$FP"

flood
printf '[[token]]\ntoken = "benchtok"\nkind = "serial"\ntarget = "%s"\n' "$ADDR" > "$D/t.toml"
"$C" serve --ws-listen 127.0.0.1:0 --connect-listen 127.0.0.1:0 --plain-http \
    --token-file "$D/t.toml" --ready-file "$D/ready" 2> "$D/proxy.log" &
PROXY=$!; pids+=("$PROXY")
for _ in $(seq 100); do [ -f "$D/ready" ] && break; sleep 0.05; done
WS=$(sed -n 's/.*"websocket":\["\([^"]*\)".*/\1/p' "$D/ready")
CN=$(sed -n 's/.*"connect":\["\([^"]*\)".*/\1/p' "$D/ready")
echo "ws      $("$L" ws --proxy "$WS" --path "/websockify?token=benchtok" --bytes "$B")"
wait "$FP"

flood
printf '[[token]]\ntoken = "benchtok"\nkind = "serial"\ntarget = "%s"\n' "$ADDR" > "$D/t.toml"
kill -HUP "$PROXY"
sleep 0.5
echo "connect $("$L" raw --target "$ADDR" --via "$CN" --token benchtok --bytes "$B")"
wait "$FP"
