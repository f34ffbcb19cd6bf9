#!/bin/sh
# The install test, inside a Debian guest booted with systemd as PID 1 (run by
# packaging/vm-install-test over SSH). Arguments: the apt repository URL on the host.
# Every step prints "STEP <name>" first and "PASS <name> ..." when it holds; the first
# failing check stops the script with "FAIL <name>: <why>" and a non-zero exit.
set -eu
REPO_URL=$1
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
T0=$(date +%s)
step() { STEP=$1; echo "STEP $1 (+$(( $(date +%s) - T0 )) s)"; }
pass() { echo "PASS $STEP${1:+: $1}"; }
fail() { echo "FAIL $STEP: $*"; journalctl -u ipvslb --no-pager -n 40 2>/dev/null || true; exit 1; }
status_json() { ipvslb status --json; }
# A backend's field from `ipvslb status --json`: field <endpoint> <key>
field() {
  status_json | python3 -c '
import json, sys
doc = json.load(sys.stdin)
for svc in doc["services"]:
    for b in svc["backends"]:
        if b["endpoint"] == sys.argv[1]:
            print(b[sys.argv[2]])' "$1" "$2"
}

step kernel
release=$(uname -r)
[ -e "/lib/modules/$release/build" ] || fail "no headers for $release in the guest root"
pass "$release, headers at $(readlink -f /lib/modules/$release/build)"

step guest-quirks
# Test-bed settings, not needed on real hosts. The guest's root is a host directory exported
# over 9p, and virtme-ng overlays /tmp: apt's helpers, which run as _apt, cannot create
# files there.
echo 'APT::Sandbox::User "root";' > /etc/apt/apt.conf.d/00pkgtest-9p
# Every file operation on that export is a round trip to the host; dpkg's fsyncs add to it.
echo force-unsafe-io > /etc/dpkg/dpkg.cfg.d/00pkgtest-unsafe-io
# The Debian indexes and the .debs of ipvslb's dependencies were downloaded by the host
# when it built this root (packaging/vm-install-test); virtme-ng hides /var/cache and
# /var/lib/apt behind fresh tmpfs mounts, so they wait in /opt/pkgtest. apt still updates
# the indexes from deb.debian.org and verifies every cached .deb against them.
if [ -d /opt/pkgtest ]; then
  mkdir -p /var/cache/apt/archives/partial /var/lib/apt/lists/partial
  cp /opt/pkgtest/archives/*.deb /var/cache/apt/archives/
  cp /opt/pkgtest/lists/*_* /var/lib/apt/lists/
  echo "$(ls /var/cache/apt/archives/*.deb | wc -l) .debs, $(ls /var/lib/apt/lists/*_* | wc -l) index files from the host"
fi
pass

step add-repository
mkdir -p /etc/apt/keyrings
python3 -c 'import sys, urllib.request; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1]).read())' \
  "$REPO_URL/ipvslb-archive-keyring.gpg" > /etc/apt/keyrings/ipvslb.gpg
echo "deb [signed-by=/etc/apt/keyrings/ipvslb.gpg] $REPO_URL stable main" > /etc/apt/sources.list.d/ipvslb.list
apt-get update -q 2>&1 | tee /tmp/apt-update.log
grep -q "^Get:.*$REPO_URL stable InRelease" /tmp/apt-update.log || fail "InRelease not fetched"
if grep -qi "NO_PUBKEY\|not signed\|is not signed\|BADSIG" /tmp/apt-update.log; then fail "signature problem"; fi
apt-cache policy ipvslb | grep -q "$REPO_URL" || fail "ipvslb not offered by $REPO_URL"
pass "InRelease verified with the signed-by key"

step apt-install
started=$(date +%s)
apt-get install -y -q ipvslb > /tmp/apt-install.log 2>&1 || { tail -30 /tmp/apt-install.log; fail "apt-get install ipvslb"; }
for p in python3-bpfcc python3-pyroute2 python3-yaml python3-prometheus-client python3-systemd ipvsadm; do
  dpkg-query -W -f='${Status}' "$p" | grep -q "ok installed" || fail "$p was not installed"
done
grep -q "^Setting up ipvslb " /tmp/apt-install.log || fail "ipvslb not set up"
# The headers are there: postinst must not ask for them.
if grep -q "headers of the running kernel" /tmp/apt-install.log; then fail "postinst asks for headers that are installed"; fi
pass "$(grep -c '^Setting up' /tmp/apt-install.log) packages set up in $(( $(date +%s) - started )) s"

step service-started
# postinst starts the service and waits for READY=1 (the tracer compiles first).
systemctl is-enabled -q ipvslb || fail "not enabled"
systemctl is-active -q ipvslb || fail "not active: $(systemctl show -p ActiveState,SubState,Result ipvslb | tr '\n' ' ')"
[ "$(systemctl show -p Type --value ipvslb)" = notify ] || fail "not Type=notify"
journalctl -u ipvslb --no-pager | grep "tracer compiled" | tail -1
# The unit's bounds hold and the running daemon is within them.
[ "$(systemctl show -p MemoryMax --value ipvslb)" = 1073741824 ] || fail "MemoryMax is not 1G"
[ "$(systemctl show -p TasksMax --value ipvslb)" = 64 ] || fail "TasksMax is not 64"
usage="memory $(systemctl show -p MemoryCurrent --value ipvslb) B, tasks $(systemctl show -p TasksCurrent --value ipvslb)"
pass "$(systemctl show -p MainPID --value ipvslb); $usage"

step status
ipvslb status || fail "ipvslb status"
attribution=$(status_json | python3 -c 'import json,sys; print(json.load(sys.stdin)["attribution"])')
[ "$attribution" = kprobe ] || fail "attribution is $attribution under the hardened unit, expected kprobe"
# The unit grants CAP_SYS_NICE and its system call filter lets setpriority through.
nice=$(python3 -c 'import os, sys; print(os.getpriority(os.PRIO_PROCESS, int(sys.argv[1])))' \
  "$(systemctl show -p MainPID --value ipvslb)")
[ "$nice" = -10 ] || fail "daemon runs at nice $nice, expected -10 (settings.nice): $(journalctl -u ipvslb --no-pager | grep nice)"
pass "attribution $attribution, nice $nice"

step security
systemd-analyze security --no-pager ipvslb.service > /tmp/security.txt 2>&1 || true
exposure=$(sed -n 's/.*Overall exposure level for ipvslb.service: \([0-9.]*\).*/\1/p' /tmp/security.txt)
[ -n "$exposure" ] || { cat /tmp/security.txt; fail "no exposure level"; }
python3 -c "import sys; sys.exit(0 if float('$exposure') <= 3.0 else 1)" || fail "exposure $exposure > 3.0"
pass "exposure $exposure"

