#!/usr/bin/env bash
# Makes this machine ready to build, test and run billy-tools: Debian packages, a Docker
# daemon that answers, the embedded image registry when docker-registry is installed, and
# .venv with the project installed. Idempotent: a second run only checks. CI calls it on a
# fresh clone as root with no daemon running.
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

# gVisor: tools whose ToolSpec says `runtime: runsc` run in its user-space kernel. The
# runtime is registered for a local daemon only; docs/gvisor.md says how to do it elsewhere.
runsc_binary=/usr/bin/runsc
daemon_json=${BILLY_DOCKER_DAEMON_JSON:-/etc/docker/daemon.json}
runsc_reload_wait_s=${BILLY_RUNSC_RELOAD_WAIT_S:-20}

runsc_wanted() {
  [ -x "$runsc_binary" ] && [ -z "${DOCKER_HOST:-}" ] && [ "$(id -u)" = 0 ]
}

# Adds the "runsc" runtime to daemon.json, keeping every other key. Without
# --network=none, this runsc (a 2022 release) fails to start containers here and leaves
# an untracked sandbox process behind. An existing "runsc" entry is the admin's: kept.
register_runsc() {
  runsc_wanted || return 0
  mkdir -p "$(dirname "$daemon_json")"
  "$(find_python)" - "$daemon_json" "$runsc_binary" <<'PY' || fail "cannot register runsc in $daemon_json"
import json, os, sys

path, binary = sys.argv[1], sys.argv[2]
wanted = {"path": binary, "runtimeArgs": ["--network=none"]}
try:
    with open(path) as file:
        config = json.load(file)
except FileNotFoundError:
    config = {}
except (OSError, ValueError) as exc:
    sys.exit(f"setup: error: {path} is not readable JSON ({exc}); fix it first")
runtimes = config.setdefault("runtimes", {})
if runtimes.get("runsc") == wanted:
    print(f"setup: gvisor: runsc is registered in {path}")
    sys.exit(0)
if "runsc" in runtimes:
    print(f"setup: gvisor: {path} has its own runsc entry {runtimes['runsc']}; kept "
          f"(this machine needs runtimeArgs ['--network=none'])")
    sys.exit(0)
runtimes["runsc"] = wanted
# Written next to the file, then renamed: dockerd never reads half a file.
temporary = f"{path}.billy-tmp"
with open(temporary, "w") as file:
    json.dump(config, file, indent=2)
    file.write("\n")
os.chmod(temporary, 0o644)
os.replace(temporary, path)
print(f"setup: gvisor: registered runsc ({binary} --network=none) in {path}")
PY
}

docker_has_runsc() {
  timeout 10 docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"'
}

# A dockerd started by this script read daemon.json at start; one already running
# reloads `runtimes` on SIGHUP, without a restart that would stop running containers.
reload_runsc() {
  if ! runsc_wanted; then
    [ -x "$runsc_binary" ] || say "gvisor: runsc is not installed; tools asking for it cannot run"
    [ -x "$runsc_binary" ] && say "gvisor: not registering runsc (DOCKER_HOST set or not root)"
    return 0
  fi
  if docker_has_runsc; then
    say "gvisor: the daemon lists the runsc runtime"
    return
  fi
  local pid deadline=$((SECONDS + runsc_reload_wait_s))
  pid=$(cat /var/run/docker.pid 2>/dev/null || true)
  if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
    say "gvisor: no local dockerd pid in /var/run/docker.pid; reload the daemon to get runsc"
    return
  fi
  say "gvisor: SIGHUP to dockerd (pid $pid) to load the runsc runtime"
  kill -HUP "$pid"
  until docker_has_runsc; do
    [ $SECONDS -lt $deadline ] ||
      fail "dockerd does not list runsc ${runsc_reload_wait_s} s after SIGHUP; see its log"
    sleep 0.5
  done
  say "gvisor: the daemon lists the runsc runtime"
}

# The embedded registry: Debian's docker-registry on 127.0.0.1, storing under .billy. Docker
# talks plain HTTP to registries on 127.0.0.0/8 without any daemon configuration.
registry_addr=${BILLY_EMBEDDED_REGISTRY:-127.0.0.1:5000}
registry_dir=$state_dir/registry
registry_wait_s=${BILLY_REGISTRY_WAIT_S:-20}

# `GET /v2/` over bash's /dev/tcp: curl may not be installed on a fresh machine.
registry_answers() {
  local status
  status=$(timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2" &&
    printf "GET /v2/ HTTP/1.0\r\nHost: %s:%s\r\n\r\n" "$1" "$2" >&3 && head -n 1 <&3' \
    _ "${registry_addr%:*}" "${registry_addr##*:}" 2>/dev/null) || return 1
  [[ $status == "HTTP/1."?" 200"* ]]
}

registry_port_taken() {
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "${registry_addr%:*}" "${registry_addr##*:}" \
    2>/dev/null
}

write_registry_config() {
  mkdir -p "$registry_dir/storage"
  cat >"$registry_dir/config.yml" <<EOF
# Written by scripts/setup.sh: the embedded registry of billy-tools' tool images.
version: 0.1
log:
  level: warn
  fields: {service: billy-registry}
storage:
  filesystem: {rootdirectory: "$registry_dir/storage"}
  delete: {enabled: true}
http:
  addr: "$registry_addr"
EOF
}

# `make images` pushes to the address in $registry_dir/address; no file, no push.
start_registry() {
  mkdir -p "$registry_dir"
  rm -f "$registry_dir/address"
  if [ ! -x /usr/bin/docker-registry ]; then
    say "registry: docker-registry is not installed; tool images stay local"
    return
  fi
  if registry_answers; then
    say "registry: $registry_addr answers"
    echo "$registry_addr" >"$registry_dir/address"
    return
  fi
  if registry_port_taken; then
    say "registry: $registry_addr is in use by something that is not a registry; not started"
    return
  fi
  write_registry_config
  say "registry: starting docker-registry on $registry_addr (log: $registry_dir/registry.log)"
  setsid nohup /usr/bin/docker-registry serve "$registry_dir/config.yml" \
    >>"$registry_dir/registry.log" 2>&1 </dev/null &
  local pid=$! deadline=$((SECONDS + registry_wait_s))
  echo "$pid" >"$registry_dir/registry.pid"
  until registry_answers; do
    kill -0 "$pid" 2>/dev/null || fail "docker-registry exited; last lines of $registry_dir/registry.log:
$(tail -n 20 "$registry_dir/registry.log")"
    [ $SECONDS -lt $deadline ] ||
      fail "docker-registry did not answer on $registry_addr within ${registry_wait_s} s"
    sleep 0.2
  done
  say "registry: docker-registry (pid $pid) answers on $registry_addr"
  echo "$registry_addr" >"$registry_dir/address"
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
register_runsc
start_docker
reload_runsc
start_registry
install_venv
say "ready"
