#!/usr/bin/env bash
# Bring up a single-host Slurm cluster for tests: two emulated nodes (n1, n2) on loopback.
#
#   sudo cluster/slurm_up.sh          # idempotent: a cluster already up is left as it is
#   cluster/slurm_up.sh --check       # exit 0 when it is up, 1 otherwise (starts nothing)
#   cluster/slurm_down.sh             # stops every daemon by the pid it wrote
#
# Debian's Slurm 22.05 (slurmctld, slurmd, slurm-client), munge for authentication and
# slurmdbd on a private MariaDB for `sacct` (submitit reads job states from it; without it
# they read UNKNOWN). No systemd: the daemons are started by hand, as root (SlurmUser=root,
# proctrack/linuxproc, task/none: no cgroups needed). Everything lives in $VLC_SLURM_DIR
# (default /tmp/vlcompress-slurm) except /etc/slurm/slurm.conf (where the clients look) and
# an /etc/hosts line making n1 and n2 resolve to 127.0.0.1. Root only; installs the Debian
# packages when they are missing (apt-get; skipped when present).
set -euo pipefail

D=${VLC_SLURM_DIR:-/tmp/vlcompress-slurm}
CLUSTER=vlctest
CTLD_PORT=${VLC_SLURM_CTLD_PORT:-16817}
DBD_PORT=${VLC_SLURM_DBD_PORT:-16819}
DB_PORT=${VLC_SLURM_DB_PORT:-16833}
NODE_PORTS=(17001 17002)
NODE_CPUS=${VLC_SLURM_NODE_CPUS:-4}
CONF=/etc/slurm/slurm.conf
MARK="# written by vlcompress cluster/slurm_up.sh"
PKGS=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)

say() { echo "slurm_up: $*"; }
die() {
	echo "slurm_up: $*" >&2
	exit 1
}
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
# wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds.
wait_for() {
	local t=$1 what=$2
	shift 2
	local end=$((SECONDS + t))
	until "$@" >/dev/null 2>&1; do
		((SECONDS < end)) || die "$what did not come up within ${t}s (logs in $D)"
		sleep 0.2
	done
}

is_up() {
	alive "$D/munged.pid" && alive "$D/mariadbd.pid" && alive "$D/slurmdbd.pid" &&
		alive "$D/slurmctld.pid" && alive "$D/slurmd-n1.pid" && alive "$D/slurmd-n2.pid" &&
		timeout 10 sinfo -h -o %T >/dev/null 2>&1
}
if [[ ${1:-} == --check ]]; then
	is_up
	exit
fi
[[ $(id -u) == 0 ]] || die "must run as root (it starts munged, slurmctld, slurmd, slurmdbd)"

t0=$SECONDS
# ---- packages --------------------------------------------------------------------------
missing=()
for p in "${PKGS[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	say "installing ${missing[*]} (apt-get)"
	export DEBIAN_FRONTEND=noninteractive
	timeout 180 apt-get update -qq || die "apt-get update failed"
	timeout 400 apt-get install -y -qq --no-install-recommends "${missing[@]}" >"/tmp/vlcompress-slurm-apt.log" 2>&1 ||
		die "apt-get install failed: see /tmp/vlcompress-slurm-apt.log"
	say "installed in $((SECONDS - t0))s"
	# The packages' postinst may have started daemons where an init system exists; ours are private.
fi

# ---- already up? -----------------------------------------------------------------------
if is_up; then
	say "already up ($D)"
	exit 0
fi
# A partial cluster (a daemon died): start again from scratch.
if compgen -G "$D/*.pid" >/dev/null; then
	say "a previous cluster is partly up: stopping it first"
	VLC_SLURM_DIR=$D "$(dirname "$0")/slurm_down.sh" || true
fi
if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
	die "$CONF exists and was not written by this script; not touching a real cluster's config"
fi

rm -rf "$D"
mkdir -p "$D"/{ctld,db,d-n1,d-n2}
chmod 755 "$D"

# ---- names resolve (Lightning's MASTER_ADDR is the first node's name) ---------------------
if ! getent hosts n1 >/dev/null || ! getent hosts n2 >/dev/null; then
	echo "127.0.0.1 n1 n2 $MARK" >>/etc/hosts
fi
HOST=$(hostname -s)
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST $MARK" >>/etc/hosts

# ---- munge -------------------------------------------------------------------------------
mkdir -p /run/munge /var/lib/munge /var/log/munge
[[ -s /etc/munge/munge.key ]] || {
	dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
	chmod 400 /etc/munge/munge.key
}
chown munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge /etc/munge/munge.key
chmod 755 /run/munge
if ! alive /run/munge/munged.pid; then
	runuser -u munge -- /usr/sbin/munged --force
fi
wait_for 10 munged bash -c 'munge -n | unmunge'
cp /run/munge/munged.pid "$D/munged.pid"

# ---- MariaDB for slurmdbd (private data dir, loopback TCP port) ---------------------------
mariadb-install-db --no-defaults --datadir="$D/db" --user=root --auth-root-authentication-method=socket \
	--skip-test-db >"$D/mariadb-install.log" 2>&1 || die "mariadb-install-db failed: $D/mariadb-install.log"
/usr/sbin/mariadbd --no-defaults --user=root --datadir="$D/db" --socket="$D/mysqld.sock" \
	--bind-address=127.0.0.1 --port="$DB_PORT" --pid-file="$D/mariadbd.pid" \
	--log-error="$D/mariadbd.log" --innodb-buffer-pool-size=32M --skip-log-bin \
	--innodb-flush-log-at-trx-commit=0 --skip-name-resolve >>"$D/mariadbd.log" 2>&1 &
wait_for 30 MariaDB mariadb --no-defaults --socket="$D/mysqld.sock" -e "select 1"
mariadb --no-defaults --socket="$D/mysqld.sock" -e "
  CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

# ---- slurm.conf / slurmdbd.conf ---------------------------------------------------------
mkdir -p /etc/slurm
cat >"$CONF" <<EOF
$MARK — a single-host test cluster, see cluster/slurm_up.sh
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again after cred_expire s (default 120; short for tests).
AuthInfo=cred_expire=10
StateSaveLocation=$D/ctld
SlurmdSpoolDir=$D/d-%n
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd-%n.pid
SlurmctldLogFile=$D/slurmctld.log
SlurmdLogFile=$D/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=10
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
JobRequeue=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=n1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=${NODE_PORTS[0]} CPUs=$NODE_CPUS RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=${NODE_PORTS[1]} CPUs=$NODE_CPUS RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
cat >/etc/slurm/slurmdbd.conf <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$D/slurmdbd.pid
LogFile=$D/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
chmod 600 /etc/slurm/slurmdbd.conf

# ---- daemons -----------------------------------------------------------------------------
/usr/sbin/slurmdbd
wait_for 30 slurmdbd bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT"
timeout 20 sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
/usr/sbin/slurmctld -i
wait_for 30 slurmctld timeout 5 scontrol ping
/usr/sbin/slurmd -N n1
/usr/sbin/slurmd -N n2
# Both nodes idle and the accounting database answering.
nodes_idle() { [[ $(sinfo -h -N -o '%N %T' | grep -c ' idle$') == 2 ]]; }
wait_for 30 "the nodes n1, n2" nodes_idle
wait_for 20 sacct timeout 5 sacct -n -X -a
say "up in $((SECONDS - t0))s: nodes n1, n2 (partition debug), state in $D"
