#!/bin/sh
# cron's part, for the lab (which has no cron in its nodes): run JOB at the start of every
# PERIOD seconds of the wall clock, as cron runs a `* * * * *` job at the start of each minute
# (so both nodes, on one clock, run it in the same second), its output appended to LOG.
# Usage: cron.sh PERIOD JOB LOG
PERIOD=$1
JOB=$2
LOG=$3
n=0
while [ "$n" -lt 100000 ]; do  # bounded: 100000 periods
    now=$(date +%s)
    sleep $((PERIOD - now % PERIOD))
    "$JOB" >> "$LOG" 2>&1
    n=$((n + 1))
done
