#!/bin/sh
# rotate.sh: keep the last N copies of a log file.

set -eu

LOG=${1:-/var/log/app.log}
KEEP=${KEEP:-5}

if [ ! -f "$LOG" ]; then
    echo "no such file: $LOG" >&2
    exit 1
fi

i=$KEEP
while [ "$i" -gt 1 ]; do
    prev=$((i - 1))
    [ -f "$LOG.$prev.gz" ] && mv -f "$LOG.$prev.gz" "$LOG.$i.gz"
    i=$prev
done

gzip -c "$LOG" > "$LOG.1.gz" && : > "$LOG"

for f in "$LOG".*.gz; do
    size=$(wc -c < "$f")
    printf '%-30s %10d\n' "$f" "$size"
done | sort -k2 -n | awk '{ total += $2 } END { print "total", total }'

cat <<END
rotated $LOG, kept $KEEP copies at $(date -u +%Y-%m-%dT%H:%M:%SZ)
END
