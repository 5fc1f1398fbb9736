#!/usr/bin/env bash
# Builds billy/base:bookworm, a minimal Debian with python3, without any registry:
# debootstrap into a temporary folder, then `docker import`. Users with a registry use
# the pinned public image named in each Dockerfile's BASE argument instead.
set -euo pipefail
image=${1:-billy/base:bookworm}
mirror=${DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit} /^deb / {print $2; exit}' \
  /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n 1)}
mirror=${mirror:-http://deb.debian.org/debian}

if docker image inspect "$image" >/dev/null 2>&1; then
  echo "base image $image present"
  exit 0
fi
root=$(mktemp -d)
trap 'rm -rf "$root" "$root.log"' EXIT
echo "building $image with debootstrap from $mirror (about a minute)"
debootstrap --variant=minbase --include=python3,ca-certificates bookworm "$root" "$mirror" \
  >"$root.log" 2>&1 || { tail -n 20 "$root.log"; exit 1; }
# Shrink: docs, caches and apt lists are of no use inside a tool image.
rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/var/cache/apt/* \
  "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' - "$image" >/dev/null
echo "built $image"
