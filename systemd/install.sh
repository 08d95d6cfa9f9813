#!/usr/bin/env bash
# Install relayd as a systemd service on Debian (bookworm or later), from the checkout
# this script lives in:
#
#   sudo systemd/install.sh             install, or upgrade and restart
#   sudo systemd/install.sh --nodes N   the same as a cluster of N nodes on this machine
#        [--first-admin-port P]         (their admin ports: P, P+1, ...; 9031 by default)
#   systemd/install.sh --dry-run        print every step and command, change nothing
#
# What it does, each step printed as it goes ("==>" a step, "+" a command):
#   1. apt-get install what is missing: python3 (3.11+) with python3-venv, and procps
#      for the kill(1) that relayd.service's ExecReload runs. The service runs on
#      Debian's /usr/bin/python3, whatever python3 comes first on root's PATH.
#   2. The system user relayd (systemd/sysusers.d/relayd.conf -> /etc/sysusers.d/).
#   3. A virtualenv at /opt/relayd with relayd pip-installed from this checkout (relayd
#      is not on PyPI; its dependencies come from the configured package index).
#   4. /etc/relayd/relayd.toml (root:relayd, 0640) from config/relayd.toml, only if there
#      is no file there: an operator's config is never overwritten. Either way the config
#      is checked, as user relayd, before relayd is (re)started.
#   5. relayd.service and relayd.socket into /etc/systemd/system, daemon-reload, and both
#      enabled and started. The socket alone would be enough for activation (the first
#      connection starts relayd); the service is enabled too so that relayd starts at
#      boot, ready and watched by the watchdog with its admin listener up, instead of
#      making the first client wait for Python to start.
#
# With --nodes N (docs/scaling.md): also Debian's redis-server, and instead of
# relayd.service and relayd.socket the N instances relayd@9031 ... relayd@(9030+N) of
# relayd@.service, each a node of one cluster ([cluster] switched on by the unit; the
# instance name is the node's admin port), each binding relayd.toml's [server] port with
# SO_REUSEPORT, so the kernel spreads clients evenly over them; and the sysctl
# net.ipv4.tcp_migrate_req = 1 (/etc/sysctl.d/60-relayd.conf), so the clients waiting for
# a node that stops go to the others. --nodes 0 (or no --nodes) goes back to the single
# daemon.
#
# Idempotent: run it again after `git pull` to upgrade. An upgrade restarts
# relayd.service only; relayd.socket keeps the port open meanwhile, so clients see a
# drain (close code 1001) and reconnect, never "connection refused". With --nodes it
# restarts the nodes one at a time, each once the one before is ready, so the others
# serve the port meanwhile. Remove it all with systemd/uninstall.sh.
set -euo pipefail
umask 022 # the venv and units must be readable by everyone, the relayd user included

PREFIX=/opt/relayd
CONFIG_DIR=/etc/relayd
CONFIG=$CONFIG_DIR/relayd.toml
UNIT_DIR=/etc/systemd/system
SYSUSERS_DIR=/etc/sysusers.d
SYSCTL_FILE=/etc/sysctl.d/60-relayd.conf
SERVICE_USER=relayd
EX_CONFIG=78
# Debian's interpreter, not the first python3 on PATH: a pyenv or conda build in root's
# home would leave the service on an interpreter the relayd user cannot read (/root is
# 0700), that apt never updates, and that pyenv builds without profile-guided
# optimization (relayd's lone message then runs 8% more instructions, docs/benchmarks.md).
PYTHON=/usr/bin/python3

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY_RUN=0
NODES=0
FIRST_ADMIN_PORT=9031

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

while [ "$#" -gt 0 ]; do
    case $1 in
        -n | --dry-run) DRY_RUN=1 ;;
        --nodes)
            [ "$#" -ge 2 ] || { printf 'install.sh: --nodes needs a number\n' >&2; exit 2; }
            NODES=$2
            shift
            ;;
        --nodes=*) NODES=${1#--nodes=} ;;
        --first-admin-port)
            [ "$#" -ge 2 ] || { printf 'install.sh: --first-admin-port needs a port\n' >&2; exit 2; }
            FIRST_ADMIN_PORT=$2
            shift
            ;;
        -h | --help) usage; exit 0 ;;
        *) printf 'install.sh: unknown argument %s (try --help)\n' "$1" >&2; exit 2 ;;
    esac
    shift
done
case $NODES in
    '' | *[!0-9]*) printf 'install.sh: --nodes takes a number, not %s\n' "$NODES" >&2; exit 2 ;;
