#!/usr/bin/env bash
# A throwaway one-node Slurm cluster on this machine (docs/DESIGN.md 9), for tests/test_slurm.py
# and for trying jobs/*.sbatch by hand. Root only; Debian/Ubuntu (apt) only.
#
#   tests/slurm_node.sh install          apt-get install slurm-wlm + munge; a no-op when present.
#                                        Exit 3 (reason on stderr) when it cannot: not root, no
#                                        apt-get, or apt fails (no network). Runs `apt-get update`
#                                        only when installing from the current lists fails.
#   tests/slurm_node.sh up DIR [CPUS [GPUS]]
#                                        Start munged, slurmctld and slurmd with every file in DIR
#                                        (config, state, spool, logs, munge key and socket) and
#                                        free TCP ports, so it touches neither /etc nor a running
#                                        Slurm. The node claims CPUS cores (default 8, more than
#                                        real is fine: SlurmdParameters=config_overrides) and GPUS
#                                        fake GPUs (default 0; GRES over mknod'd device files in
#                                        DIR/dev, left out with a warning if mknod is refused).
#                                        Waits until the node is idle; then prints the line to use
#                                        it: export SLURM_CONF=DIR/slurm.conf
#                                        MinJobAge=4 keeps `sbatch --wait` polling every 2 s
#                                        (it backs off to 8 s and more when MinJobAge >= 5).
#   tests/slurm_node.sh down DIR         Cancel its jobs, stop the daemons that `up DIR` started.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin
PACKAGES=(slurm-wlm munge)
TOOLS=(munged slurmctld slurmd sbatch srun scontrol sinfo)

die() { echo "slurm_node.sh: $2" >&2; exit "$1"; }
have_all() { for t in "${TOOLS[@]}"; do command -v "$t" >/dev/null || return 1; done; }
free_ports() {  # two distinct free TCP ports
    python3 -c 'import socket; s = [socket.socket() for _ in "ab"]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))'
}

install() {
    have_all && return 0
    [ "$(id -u)" = 0 ] || die 3 "not root: cannot apt-get install ${PACKAGES[*]}"
    command -v apt-get >/dev/null || die 3 "no apt-get: install ${PACKAGES[*]} another way"
    export DEBIAN_FRONTEND=noninteractive
    local get=(apt-get -q -y -o DPkg::Lock::Timeout=60)
    timeout -k 5 150 "${get[@]}" install --no-install-recommends "${PACKAGES[@]}" ||
        { timeout -k 5 120 "${get[@]}" update && timeout -k 5 150 \
            "${get[@]}" install --no-install-recommends "${PACKAGES[@]}"; } ||
        die 3 "apt-get could not install ${PACKAGES[*]} (no network?)"
    have_all || die 3 "installed ${PACKAGES[*]} but some of ${TOOLS[*]} is missing"
}

write_conf() {  # DIR CPUS GPUS HOST
    local dir=$1 cpus=$2 gpus=$3 host=$4 gres="" ports
    read -r -a ports < <(free_ports)
    if [ "$gpus" -gt 0 ]; then
        mkdir -p "$dir/dev"
        for ((i = 0; i < gpus; i++)); do
            [ -e "$dir/dev/gpu$i" ] || mknod "$dir/dev/gpu$i" c 195 "$i" 2>/dev/null || break
        done
        if [ -e "$dir/dev/gpu$((gpus - 1))" ]; then
            gres="Gres=gpu:$gpus"
            echo "Name=gpu File=$dir/dev/gpu[0-$((gpus - 1))]" >"$dir/gres.conf"
        else
            echo "slurm_node.sh: warning: mknod refused, the node has no GPUs" >&2
        fi
    fi
    cat >"$dir/slurm.conf" <<EOF
ClusterName=rpdtest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${ports[0]}
SlurmdPort=${ports[1]}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
MinJobAge=4
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=4000 $gres State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
    local dir cpus=${2:-8} gpus=${3:-0} host
    dir=$(mkdir -p "$1" && cd "$1" && pwd)
    host=$(hostname -s)
    mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
    chmod 700 "$dir/munge"
    write_conf "$dir" "$cpus" "$gpus" "$host"
    [ -s "$dir/munge/key" ] || { dd if=/dev/urandom of="$dir/munge/key" bs=1024 count=1 \
        status=none && chmod 600 "$dir/munge/key"; }
    munged --force --key-file="$dir/munge/key" --socket="$dir/munge/socket" \
        --pid-file="$dir/munge/pid" --log-file="$dir/munge/log" --seed-file="$dir/munge/seed"
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"
    for _ in $(seq 120); do
        if [ "$(sinfo -h -N -o %t 2>/dev/null)" = idle ]; then
            echo "export SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 0.5
    done
    sinfo -N -l >&2 || true
    tail -n 20 "$dir"/*.log >&2 || true
    die 1 "the node did not become idle in 60 s (logs in $dir)"
}

down() {
    local dir pids
    dir=$(cd "$1" && pwd)
    mapfile -t pids < <(cat "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/pid" 2>/dev/null)
    [ "${#pids[@]}" -gt 0 ] || return 0
    export SLURM_CONF=$dir/slurm.conf  # end jobs left running (an sbatch --wait timed out)
    timeout 10 scancel --partition=debug 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(timeout 5 squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
    kill "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "${pids[@]}" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "${pids[@]}" 2>/dev/null || true
}

case "${1:-}" in
    install) install ;;
    up) [ $# -ge 2 ] || die 2 "usage: $0 up DIR [CPUS [GPUS]]"; shift; up "$@" ;;
    down) [ $# -eq 2 ] || die 2 "usage: $0 down DIR"; down "$2" ;;
    *) die 2 "usage: $0 install | up DIR [CPUS [GPUS]] | down DIR" ;;
esac
