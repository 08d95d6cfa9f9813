#!/usr/bin/env bash
# Remove what systemd/install.sh installed:
#
#   sudo systemd/uninstall.sh            stop and remove relayd; keep its config
#   sudo systemd/uninstall.sh --purge    also remove /etc/relayd, the unit drop-ins and
#                                        the relayd user
#   systemd/uninstall.sh --dry-run       print every step and command, change nothing
#
# Without --purge, /etc/relayd (the operator's config and any secrets beside it), drop-ins
# made with `systemctl edit relayd` and the system user relayd stay, so that a later
# install.sh picks up where this left off: the user keeps its id and the files their group.
# Safe to run twice.
set -euo pipefail

PREFIX=/opt/relayd
CONFIG_DIR=/etc/relayd
UNIT_DIR=/etc/systemd/system
SYSUSERS_FILE=/etc/sysusers.d/relayd.conf
SYSCTL_FILE=/etc/sysctl.d/60-relayd.conf
SERVICE_USER=relayd
UNITS=(relayd.socket relayd.service relayd@.service)

DRY_RUN=0
PURGE=0

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

for arg in "$@"; do
    case $arg in
        --purge) PURGE=1 ;;
        -n | --dry-run) DRY_RUN=1 ;;
        -h | --help) usage; exit 0 ;;
        *) printf 'uninstall.sh: unknown argument %s (try --help)\n' "$arg" >&2; exit 2 ;;
    esac
done

step() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() { printf 'uninstall.sh: %s\n' "$*" >&2; exit 1; }
# Print a command, then run it unless this is a dry run.
run() {
    printf '+ %s\n' "$*"
    [ "$DRY_RUN" -eq 1 ] || "$@"
}

[ "$DRY_RUN" -eq 0 ] || step "dry run: printing what would be done; nothing is changed"
if [ "$(id -u)" -ne 0 ]; then
    [ "$DRY_RUN" -eq 1 ] || die "must run as root: sudo $0"
    note "(not root: a real run needs sudo)"
fi
systemd_running=0
[ -d /run/systemd/system ] && systemd_running=1

step "stopping and disabling ${UNITS[*]}"
if [ "$systemd_running" -eq 1 ]; then
    # Both in one job: a service stopped while its socket still listens would be started
    # again by the next connection.
    installed=()
    templates=()
    for unit in "${UNITS[@]}"; do
        if [ -z "$(systemctl list-unit-files --no-legend "$unit" 2>/dev/null)" ]; then
            note "$unit is not installed"
        elif [[ $unit == *@.service ]]; then
            # Before systemd 256 (Debian 12 has 252) `disable --now` refuses a template
            # ("missing the instance name") and would stop this script half way: its
            # instances are stopped by name below, the template only disabled.
            templates+=("$unit")
        else
            installed+=("$unit")
        fi
    done
    # The cluster's nodes (install.sh --nodes), instances of relayd@.service.
    while read -r instance _; do
        if [ -n "$instance" ]; then installed+=("$instance"); fi
    done < <(systemctl list-units --all --plain --no-legend 'relayd@*.service' 2>/dev/null)
    if [ "${#installed[@]}" -gt 0 ]; then run systemctl disable --now "${installed[@]}"; fi
    if [ "${#templates[@]}" -gt 0 ]; then run systemctl disable "${templates[@]}"; fi
else
    note "systemd is not running here: nothing to stop"
fi

step "removing the units"
# An earlier install.sh --nodes pointed relayd.socket at the first node with this drop-in.
if [ -e "$UNIT_DIR/relayd.socket.d/nodes.conf" ]; then run rm -f "$UNIT_DIR/relayd.socket.d/nodes.conf"; fi
# install.sh --nodes's sysctl (net.ipv4.tcp_migrate_req = 1); the running kernel keeps the
# value until a reboot, which is harmless.
if [ -e "$SYSCTL_FILE" ]; then run rm -f "$SYSCTL_FILE"; fi
for unit in "${UNITS[@]}"; do
    if [ -e "$UNIT_DIR/$unit" ]; then run rm -f "$UNIT_DIR/$unit"; else note "no $UNIT_DIR/$unit"; fi
done
if [ "$PURGE" -eq 1 ]; then
    for unit in "${UNITS[@]}"; do
        if [ -d "$UNIT_DIR/$unit.d" ]; then run rm -rf "${UNIT_DIR:?}/$unit.d"; fi
    done
fi
if [ "$systemd_running" -eq 1 ]; then
    run systemctl daemon-reload
    # Forget a failed state, so `systemctl --failed` does not list relayd forever.
    printf '+ %s\n' "systemctl reset-failed ${UNITS[*]}"
    [ "$DRY_RUN" -eq 1 ] || systemctl reset-failed "${UNITS[@]}" 2>/dev/null || true
fi

step "removing $PREFIX"
if [ -e "$PREFIX" ]; then run rm -rf "${PREFIX:?}"; else note "no $PREFIX"; fi

if [ "$PURGE" -eq 1 ]; then
    step "purging $CONFIG_DIR and the user $SERVICE_USER"
    if [ -e "$CONFIG_DIR" ]; then run rm -rf "${CONFIG_DIR:?}"; else note "no $CONFIG_DIR"; fi
    if [ -e "$SYSUSERS_FILE" ]; then run rm -f "$SYSUSERS_FILE"; fi
    # relayd owns no files, so nothing is left behind with a dangling owner.
    if getent passwd "$SERVICE_USER" >/dev/null; then run userdel "$SERVICE_USER"; fi
    if getent group "$SERVICE_USER" >/dev/null; then run groupdel "$SERVICE_USER"; fi
else
    step "keeping $CONFIG_DIR, drop-ins and the user $SERVICE_USER (--purge removes them)"
fi

step "done"