esac
[ "$NODES" -le 64 ] || { printf 'install.sh: --nodes %s: at most 64\n' "$NODES" >&2; exit 2; }
case $FIRST_ADMIN_PORT in
    '' | *[!0-9]*) printf 'install.sh: --first-admin-port takes a port number\n' >&2; exit 2 ;;
esac
if [ "$FIRST_ADMIN_PORT" -lt 1 ] || [ $((FIRST_ADMIN_PORT + NODES)) -gt 65536 ]; then
    printf 'install.sh: --first-admin-port %s is out of range\n' "$FIRST_ADMIN_PORT" >&2
    exit 2
fi
# The instances, named by their admin ports: relayd@9031 ... relayd@(9030+N) by default.
INSTANCES=()
for ((i = 0; i < NODES; i++)); do INSTANCES+=("relayd@$((FIRST_ADMIN_PORT + i)).service"); done

step() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
# Print a command, then run it unless this is a dry run.
run() {
    printf '+ %s\n' "$*"
    [ "$DRY_RUN" -eq 1 ] || "$@"
}

[ "$DRY_RUN" -eq 0 ] || step "dry run: printing what would be done; nothing is changed"
for file in pyproject.toml relayd/__init__.py config/relayd.toml systemd/relayd.service \
    systemd/relayd@.service systemd/relayd.socket systemd/sysusers.d/relayd.conf; do
    [ -f "$SRC/$file" ] || die "$SRC/$file is missing: run this script from a relayd checkout"
done
if [ "$(id -u)" -ne 0 ]; then
    [ "$DRY_RUN" -eq 1 ] || die "must run as root: sudo $0"
    note "(not root: a real run needs sudo)"
fi
if [ ! -d /run/systemd/system ]; then
    [ "$DRY_RUN" -eq 1 ] || die "systemd is not the init system here; relayd.service needs it"
    note "(systemd is not running here: a real run needs it as PID 1)"
fi

# -- 1. packages --------------------------------------------------------------------
python_ok() {
    "$PYTHON" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}
step "checking packages: $PYTHON >= 3.11 with venv, procps"
missing=()
python_ok || missing+=(python3 python3-venv)
[ -x /bin/kill ] || missing+=(procps)
# A cluster on this machine shares the local Redis (the default cluster.broker_url).
[ "$NODES" -eq 0 ] || command -v redis-server >/dev/null || missing+=(redis-server)
if [ "${#missing[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null || die "need ${missing[*]} and apt-get is missing: is this Debian?"
    run env DEBIAN_FRONTEND=noninteractive apt-get update -q
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}"
    [ "$DRY_RUN" -eq 1 ] || python_ok || die "$PYTHON is older than 3.11 (relayd needs 3.11+)"
else
    note "all present"
fi

# -- 2. the service user ------------------------------------------------------------
step "system user $SERVICE_USER"
run install -D -m 0644 "$SRC/systemd/sysusers.d/relayd.conf" "$SYSUSERS_DIR/relayd.conf"
run systemd-sysusers "$SYSUSERS_DIR/relayd.conf"

# -- 3. the virtualenv --------------------------------------------------------------
step "virtualenv $PREFIX with relayd from $SRC"
# A venv is rebuilt from scratch when its interpreter no longer runs, or is another
# Python version than the one it was made with (a Debian release upgrade: python3 is
# 3.13 and the venv's packages are 3.11's, pip among them), or is not $PYTHON (an
# install made before install.sh named it); else it is reused and upgraded in place.
if [ -x "$PREFIX/bin/python" ] && "$PREFIX/bin/python" -c 'import pip' 2>/dev/null &&
    [ "$(readlink -f "$PREFIX/bin/python")" = "$(readlink -f "$PYTHON")" ]; then
    note "reusing $PREFIX"
else
    run "$PYTHON" -m venv --clear "$PREFIX"
fi
# pip builds from a copy holding only what the build reads (pyproject.toml, README.md,
# relayd/): a build in the checkout would leave root-owned build/ and *.egg-info there.
if [ "$DRY_RUN" -eq 1 ]; then
    build="${TMPDIR:-/tmp}/relayd-build.XXXXXX"
else
    build=$(mktemp -d "${TMPDIR:-/tmp}/relayd-build.XXXXXX")
    trap 'rm -rf "$build"' EXIT
fi
run cp -R "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/relayd" "$build/"
run find "$build" -name __pycache__ -prune -exec rm -rf {} +
# An absolute path: a bare name would be looked up on the package index. With the
# cluster extra (the Redis client) always, so that [cluster] is a config change away.
run "$PREFIX/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
    --upgrade "${build}[cluster]"
