#!/usr/bin/env bash
# Builds billy/busybox:local, a 2 MB image holding only Debian's static busybox, for
# small tools and tests, without any registry.
set -euo pipefail
image=${1:-billy/busybox:local}
if docker image inspect "$image" >/dev/null 2>&1; then
  echo "busybox image $image present"
  exit 0
fi
# FROM scratch has no libc: only a statically linked busybox runs there.
if LC_ALL=C ldd /bin/busybox >/dev/null 2>&1; then
  echo "/bin/busybox is dynamically linked; install Debian's busybox-static" >&2
  exit 1
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/bin" "$ctx/rootfs/tmp" "$ctx/rootfs/etc"
cp /bin/busybox "$ctx/rootfs/bin/busybox"
for applet in $("$ctx/rootfs/bin/busybox" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$ctx/rootfs/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' \
  >"$ctx/rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$ctx/rootfs/etc/group"
tar -C "$ctx/rootfs" -c . | docker import --change 'ENV PATH=/bin' \
  --change 'CMD ["sh"]' - "$image" >/dev/null
echo "built $image"
