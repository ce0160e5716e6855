#!/usr/bin/env bash
# Make a Docker engine and Compose available (CI here, fresh Debian hosts).
# Installs docker.io, docker-compose and debootstrap with apt when they are missing
# (needs root), starts dockerd in the background when no engine answers, and waits
# until `docker info` works. Prints the compose command to use on its last line.
set -euo pipefail

need=()
# the engine, not only a client: some hosts ship a bare docker CLI without dockerd
if ! command -v docker >/dev/null || { ! docker info >/dev/null 2>&1 && ! command -v dockerd >/dev/null; }; then
  need+=(docker.io)
fi
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
  need+=(docker-compose)
fi
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing ${need[*]}: install them (as root: apt-get install -y ${need[*]})" >&2
    exit 1
  fi
  echo "installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "no Docker engine answers and this user cannot start one" >&2
    exit 1
  fi
  echo "starting dockerd" >&2
  nohup dockerd >/tmp/dmoe-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start: see /tmp/dmoe-dockerd.log" >&2; exit 1; }
fi

if docker compose version >/dev/null 2>&1; then echo "docker compose"; else echo "docker-compose"; fi