step backends
# Three backends, each in its own network namespace behind a veth pair, serving HTTP on
# 8080.
echo 1 > /proc/sys/net/ipv4/ip_forward
for i in 1 2 3; do
  ip netns add "be$i"
  ip link add "vbe$i" type veth peer name eth0 netns "be$i"
  ip addr add "10.77.$i.1/24" dev "vbe$i"
  ip link set "vbe$i" up
  ip netns exec "be$i" ip link set lo up
  ip netns exec "be$i" ip addr add "10.77.$i.2/24" dev eth0
  ip netns exec "be$i" ip link set eth0 up
  ip netns exec "be$i" ip route add default via "10.77.$i.1"
  mkdir -p "/tmp/www$i" && echo "be$i" > "/tmp/www$i/index.html"
  ip netns exec "be$i" python3 -m http.server 8080 --bind "10.77.$i.2" --directory "/tmp/www$i" \
    > "/tmp/be$i.log" 2>&1 &
  echo $! > "/tmp/be$i.pid"
done
for i in 1 2 3; do
  for _ in $(seq 100); do
    python3 -c "import socket; socket.create_connection(('10.77.$i.2', 8080), 1).close()" 2>/dev/null && break
    sleep 0.2
  done
done
pass

step reload
cat > /etc/ipvslb/config.yaml <<'EOF'
settings:
  log_level: info
services:
  - name: web
    protocol: tcp
    vip: 10.255.0.1
    port: 80
    scheduler: rr
    backends:
      - {address: 10.77.1.2, port: 8080}
      - {address: 10.77.2.2, port: 8080}
      - {address: 10.77.3.2, port: 8080}
EOF
pid_before=$(systemctl show -p MainPID --value ipvslb)
systemctl reload ipvslb || fail "systemctl reload"
for _ in $(seq 50); do
  journalctl -u ipvslb --no-pager | grep -q "reloaded /etc/ipvslb/config.yaml: 1 services" && break
  sleep 0.2
done
journalctl -u ipvslb --no-pager | grep -q "reloaded /etc/ipvslb/config.yaml: 1 services" || fail "no reload in the journal"
[ "$(systemctl show -p MainPID --value ipvslb)" = "$pid_before" ] || fail "reload restarted the daemon"
ipvsadm -Ln
ipvsadm -Ln | grep -q "TCP  10.255.0.1:80 rr" || fail "service not in IPVS after reload"
[ "$(ipvsadm -Ln | grep -c -- '-> 10.77')" = 3 ] || fail "backends not in IPVS"
# A broken file: reload fails, the daemon keeps running with what it had.
cp /etc/ipvslb/config.yaml /tmp/good.yaml
echo "services: [{name: x, port: 70000}]" > /etc/ipvslb/config.yaml
if systemctl reload ipvslb 2>/tmp/reload-bad.err; then fail "reload of a broken file succeeded"; fi
systemctl is-active -q ipvslb || fail "a broken reload stopped the daemon"
cp /tmp/good.yaml /etc/ipvslb/config.yaml
pass "same pid $pid_before; a broken file is refused and the daemon keeps running"

