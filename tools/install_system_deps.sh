#!/usr/bin/env bash
# Debian packages the project needs: Open MPI for `mpirun` launches and mpi4py's build.
set -euo pipefail
if command -v mpirun >/dev/null 2>&1 && command -v mpicc >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_system_deps: need Open MPI (Debian: apt-get install openmpi-bin libopenmpi-dev); skipping" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
