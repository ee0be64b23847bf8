#!/usr/bin/env bash
# A one-node Slurm cluster on 127.0.0.1, for testing the Slurm launchers on one machine (CI).
# Run `launch/slurm/local_cluster.sh --help` for what it does.
set -euo pipefail

STATE_DIR=${RECTRAIN_SLURM_DIR:-/var/lib/rectrain-slurm}
SLURM_CONF=/etc/slurm/slurm.conf
MARKER="# written by rectrain launch/slurm/local_cluster.sh"
PACKAGES=(slurmctld slurmd slurm-client munge)
WAIT_S=${RECTRAIN_SLURM_WAIT_S:-60}
# How long a requeued job waits before it may start again: Slurm sets a requeued job's
# BeginTime to now + cred_expire + 1 s (the job credential's lifetime, AuthInfo=cred_expire,
# 120 s by default), so that a credential of the previous run cannot start a step of the new
# one. A single-node test cluster has no such stragglers: 10 s makes a requeued job pending
# for about 11 s instead of about 2 minutes.
CRED_EXPIRE_S=${RECTRAIN_SLURM_CRED_EXPIRE_S:-10}

usage() {
    cat <<EOF
usage: $0 start|stop|status|--help

A one-node Slurm cluster on 127.0.0.1 (Debian/Ubuntu, run as root), for testing
launch/slurm/*.sbatch on one machine: CI runs 'start' before the tests.

  start   install slurmctld, slurmd, slurm-client and munge with apt-get (only if missing),
          create the munge key if missing, start munged (as the munge user), write
          $SLURM_CONF for one node (this host, \`hostname -s\`, all \`nproc\` CPUs,
          90% of the memory), start slurmctld and slurmd, and wait (up to ${WAIT_S} s) until
          sinfo shows the node idle. Prints one status line. Running it again while the
          cluster is up does nothing (it restarts the daemons only if the config changed).
  stop    stop slurmd, slurmctld and munged (the ones this script started).
  status  print the status line; exit 1 if the cluster does not answer.

State, spool, pid and log files live in $STATE_DIR (RECTRAIN_SLURM_DIR overrides it):
log/slurmctld.log and log/slurmd.log are where to look when something fails.

Requeued jobs: Slurm holds a requeued job pending until now + AuthInfo cred_expire + 1 s
(cred_expire is 120 s by default); this cluster sets cred_expire=${CRED_EXPIRE_S}
(RECTRAIN_SLURM_CRED_EXPIRE_S) and schedules every second, so a job requeued after a
preemption warning starts again $((CRED_EXPIRE_S + 1))-$((CRED_EXPIRE_S + 2)) s later.

Then, for example:
  sbatch --ntasks-per-node=2 launch/slurm/train.sbatch configs/debug.yaml device=cpu
EOF
}

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() {  # re-runs this script with sudo when that needs no password
    [ "$(id -u)" = 0 ] && return 0
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        exec sudo -n --preserve-env=RECTRAIN_SLURM_DIR,RECTRAIN_SLURM_WAIT_S,RECTRAIN_SLURM_CRED_EXPIRE_S \
            bash "$0" "$@"
    fi
    die "run as root (it installs packages and starts daemons)"
}

alive() {  # alive PIDFILE NAME: whether the process named in PIDFILE runs and is NAME (not a zombie)
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] \
        && ! grep -q '^[^)]*) Z' "/proc/$pid/stat" 2>/dev/null
}

install_packages() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Do not let the packages' init scripts start daemons with the stock config.
    local policy=/usr/sbin/policy-rc.d had_policy=0
    [ -e "$policy" ] && had_policy=1
    [ $had_policy = 1 ] || { printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; }
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
        apt-get update -qq >/dev/null 2>&1 || true
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
            || { [ $had_policy = 1 ] || rm -f "$policy"; die "apt-get install ${missing[*]} failed"; }
    fi
    [ $had_policy = 1 ] || rm -f "$policy"
}

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then mungekey -c -f -k /etc/munge/munge.key
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- munged || die "munged did not start (see /var/log/munge/munged.log)"
    local i
    for i in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged does not answer (see /var/log/munge/munged.log)"
}

write_config() {  # prints the config to stdout
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    cat <<EOF
$MARKER; edits are overwritten by its next 'start'.
ClusterName=rectrain
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/munge
CryptoType=crypto/munge
# Requeued jobs may start again cred_expire + 1 s after the requeue (default 120 s).
AuthInfo=cred_expire=$CRED_EXPIRE_S
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Trust the node line below rather than what slurmd detects (VMs report odd topologies).
SlurmdParameters=config_overrides
ReturnToService=2
# Jobs may be requeued (sbatch --requeue is still the explicit switch in our scripts).
JobRequeue=1
# Look at the queue every second, so a requeued job starts as soon as its BeginTime passes
# (the default main loop runs every 60 s and backfill every 30 s).
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
KillWait=10
MinJobAge=600
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -n1; }

status_line() {
    local state
    state=$(node_state)
    if [ -z "$state" ]; then
        echo "local_cluster: not running (sinfo does not answer)"
        return 1
    fi
    echo "local_cluster: node $(hostname -s) $state, $(nproc) CPUs, partition $(sinfo -h -o '%P' | head -n1); logs in $STATE_DIR/log"
}

stop_daemons() {
    local name pidfile
    for name in slurmd slurmctld; do
        pidfile=$STATE_DIR/run/$name.pid
        if alive "$pidfile" "$name"; then
            kill "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null || true
            for _ in $(seq 100); do alive "$pidfile" "$name" || break; sleep 0.1; done
            alive "$pidfile" "$name" && kill -9 "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
}

stop_munge() {
    local pidfile=/run/munge/munged.pid
    if alive "$pidfile" munged; then
        kill "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null || true
        for _ in $(seq 50); do alive "$pidfile" munged || break; sleep 0.1; done
    fi
}

start() {
    need_root start
    install_packages
    start_munge
    mkdir -p "$STATE_DIR"/{state,spool,run,log} /etc/slurm
    if [ -e "$SLURM_CONF" ] && ! grep -qF "$MARKER" "$SLURM_CONF"; then
        die "$SLURM_CONF exists and was not written by this script; not touching a real cluster's config"
    fi
    local new
    new=$(write_config)
    if [ ! -e "$SLURM_CONF" ] || [ "$new" != "$(cat "$SLURM_CONF")" ]; then
        printf '%s\n' "$new" >"$SLURM_CONF"
        stop_daemons  # running with the old config
    fi
    if ! alive "$STATE_DIR/run/slurmctld.pid" slurmctld; then
        slurmctld || die "slurmctld did not start (see $STATE_DIR/log/slurmctld.log)"
    fi
    local deadline=$((SECONDS + WAIT_S))
    until scontrol ping 2>/dev/null | grep -q "is UP"; do
        [ $SECONDS -lt $deadline ] || die "slurmctld does not answer (see $STATE_DIR/log/slurmctld.log)"
        sleep 0.5
    done
    if ! alive "$STATE_DIR/run/slurmd.pid" slurmd; then
        slurmd || die "slurmd did not start (see $STATE_DIR/log/slurmd.log)"
    fi
    local state
    while :; do
        state=$(node_state)
        case "$state" in
            idle|mixed|allocated|completing) break ;;
            down*|drain*|fail*)
                # e.g. left down by an unclean stop: return it to service.
                scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        [ $SECONDS -lt $deadline ] || die "node is '${state:-unknown}' after ${WAIT_S} s (see $STATE_DIR/log/slurmd.log)"
        sleep 0.5
    done
    status_line
}

stop() {
    need_root stop
    stop_daemons
    stop_munge
    echo "local_cluster: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status_line ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac
