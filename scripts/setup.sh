#!/usr/bin/env bash
# Makes this machine ready to build, test and run billy-tools: Debian packages, a Docker
# daemon that answers, and .venv with the project installed. Idempotent: a second run
# only checks. CI calls it on a fresh clone as root with no daemon running.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
state_dir=${BILLY_STATE_DIR:-$repo/.billy}
docker_wait_s=${BILLY_DOCKER_WAIT_S:-60}
venv=$repo/.venv
stamp=$venv/.billy-installed

say() { printf 'setup: %s\n' "$*"; }
fail() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# Debian package -> a file it installs; the file's presence means "installed".
declare -A required=(
  [docker.io]=/usr/sbin/dockerd
  [nats-server]=/usr/sbin/nats-server
  [busybox-static]=/bin/busybox
  [debootstrap]=/usr/sbin/debootstrap
)
# Needed by later features (gVisor runtime, a local registry); installed when available.
declare -A optional=(
  [runsc]=/usr/bin/runsc
  [docker-registry]=/usr/bin/docker-registry
)

missing_packages() {
  local -n packages=$1
  local name
  for name in "${!packages[@]}"; do
    [ -e "${packages[$name]}" ] || echo "$name"
  done | sort
}

is_debian() { [ -r /etc/debian_version ] && command -v apt-get >/dev/null; }

install_packages() {
  local missing optional_missing available=() name policy
  missing=$(missing_packages required)
  # busybox-static is only needed for its static binary; a dynamic busybox will not do.
  if [ -z "$missing" ] && ! file_is_static /bin/busybox; then missing=busybox-static; fi
  optional_missing=$(missing_packages optional)
  if [ -z "$missing$optional_missing" ]; then
    say "packages: docker.io nats-server busybox-static debootstrap runsc docker-registry present"
    return
  fi
  if ! is_debian || [ "$(id -u)" != 0 ]; then
    [ -z "$missing" ] && { say "optional packages missing (not root/Debian): $optional_missing"; return; }
    fail "missing: $(echo $missing). Install them as root on Debian 12:
  apt-get update && apt-get install -y $(echo $missing $optional_missing)
(on other systems: Docker Engine, nats-server >= 2.9, a static busybox and debootstrap)"
  fi
  say "apt-get update"
  apt-get update -qq >/dev/null || fail "apt-get update failed"
  for name in $optional_missing; do
    # Captured first: grep -q closing the pipe early would fail it under pipefail.
    policy=$(apt-cache policy "$name" 2>/dev/null)
    if [[ $policy == *"Candidate: "[0-9]* ]]; then
      available+=("$name")
    else
      say "optional package $name is not available from apt; skipped"
    fi
  done
  say "apt-get install" $missing "${available[@]}" "(log: $state_dir/apt.log)"
  mkdir -p "$state_dir"
  # needrestart would otherwise restart services (dockerd among them) after the install.
  DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 \
    apt-get install -y -q --no-install-recommends $missing "${available[@]}" \
    >"$state_dir/apt.log" 2>&1 || fail "apt-get install failed; see $state_dir/apt.log"
}

file_is_static() { ! LC_ALL=C ldd "$1" >/dev/null 2>&1; }

docker_answers() { timeout 10 docker info >/dev/null 2>&1; }

wait_for_docker() {
  local deadline=$((SECONDS + docker_wait_s))
  until docker_answers; do
    if [ -n "${1:-}" ] && ! kill -0 "$1" 2>/dev/null; then
      fail "dockerd exited; last lines of $state_dir/dockerd.log:
$(tail -n 20 "$state_dir/dockerd.log")"
    fi
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.5
  done
}

start_docker() {
  if [ -n "${DOCKER_HOST:-}" ]; then
    docker_answers || fail "DOCKER_HOST=$DOCKER_HOST does not answer 'docker info'"
    say "docker: $DOCKER_HOST answers"
    return
  fi
  if docker_answers; then
    say "docker: daemon answers"
    return
  fi
  [ "$(id -u)" = 0 ] || fail "no Docker daemon answers; start one (e.g. 'sudo dockerd') or set DOCKER_HOST"
  # A pid file left by a daemon that was killed stops dockerd from starting.
  if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
    rm -f /var/run/docker.pid
  fi
  mkdir -p "$state_dir"
  say "docker: starting dockerd (log: $state_dir/dockerd.log)"
  setsid nohup dockerd >>"$state_dir/dockerd.log" 2>&1 </dev/null &
  local pid=$!
  wait_for_docker "$pid" || fail "dockerd did not answer within ${docker_wait_s} s; see $state_dir/dockerd.log"
  say "docker: dockerd (pid $pid) answers"
}

find_python() {
  local candidate
  for candidate in python3.11 /usr/bin/python3.11; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import ensurepip, venv' 2>/dev/null; then
      command -v "$candidate"
      return
    fi
  done
  fail "python3.11 with venv is missing; on Debian: apt-get install -y python3.11 python3.11-venv"
}

install_venv() {
  local wanted
  wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    say "venv: .venv is up to date with pyproject.toml"
    return
  fi
  if [ ! -x "$venv/bin/python" ]; then
    say "venv: creating .venv"
    "$(find_python)" -m venv "$venv"
  fi
  say "venv: pip install -e '.[dev]' (log: $state_dir/pip.log)"
  mkdir -p "$state_dir"
  "$venv/bin/python" -m pip install -e '.[dev]' >"$state_dir/pip.log" 2>&1 ||
    fail "pip install failed; last lines of $state_dir/pip.log:
$(tail -n 20 "$state_dir/pip.log")"
  echo "$wanted" >"$stamp"
}

install_packages
start_docker
install_venv
say "ready"
