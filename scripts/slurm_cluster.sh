#!/usr/bin/env bash
# A real SLURM cluster on this machine for tests and demos: one slurmctld and two slurmd nodes
# (node1, node2) on 127.0.0.1, no accounting, no systemd.
#
#   scripts/slurm_cluster.sh start    install slurm + munge when missing (apt, needs root), start
#                                     munged, slurmctld, slurmd x2; wait until both nodes are idle
#   scripts/slurm_cluster.sh status   exit 0 when the cluster answers and prints sinfo
#   scripts/slurm_cluster.sh stop     stop what start started and delete the state folder
#   scripts/slurm_cluster.sh env      print the export line the SLURM client tools need
#
# Everything lives in $METABOLIC_SLURM_DIR (default /tmp/metabolic-slurm); client tools find the
# cluster through SLURM_CONF=$METABOLIC_SLURM_DIR/slurm.conf (the system's /etc/slurm is left alone).
# Exit codes: 0 ok, 1 failed, 3 cannot run here (not root, or slurm missing and apt unavailable).
set -uo pipefail

DIR=${METABOLIC_SLURM_DIR:-/tmp/metabolic-slurm}
CONF=$DIR/slurm.conf
CTLD_PORT=${METABOLIC_SLURM_PORT:-16817}
NODES=(node1 node2)
WAIT_S=${METABOLIC_SLURM_WAIT_S:-60}
export SLURM_CONF=$CONF

say() { echo "slurm_cluster: $*" >&2; }

cannot() { say "cannot run here: $*"; exit 3; }

install_if_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    return 0
  fi
  [ "$(id -u)" = 0 ] || cannot "slurm is not installed and installing it needs root"
  command -v apt-get >/dev/null || cannot "slurm is not installed and there is no apt-get"
  local pkgs=(slurmctld slurmd slurm-client munge)
  say "installing ${pkgs[*]} with apt-get"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"$DIR.apt.log" 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$DIR.apt.log" 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"$DIR.apt.log" 2>&1 \
      || cannot "apt-get install ${pkgs[*]} failed (log: $DIR.apt.log)"
  fi
}

write_conf() {
  local cpus
  cpus=$(nproc)
  mkdir -p "$DIR/ctld" "$DIR/log" "$DIR/run"
  for n in "${NODES[@]}"; do mkdir -p "$DIR/spool/$n"; done
  cat >"$CONF" <<EOF
# Written by scripts/slurm_cluster.sh: two slurmd nodes on this machine.
ClusterName=metabolic
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again after cred_expire seconds (default 120; short for tests).
AuthInfo=cred_expire=${METABOLIC_SLURM_CRED_EXPIRE:-10}
StateSaveLocation=$DIR/ctld
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdSpoolDir=$DIR/spool/%n
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
EnforcePartLimits=ALL
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=node[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0  # a munged is already serving this machine
  fi
  mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null
  [ -s /etc/munge/munge.key ] || { mungekey -c -f >/dev/null 2>&1 || cannot "no /etc/munge/munge.key and mungekey failed"; }
  chown munge:munge /etc/munge/munge.key 2>/dev/null
  runuser -u munge -- munged || { say "munged did not start"; return 1; }
  touch "$DIR/run/munged.started-by-us"
  for _ in $(seq 50); do
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  say "munged does not answer"
  return 1
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

nodes_idle() {
  local states
  states=$(sinfo -h -N -o '%N %T' 2>/dev/null) || return 1
  for n in "${NODES[@]}"; do
    grep -Eq "^$n (idle|mixed|allocated)" <<<"$states" || return 1
  done
}

cmd_start() {
  [ "$(id -u)" = 0 ] || cannot "starting slurmctld/slurmd as configured here needs root"
  mkdir -p "$DIR"
  install_if_missing
  if alive "$DIR/run/slurmctld.pid" && nodes_idle; then
    say "already running (SLURM_CONF=$CONF)"
    return 0
  fi
  write_conf
  start_munge || exit 1
  alive "$DIR/run/slurmctld.pid" || slurmctld -c -f "$CONF" || { say "slurmctld failed; see $DIR/log/slurmctld.log"; exit 1; }
  for n in "${NODES[@]}"; do
    alive "$DIR/run/slurmd-$n.pid" || slurmd -N "$n" -f "$CONF" || { say "slurmd $n failed; see $DIR/log/slurmd-$n.log"; exit 1; }
  done
  local end=$((SECONDS + WAIT_S))
  until nodes_idle; do
    if [ $SECONDS -ge $end ]; then
      say "nodes not idle after ${WAIT_S}s:"; sinfo -N >&2; tail -5 "$DIR"/log/*.log >&2
      exit 1
    fi
    sleep 0.2
  done
  say "up: $(sinfo -h -N -o '%N=%T' | tr '\n' ' ')(SLURM_CONF=$CONF)"
}

cmd_stop() {
  [ -d "$DIR" ] || { say "not running"; return 0; }
  if command -v scancel >/dev/null && alive "$DIR/run/slurmctld.pid"; then
    scancel --quiet --full "--partition=debug" 2>/dev/null || true
  fi
  local pids=()
  for f in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid"; do
    alive "$f" && pids+=("$(cat "$f")")
  done
  [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null
  for _ in $(seq 100); do
    local left=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && left=1; done
    [ $left = 0 ] && break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && kill -9 "$p" 2>/dev/null; done
  if [ -f "$DIR/run/munged.started-by-us" ] && [ -f /run/munge/munged.pid ]; then
    kill "$(cat /run/munge/munged.pid)" 2>/dev/null
  fi
  rm -rf "$DIR" "$DIR.apt.log"
  say "stopped"
}

cmd_status() {
  alive "$DIR/run/slurmctld.pid" && sinfo -N && return 0
  say "not running"
  return 1
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 {start|stop|status|env}" >&2; exit 1 ;;
esac
