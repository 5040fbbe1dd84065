#!/bin/sh
# Restart the miner when it has been down for several checks in a row. Run it every minute (cron, or
# scripts/storynet-miner-watchdog.timer):
#   scripts/watchdog.sh CONFIG RESTART-COMMAND...
#   scripts/watchdog.sh /opt/storynet-miner/config.yaml systemctl restart storynet-miner
#   scripts/watchdog.sh /home/miner/storynet-miner/config.yaml pm2 restart storynet-miner
# `health --running` asks only the running miner (GET /health): exit 0 healthy, 1 degraded (serving on a
# fallback: worth an alert, not a restart), 2 down or not answering. A miner still loading its model does
# not answer yet, so one miss is not enough: WATCHDOG_MISSES (default 3) in a row are.
set -u
[ $# -ge 2 ] || { echo "usage: $0 CONFIG RESTART-COMMAND..." >&2; exit 64; }
config=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")  # absolute: the check runs from the repository root
shift
root=$(cd "$(dirname "$0")/.." && pwd)
misses_allowed=${WATCHDOG_MISSES:-3}
state=${WATCHDOG_STATE:-${TMPDIR:-/tmp}/storynet-miner-watchdog.misses}

report=$(cd "$root" && .venv/bin/python -m miner health --running --config "$config" 2>&1)
if [ $? -ne 2 ]; then
    rm -f "$state"
    exit 0
fi
misses=$(( $(cat "$state" 2>/dev/null || echo 0) + 1 ))
if [ "$misses" -lt "$misses_allowed" ]; then
    echo "$misses" > "$state"
    exit 0
fi
rm -f "$state"
printf 'storynet miner down for %s checks in a row; restarting with: %s\n%s\n' "$misses" "$*" "$report" >&2
exec "$@"
