#!/bin/sh
# The seed's cron job, what lbwatch replaces: run by cron every minute on each LB node,
#
#     * * * * * root /etc/keepalived/check_lb.sh >> /var/log/check_lb.log 2>&1
#
# - haproxy not running: stop keepalived, so that the VIP floats to the peer;
# - haproxy restarted since the last run (a new master PID): restart keepalived, so that the
#   node rejoins (and takes its VIP back, with preemption);
# - keepalived not running: start it.
# The checks are `killall -0 NAME` (any process of that name, a stopped one too). `pidof` would
# do as well here: it is only under keepalived's vrrp_script that Debian's pidof, resolved to
# killall5, fails. keepalived is stopped through its pidfile, as `systemctl stop` would.
#
# The operator's switch: with $MAINTENANCE present the job does nothing. Without it, this job
# would start keepalived again within a minute of an operator's `systemctl stop keepalived`
# (a drain, the classic way).

KEEPALIVED_PID=/run/keepalived.pid
HAPROXY_PID=/run/haproxy.pid
LAST=/run/check_lb.haproxy-master
MAINTENANCE=/etc/keepalived/maintenance

log() { echo "$(date +%s.%N) check_lb: $*"; }

stop_keepalived() {
    pid=$(cat "$KEEPALIVED_PID" 2>/dev/null) || return 0
    kill "$pid" 2>/dev/null || return 0
    i=0
    while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 100 ]; do  # 10 s at most
        sleep 0.1
        i=$((i + 1))
    done
}

start_keepalived() {
    keepalived -f /etc/keepalived/keepalived.conf || log "keepalived did not start"
}

[ -e "$MAINTENANCE" ] && exit 0

if ! killall -0 haproxy 2>/dev/null; then
    if killall -0 keepalived 2>/dev/null; then
        log "haproxy not running: stopping keepalived"
        stop_keepalived
    fi
    exit 0
fi

master=$(cat "$HAPROXY_PID" 2>/dev/null)
last=$(cat "$LAST" 2>/dev/null)
echo "$master" > "$LAST"
if [ -n "$last" ] && [ "$master" != "$last" ]; then
    log "haproxy restarted (master $last -> $master): restarting keepalived"
    stop_keepalived
    start_keepalived
    exit 0
fi

if ! killall -0 keepalived 2>/dev/null; then
    log "keepalived not running: starting it"
    start_keepalived
fi
exit 0
