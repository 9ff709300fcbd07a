#!/bin/sh
# haproxy's start in the lab, as lbwatch and an operator's restart run it (netlab.HAPROXY_START,
# under flock): like `systemctl start haproxy`, it starts nothing while a haproxy runs, and it
# returns only once the new master is up. `haproxy -W -D` alone returns before its master has
# written the pidfile (about one start in four here), so a second start right after it would
# find no haproxy and start another master beside it (SO_REUSEPORT lets both bind).
start-stop-daemon --start --quiet --oknodo --pidfile /run/haproxy.pid --exec /usr/sbin/haproxy \
    -- -W -D -f /etc/haproxy/haproxy.cfg -p /run/haproxy.pid || exit
i=0
while [ "$i" -lt 250 ]; do  # 5 s at most
    pid=$(cat /run/haproxy.pid 2>/dev/null)
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && exit 0
    sleep 0.02
    i=$((i + 1))
done
echo "haproxy started but /run/haproxy.pid names no live process" >&2
exit 1
