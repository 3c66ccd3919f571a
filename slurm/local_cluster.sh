#!/usr/bin/env bash
# A SLURM cluster on this one machine, from Debian's packages, to try the job scripts
# (and the tests) before spending GPU hours on a real cluster. As root:
#
#     bash slurm/local_cluster.sh install          # apt-get the packages, when absent
#     bash slurm/local_cluster.sh start DIR [N]    # N nodes (default 1), everything in DIR
#     export SLURM_CONF=DIR/slurm.conf             # for sbatch, squeue, scontrol, scancel
#     bash slurm/local_cluster.sh stop DIR         # cancels the jobs, stops the daemons
#
# Everything lives in DIR: the configuration, a munge key and socket, the daemons' state,
# logs and process ids; nothing under /etc is used, so it runs beside a system SLURM.
# The N nodes (n1, n2, ...) are N slurmd processes on this machine, each on its own port,
# each offering all of its CPUs and no GPU.
set -euo pipefail
PATH=$PATH:/usr/sbin:/sbin # where Debian puts the daemons, outside some users' PATH

PACKAGES=(slurmctld slurmd slurm-client munge)

usage() {
    echo "usage: $0 install | start DIR [NODES] | stop DIR" >&2
    exit 2
}

install() {
    local program missing=0
    for program in slurmctld slurmd sbatch munged; do
        command -v "$program" >/dev/null || missing=1
    done
    [ "$missing" = 1 ] || return 0
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

# A TCP port on 127.0.0.1 that nothing listens on (a connection to it is refused).
free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 20000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
}

# Wait up to 30 s for a command to succeed.
wait_for() {
    local what=$1
    shift
    for _ in $(seq 300); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "$0: $what did not start; see the logs in $DIR" >&2
    exit 1
}

start() {
    local nodes=$1 host cpus ctld_port
    mkdir -p "$DIR"/{munge,state,spool}
    DIR=$(cd "$DIR" && pwd)
    chmod 700 "$DIR" "$DIR/munge" # munged refuses a key or socket others could reach
    host=$(hostname -s)
    cpus=$(nproc)
    ctld_port=$(free_port)

    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
    # --force: munged declines to run as root without it.
    munged --force --socket "$DIR/munge/socket" --key-file "$DIR/munge/munge.key" \
        --pid-file "$DIR/munge/munged.pid" --log-file "$DIR/munge/munged.log" \
        --seed-file "$DIR/munge/munged.seed"

    cat >"$DIR/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Our own munge socket. cred_expire is also how long a requeued job waits before it may
# start again (default 120 s, which the tests would spend idle).
AuthInfo=socket=$DIR/munge/socket,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
# No cgroups needed: processes are tracked by their parents, no CPU binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# Look at pending jobs every second, not every minute: a requeued job starts at once.
SchedulerParameters=sched_interval=1
# The machine may be slower or faster than the node declares: use it as it is.
SlurmdParameters=config_overrides
EOF
    local node
    for node in $(seq "$nodes"); do
        echo "NodeName=n$node NodeHostname=$host NodeAddr=127.0.0.1 Port=$(free_port)" \
            "CPUs=$cpus State=UNKNOWN" >>"$DIR/slurm.conf"
    done
    echo "PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$DIR/slurm.conf"

    export SLURM_CONF=$DIR/slurm.conf
    slurmctld -f "$SLURM_CONF"
    wait_for slurmctld scontrol ping
    for node in $(seq "$nodes"); do
        mkdir -p "$DIR/spool/n$node"
        slurmd -f "$SLURM_CONF" -N "n$node"
    done
    wait_for "slurmd" bash -c "[ \"\$(sinfo -h -t idle -o %D)\" = $nodes ]"
    echo "export SLURM_CONF=$SLURM_CONF"
}

# Cancel the cluster's jobs and wait for them to end (a job's processes outlive slurmd),
# then stop the daemons whose process ids DIR holds: each one started here, no other.
stop() {
    local pidfile pid
    if [ -f "$DIR/slurmctld.pid" ]; then
        export SLURM_CONF=$DIR/slurm.conf
        scancel --user "$(id -un)" 2>/dev/null || true
        for _ in $(seq 600); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.1
        done
    fi
    local pids=()
    for pidfile in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
        rm -f "$pidfile"
    done
    for pid in "${pids[@]}"; do # each takes about 2 s to end: all at once
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    done
}

case "${1:-}" in
install) install ;;
start)
    [ $# -ge 2 ] || usage
    DIR=$2
    start "${3:-1}"
    ;;
stop)
    [ $# -eq 2 ] || usage
    DIR=$2
    stop
    ;;
*) usage ;;
esac
