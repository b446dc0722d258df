#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (Debian's slurm-wlm 22.05 and munge, as root):
# munged, slurmctld and slurmd, one partition `debug` holding this host with all its CPUs.
# For tests/container/test_slurm.py, which runs it in a throwaway container; it writes
# /etc/slurm/slurm.conf, so do not run it on a machine that has a SLURM of its own.
#
#   tests/slurm/cluster.sh          start (idempotent), wait until the node is idle
#   tests/slurm/cluster.sh stop     stop the daemons
set -euo pipefail

if [[ "${1:-}" == stop ]]; then
    pkill -x slurmd || true; pkill -x slurmctld || true; pkill -x munged || true
    exit 0
fi

HOST=$(hostname -s)
# a --network none container knows no address for its own name: the node is this machine
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >> /etc/hosts
CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /etc/munge
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=airlock-test
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=60
MinJobAge=3600
SchedulerParameters=defer_batch
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

if ! pgrep -x munged >/dev/null; then
    [[ -s /etc/munge/munge.key ]] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    chmod 0400 /etc/munge/munge.key
    su -s /bin/sh munge -c munged 2>/dev/null || munged --force
fi
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
    state=$(sinfo -h -N -o %t 2>/dev/null | head -n 1 || true)
    [[ "$state" == idle || "$state" == mix || "$state" == alloc ]] && { echo "slurm: $HOST up, $CPUS CPUs"; exit 0; }
    sleep 1
done
echo "slurm: the node did not come up (state '${state:-}'); see /var/log/slurm/" >&2
tail -n 20 /var/log/slurm/*.log >&2
exit 1
