#!/usr/bin/env bash
# The whole product on one machine, from a fresh clone:
#   1. install what is missing (Mosquitto, PyTorch 2.13.0 CPU, this package),
#   2. train (or reuse) the small demo Code Llama and export it to an int4 bundle
#      for the profile that fits this machine,
#   3. start a local Mosquitto and the daemon, send one completion, one infill and
#      one chat request over MQTT and print the streamed answers,
#   4. stop both.
set -euo pipefail
cd "$(dirname "$0")/.."

# the Python it installed into (a .venv where the system's refuses pip): every command below runs
# as `$PY -m edge_runtime`, so a console script outside PATH (~/.local/bin) does not matter
PY=$(bash scripts/install-deps.sh | tee /dev/stderr | sed -n 's/^installed into //p' | tail -1)
[ -n "$PY" ] || { echo "scripts/install-deps.sh did not say where it installed" >&2; exit 1; }
EDGE=("$PY" -m edge_runtime)

echo "== demo model (trained once, about 8 min on 2 cores, then cached)"
CHECKPOINT=$("${EDGE[@]}" demo-model)
echo "checkpoint: $CHECKPOINT"

PROFILE=$("${EDGE[@]}" profiles --detect | cut -d: -f1)
BUNDLE=bundles/demo-$PROFILE-int4
if ! "${EDGE[@]}" verify --bundle "$BUNDLE" --quiet >/dev/null 2>&1; then
    echo "== export for profile $PROFILE"
    "${EDGE[@]}" export --checkpoint "$CHECKPOINT" --profile "$PROFILE" --precision int4 --output "$BUNDLE" --force
fi

WORK=$(mktemp -d)
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location %s/\nuser %s\n' \
    "$PORT" "$WORK" "$(id -un)" > "$WORK/mosquitto.conf"
"$MOSQUITTO" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
BROKER_PID=$!
"${EDGE[@]}" --log-level INFO serve --bundle "$BUNDLE" --broker "mqtt://127.0.0.1:$PORT" --device-id demo \
    --state-dir "$WORK/state" >"$WORK/daemon.log" 2>&1 &
DAEMON_PID=$!
# the broker writes its persistence file (mosquitto.db) as it exits: wait for it before removing the folder
cleanup() {
    kill -TERM "$DAEMON_PID" 2>/dev/null; wait "$DAEMON_PID" 2>/dev/null || true
    kill "$BROKER_PID" 2>/dev/null; wait "$BROKER_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "== daemon starting (broker mqtt://127.0.0.1:$PORT, device id 'demo')"
for _ in $(seq 120); do
    if mosquitto_sub -h 127.0.0.1 -p "$PORT" -t edge/demo/v1/status -C 1 -W 1 2>/dev/null | grep -q '"online"'; then break; fi
    kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$WORK/daemon.log"; exit 1; }
done
ASK=("${EDGE[@]}" ask --broker "mqtt://127.0.0.1:$PORT" --device-id demo --max-tokens 48 --temperature 0)

echo; echo "== completion: 'def fibonacci(n):'"
"${ASK[@]}" --prompt $'def fibonacci(n):\n    '
echo; echo "== infill: 'def add(a, b):\\n    return <FILL>\\n'"
"${ASK[@]}" --prefix $'def add(a, b):\n    return ' --suffix $'\n'
echo; echo "== chat: 'Write a function that reverses a string.'"
echo '[{"role": "user", "content": "Write a function that reverses a string."}]' > "$WORK/messages.json"
"${ASK[@]}" --messages "$WORK/messages.json"
echo; echo "== done: the daemon log was $(wc -l <"$WORK/daemon.log") lines; bundle in $BUNDLE"
