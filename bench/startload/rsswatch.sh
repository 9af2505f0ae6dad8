#!/bin/bash
# rsswatch.sh DATASET BINARY LABEL [startload flags...]: runs one first start of BINARY on a copy of
# the startload data set DATASET (default settle 200s) and samples the control plane's resident
# memory from /proc every 2 s while it runs, into rss-LABEL.samples (seconds since it started, RSS
# and anonymous RSS in kB); startload's own output goes to rss-LABEL.log. Run from the repository.
set -euo pipefail
dataset=$1 bin=$2 label=$3
shift 3
go build -o /tmp/startload-rsswatch ./bench/startload
/tmp/startload-rsswatch -dataset "$dataset" -binaries "$label=$bin" -runs 1 -settle 200s "$@" > "rss-$label.log" 2>&1 &
driver=$!
pid=""
while [ -z "$pid" ] && kill -0 $driver 2>/dev/null; do pid=$(pgrep -n -f "^$bin " || true); sleep 0.5; done
t0=$(date +%s)
: > "rss-$label.samples"
while [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; do
  echo "$(( $(date +%s) - t0 )) $(awk '/^VmRSS/{r=$2} /^RssAnon/{a=$2} END{print r, a}' /proc/$pid/status 2>/dev/null)" >> "rss-$label.samples"
  sleep 2
done
wait $driver
