#!/usr/bin/env bash
# System services the test suite needs, installed and started idempotently.
#   scripts/services.sh install   install slurm-wlm, munge and openmpi-bin (Debian; needs root)
#   scripts/services.sh munge     make sure a munge daemon is running (SLURM's authentication)
#   scripts/services.sh containers  install podman, buildah, runc and debootstrap (scripts/container_test.sh)
# No systemd runs on CI machines, so nothing starts by itself.
set -euo pipefail

case "${1:-}" in
install)
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v mpirun >/dev/null; then
        if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
            echo "services: missing; install them (Debian: apt-get install slurm-wlm munge openmpi-bin)" >&2
            exit 1
        fi
        echo "services: installing slurm-wlm, munge and openmpi-bin" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge openmpi-bin >/dev/null
    fi
    ;;
munge)
    mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
    [ -f /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    if ! pgrep -x munged >/dev/null; then
        su -s /bin/sh munge -c /usr/sbin/munged
    fi
    ;;
containers)
    if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null || ! command -v runc >/dev/null; then
        if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
            echo "services: missing; install them (Debian: apt-get install podman buildah runc debootstrap)" >&2
            exit 1
        fi
        echo "services: installing podman, buildah, runc and debootstrap" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc debootstrap >/dev/null
    fi
    ;;
*)
    echo "usage: $0 install|munge|containers" >&2
    exit 2
    ;;
esac
