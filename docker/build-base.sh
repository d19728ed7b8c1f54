#!/usr/bin/env bash
# Build a minimal local Debian bookworm + Python 3.11 base image without pulling from any registry.
#
#   sudo docker/build-base.sh [TAG]          # default TAG: atlasgs-base:bookworm
#
# debootstrap (minbase variant) fetches Debian's own packages from MIRROR into a temporary root file system, which
# is then imported with `docker import`. The result plays the role of python:3.11-slim-bookworm: Debian 12's
# python3.11 (3.11.2), venv, CA certificates, nothing else. Needs root, debootstrap and a running docker daemon.
# Environment: MIRROR (default http://deb.debian.org/debian), KEEP_ROOTFS=1 keeps the root file system.
set -euo pipefail

TAG="${1:-atlasgs-base:bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
PACKAGES="python3.11,python3.11-venv,python3-venv,ca-certificates"

command -v debootstrap >/dev/null || { echo "build-base.sh: debootstrap not found (apt-get install debootstrap)" >&2; exit 2; }
command -v docker >/dev/null || { echo "build-base.sh: docker not found" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "build-base.sh: debootstrap needs root" >&2; exit 2; }

ROOTFS="$(mktemp -d "${TMPDIR:-/tmp}/atlasgs-rootfs.XXXXXX")"
cleanup() { [ "${KEEP_ROOTFS:-0}" = 1 ] || rm -rf "$ROOTFS"; }
trap cleanup EXIT

debootstrap --variant=minbase --include="$PACKAGES" bookworm "$ROOTFS" "$MIRROR"

# Slim it the way the official slim images do: no apt lists, docs, man pages or caches.
chroot "$ROOTFS" apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/usr/share/doc/* \
       "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/var/log/*.log "$ROOTFS"/tmp/*
# Keep the security mirror configured for anyone who builds on top of this image.
cat > "$ROOTFS/etc/apt/sources.list" <<LIST
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
LIST

tar -C "$ROOTFS" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    --message "debootstrap bookworm minbase + python3.11 (atlasgs-bids docker/build-base.sh)" \
    - "$TAG"
docker run --rm --network none "$TAG" python3 -c 'import sys, venv, ssl; print("base ok:", sys.version.split()[0])'
