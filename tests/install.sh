#!/usr/bin/env bash
# Everything the test suite needs on a fresh machine: the pinned Python packages (into
# whichever python3 runs this: a virtual environment's or the system's) and a real
# single-node SLURM with munge, which tests/slurm_cluster.py starts and stops itself.
# Run as root or with sudo; the package registries must be reachable. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements.txt -r tests/requirements.txt
have() { PATH="$PATH:/usr/sbin" command -v "$1" >/dev/null; }
if ! { have sbatch && have slurmctld && have slurmd && have munged; }; then
  export DEBIAN_FRONTEND=noninteractive
  apt="apt-get"; [ "$(id -u)" = 0 ] || apt="sudo -E apt-get"
  pkgs="slurmctld slurmd slurm-client munge"
  echo "installing SLURM for the tests: $pkgs" >&2
  $apt install -y -qq $pkgs >/dev/null 2>&1 || { $apt update -qq && $apt install -y -qq $pkgs >/dev/null; }
fi