step traffic
connect() {  # connect N: N connects to the VIP; prints "ok failed"
  python3 - "$1" <<'EOF'
import socket, sys
ok = failed = 0
for _ in range(int(sys.argv[1])):
    try:
        with socket.create_connection(("10.255.0.1", 80), timeout=2) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            s.recv(100)
        ok += 1
    except OSError:
        failed += 1
print(ok, failed)
EOF
}
set -- $(connect 30)
[ "$2" = 0 ] || fail "$2 of 30 connects failed with all backends up"
pass "30 connects through IPVS, all answered"

step quarantine
kill "$(cat /tmp/be2.pid)"
sleep 0.5
t_fail=$(date +%s.%N)
set -- $(connect 60)
echo "after backend 10.77.2.2 stopped: $1 connects answered, $2 failed"
quarantined=
for _ in $(seq 100); do
  if [ "$(field 10.77.2.2:8080 weight)" = 0 ]; then quarantined=1; break; fi
  sleep 0.2
done
ipvslb status
ipvsadm -Ln
[ -n "$quarantined" ] || fail "10.77.2.2:8080 still has weight $(field 10.77.2.2:8080 weight)"
ipvsadm -Ln | grep -- "-> 10.77.2.2:8080" | awk '{exit !($4 == 0)}' || fail "IPVS weight of 10.77.2.2 is not 0"
state=$(field 10.77.2.2:8080 state)
journalctl -u ipvslb --no-pager | grep "10.77.2.2:8080" | tail -5
set -- $(connect 30)
[ "$2" = 0 ] || fail "$2 of 30 connects failed after the quarantine"
pass "10.77.2.2:8080 $state, weight 0 in IPVS; 30 later connects all answered"

step refuse-without-headers
# The daemon's start-up preflight: no headers for the running kernel -> one clear line.
systemctl stop ipvslb
build=/lib/modules/$release/build
mv "$build" "$build.moved"
systemctl start ipvslb 2>/dev/null && { mv "$build.moved" "$build"; fail "started without headers"; }
# postinst, as apt runs it, names the package of the running kernel's headers.
note=$(/var/lib/dpkg/info/ipvslb.postinst configure 2>&1 | grep "^ipvslb: " || true)
echo "$note"
echo "$note" | grep -q "apt install linux-headers-$release\$" || { mv "$build.moved" "$build"; fail "postinst does not name linux-headers-$release"; }
mv "$build.moved" "$build"
sleep 1
line=$(journalctl -u ipvslb --no-pager -o cat | grep "cannot start" | tail -1)
echo "$line"
echo "$line" | grep -q "linux-headers-$release" || fail "no line naming linux-headers-$release"
systemctl stop ipvslb || true
systemctl reset-failed ipvslb || true
# No bpf() (a sandbox that filters it): refused before any compile, one line naming it.
out=$(systemd-run --quiet --wait --pipe -p SystemCallFilter=~bpf -p SystemCallErrorNumber=EPERM \
  /usr/bin/ipvslb run --config /etc/ipvslb/config.yaml 2>&1) && fail "started without bpf()"
echo "$out"
[ "$(echo "$out" | wc -l)" = 1 ] || fail "more than one line without bpf()"
echo "$out" | grep -q "cannot start: BPF is not permitted" || fail "no line naming BPF"
pass

step purge
apt-get purge -y -q ipvslb > /tmp/purge.log 2>&1 || { cat /tmp/purge.log; fail "apt-get purge"; }
for path in /etc/ipvslb /var/lib/ipvslb /run/ipvslb /lib/systemd/system/ipvslb.service /usr/bin/ipvslb \
            /usr/share/ipvslb /usr/lib/modules-load.d/ipvslb.conf /usr/lib/python3/dist-packages/ipvslb; do
  [ ! -e "$path" ] || fail "$path is still there after purge"
done
if dpkg-query -W -f='${db:Status-Status}\n' ipvslb 2>/dev/null | grep -qv '^not-installed$'; then
  fail "dpkg still has ipvslb: $(dpkg-query -W -f='${db:Status-Status}' ipvslb)"
fi
systemctl cat ipvslb >/dev/null 2>&1 && fail "unit still known to systemd"
# Left alone on purpose: the kernel's IPVS table and VIP interface (runtime state).
ipvsadm -Ln | grep -q "10.255.0.1:80" && left="IPVS service left in place (runtime state)" || left="IPVS empty"
pass "conffile, state, runtime dir, unit, code gone; $left"

echo "ALL PASSED in $(( $(date +%s) - T0 )) s"