# The units' Documentation= points here.
run install -d -m 0755 "$PREFIX/share/doc/relayd"
run install -m 0644 "$SRC/README.md" "$PREFIX/share/doc/relayd/"
for doc in "$SRC"/docs/*.md; do
    if [ -f "$doc" ]; then run install -m 0644 "$doc" "$PREFIX/share/doc/relayd/"; fi
done

# -- 4. the config ------------------------------------------------------------------
step "config $CONFIG"
if [ -d "$CONFIG_DIR" ]; then
    note "$CONFIG_DIR exists; its owner and mode are left as they are"
else
    run install -d -m 0750 -o root -g "$SERVICE_USER" "$CONFIG_DIR"
fi
if [ -e "$CONFIG" ]; then
    note "$CONFIG exists: kept as it is (the new defaults are in $SRC/config/relayd.toml)"
else
    run install -m 0640 -o root -g "$SERVICE_USER" "$SRC/config/relayd.toml" "$CONFIG"
fi
# As the service user with an empty environment, as relayd.service runs it, so a file
# relayd cannot read fails here rather than in relayd's start. The nodes as
# relayd@.service runs them: [cluster] on (its password and CA files read, its Redis
# client there), their node name <hostname>-<port> and admin port.
check=(runuser -u "$SERVICE_USER" -- env -i)
if [ "$NODES" -gt 0 ]; then
    check+=(RELAYD_CLUSTER__ENABLED=true "RELAYD_CLUSTER__NODE_NAME=$(uname -n)-$FIRST_ADMIN_PORT"
        RELAYD_SERVER__REUSE_PORT=true)
fi
check+=("$PREFIX/bin/relayd" check-config --config "$CONFIG")
if [ "$NODES" -gt 0 ]; then
    check+=(--admin-port "$FIRST_ADMIN_PORT")
fi
printf '+ %s\n' "${check[*]} >/dev/null"
if [ "$DRY_RUN" -eq 0 ]; then
    status=0
    effective=$(cd / && "${check[@]}") || status=$?
    if [ "$status" -ne 0 ]; then
        printf 'install.sh: %s does not pass "relayd check-config" (status %d; above).\n' \
            "$CONFIG" "$status" >&2
        printf '  relayd was installed but not restarted; fix the file, then run\n' >&2
        printf '  systemd/install.sh again (or: systemctl restart relayd).\n' >&2
        exit "$EX_CONFIG"
    fi
fi
# The nodes bind [server] host and port; relayd.socket, serving now, may listen elsewhere
# (a ListenStream= drop-in: another port, or loopback behind a proxy). Moving clients to
# another address, or opening the port on every interface, is not for install.sh to do
# quietly: it stops here, before any unit is touched (the venv is upgraded by now).
if [ "$NODES" -gt 0 ] && systemctl --quiet is-active relayd.socket 2>/dev/null; then
    printf '+ compare the addresses of relayd.socket and [server] (%s)\n' \
        "$SRC/systemd/socket_addresses.py"
    compared=0
    if [ "$DRY_RUN" -eq 0 ]; then
        printf '%s' "$effective" | "$PREFIX/bin/python" "$SRC/systemd/socket_addresses.py" \
            "$(systemctl show --property=Listen --value relayd.socket)" \
            "$(systemctl show --property=BindIPv6Only --value relayd.socket)" || compared=$?
    fi
    if [ "$compared" -ne 0 ]; then
        printf '  ([server] host and port in %s): set those to the addresses the clients\n' \
            "$CONFIG" >&2
        printf '  use now, then run systemd/install.sh --nodes again. Nothing was stopped:\n' >&2
        printf '  relayd keeps serving (on the old code until it restarts).\n' >&2
        exit "$EX_CONFIG"
    fi
fi

# -- 5. the units -------------------------------------------------------------------
step "units relayd.service, relayd@.service and relayd.socket in $UNIT_DIR"
# A changed relayd.socket (say, a new port) only takes effect when the socket is
# re-created, which closes the port for a moment; an unchanged one is left listening.
socket_changed=0
cmp -s "$SRC/systemd/relayd.socket" "$UNIT_DIR/relayd.socket" || socket_changed=1
run install -m 0644 "$SRC/systemd/relayd.service" "$SRC/systemd/relayd@.service" \
    "$SRC/systemd/relayd.socket" "$UNIT_DIR/"
# An install.sh before the nodes bound their port themselves pointed relayd.socket at
# the first node.
OLD_DROPIN=$UNIT_DIR/relayd.socket.d/nodes.conf
old_nodes=0
if [ -e "$OLD_DROPIN" ]; then
    old_nodes=1
    socket_changed=1
    run rm -f "$OLD_DROPIN"
    run rmdir --ignore-fail-on-non-empty "$UNIT_DIR/relayd.socket.d"
fi
run systemctl daemon-reload
# Instances left from an earlier, larger --nodes (or from a cluster, going back to one).
for unit in $(systemctl list-units --all --plain --no-legend 'relayd@*.service' 2>/dev/null |
    awk '{print $1}'); do
    case " ${INSTANCES[*]} " in
        *" $unit "*) ;;
        *) run systemctl disable --now "$unit" ;;
    esac
done
if [ "$NODES" -gt 0 ]; then
    # relayd.socket holds the port without SO_REUSEPORT, and so does every relayd it
    # handed its socket to: the single daemon, or the nodes of an install.sh from before
    # the nodes bound the port themselves. All of them let go of it before a node binds
    # it, so the port is closed until the first node is ready: once, on the way here.
    # (Old nodes hold it even after relayd.socket itself has failed.)
    if [ "$old_nodes" -eq 1 ] || systemctl --quiet is-active relayd.socket 2>/dev/null; then
        holding=(relayd.service)
        running=$(systemctl list-units --plain --no-legend 'relayd@*.service') ||
            die "cannot list the relayd@ instances (systemctl list-units)"
        for unit in $(printf '%s\n' "$running" | awk '{print $1}'); do
            holding+=("$unit")
        done
        note "the port closes until the first node is ready: the nodes bind it themselves"
        run systemctl stop relayd.socket "${holding[@]}"
    fi
    run systemctl disable --now relayd.service relayd.socket
    run systemctl enable --now redis-server.service
    # A node's drain closes its socket: with this, the kernel hands the clients waiting in
    # its backlog to the other nodes instead of resetting them (Linux 5.14 or later).
    printf '+ %s\n' "write $SYSCTL_FILE: net.ipv4.tcp_migrate_req = 1"
    if [ "$DRY_RUN" -eq 0 ]; then
        printf '# Written by systemd/install.sh --nodes (docs/scaling.md)\nnet.ipv4.tcp_migrate_req = 1\n' \
            >"$SYSCTL_FILE"
    fi
    if ! run sysctl -q -w net.ipv4.tcp_migrate_req=1; then
        note "could not set net.ipv4.tcp_migrate_req (a container, or Linux before 5.14): a node"
        note "that stops resets the clients waiting for it (each node warns: server.reuse_port)"
    fi
    run systemctl enable "${INSTANCES[@]}"
    printf '+ %s\n' "systemctl reset-failed ${INSTANCES[*]}"
    [ "$DRY_RUN" -eq 1 ] || systemctl reset-failed "${INSTANCES[@]}" 2>/dev/null || true
    # One at a time, each waiting for READY=1 (Type=notify): the others serve meanwhile.
    for unit in "${INSTANCES[@]}"; do
        run systemctl restart "$unit" ||
            die "$unit did not start; see: journalctl -u '$unit' -n 50 --no-pager"
    done
else
    if [ -e "$SYSCTL_FILE" ]; then
        run rm -f "$SYSCTL_FILE" # the running kernel keeps the value until a reboot: harmless
    fi
    run systemctl enable relayd.socket relayd.service
    if [ "$socket_changed" -eq 1 ] && systemctl --quiet is-active relayd.socket 2>/dev/null; then
        run systemctl stop relayd.service relayd.socket
    fi
    # A unit that hit its start limit (say, on a bad config now fixed) refuses to start
    # until its failed state is cleared.
    printf '+ %s\n' "systemctl reset-failed relayd.socket relayd.service"
    [ "$DRY_RUN" -eq 1 ] || systemctl reset-failed relayd.socket relayd.service 2>/dev/null || true
    run systemctl start relayd.socket
    # Starts relayd, or restarts it on the new code; waits for READY=1 (Type=notify).
    if ! run systemctl restart relayd.service; then
        die "relayd.service did not start; see: journalctl -u 'relayd*' -n 50 --no-pager"
    fi
fi

step "done"
if [ "$NODES" -gt 0 ]; then
    note "status:  systemctl status 'relayd@*'    logs: journalctl -u 'relayd@*' -f"
    note "config:  $CONFIG, then: systemctl reload 'relayd@*'"
    note "health:  curl http://127.0.0.1:$FIRST_ADMIN_PORT/readyz (each node on its own port)"
else
    note "status:  systemctl status relayd        logs: journalctl -u relayd -f"
    note "config:  $CONFIG, then: systemctl reload relayd"
fi
note "remove:  $SRC/systemd/uninstall.sh [--purge]"
