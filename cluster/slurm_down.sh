#!/usr/bin/env bash
# Stop the test cluster of cluster/slurm_up.sh: each daemon by the pid in its pid file.
# Jobs still running are cancelled first. Idempotent; logs stay in $VLC_SLURM_DIR.
set -uo pipefail

D=${VLC_SLURM_DIR:-/tmp/vlcompress-slurm}
[[ -d $D ]] || exit 0

# Running jobs first, so no stray training process outlives the cluster.
if [[ -s $D/slurmctld.pid ]] && kill -0 "$(cat "$D/slurmctld.pid")" 2>/dev/null; then
	timeout 10 scancel --user=root --full >/dev/null 2>&1 || true
	for _ in $(seq 50); do
		[[ -z $(timeout 5 squeue -h -t running,completing 2>/dev/null) ]] && break
		sleep 0.2
	done
fi

# SIGTERM to every daemon at once (each takes about 2 s to exit), SIGKILL what is left after 10 s.
pids=()
for f in "$D"/slurmd-*.pid "$D/slurmctld.pid" "$D/slurmdbd.pid" "$D/mariadbd.pid" "$D/munged.pid"; do
	[[ -s $f ]] || continue
	pid=$(cat "$f")
	rm -f "$f"
	kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
done
for _ in $(seq 50); do
	left=()
	for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
	((${#left[@]})) || break
	sleep 0.2
done
for pid in "${left[@]}"; do kill -KILL "$pid" 2>/dev/null; done
echo "slurm_down: stopped (logs in $D)"
