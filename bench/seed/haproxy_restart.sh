#!/bin/sh
# Not one of the seed's scripts: the lab's stand-in for systemd's hold on haproxy.service in
# the seed's world (Debian's unit: Restart=always, RestartSec 100 ms by default, and the start
# limit: 5 starts within 10 s and the unit is failed, restarted no more until someone starts
# haproxy again). In the soak's lbwatch runs lbwatch restarts haproxy itself.
# Usage: haproxy_restart.sh LOG START-COMMAND...
LOG=$1
shift
PIDFILE=/run/haproxy.pid
log() { echo "$(date +%s.%N) haproxy.service: $*" >> "$LOG"; }

starts=""
failed=0
n=0
while [ "$n" -lt 10000000 ]; do  # bounded: about 12 days of 100 ms polls
    n=$((n + 1))
    pid=$(cat "$PIDFILE" 2>/dev/null)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        [ "$failed" = 1 ] && log "started by someone else: supervised again"
        failed=0
        sleep 0.1
        continue
    fi
    if [ "$failed" = 1 ]; then
        sleep 0.1
        continue
    fi
    sleep 0.1  # RestartSec
    now=$(date +%s)
    recent=""
    count=0
    for t in $starts; do
        if [ $((now - t)) -lt 10 ]; then
            recent="$recent $t"
            count=$((count + 1))
        fi
    done
    if [ "$count" -ge 5 ]; then
        log "start request repeated too quickly: failed"
        failed=1
        starts=""
        continue
    fi
    starts="$recent $now"
    log "haproxy master ${pid:-?} gone: restarting"
    "$@" >> "$LOG" 2>&1 || log "start failed"
done
