#!/usr/bin/env bash
# The simulated dmoe swarm in Docker, in one command.
#
#   deploy/swarm.sh up [--detach] [--no-monitoring] [--tls] [--scale SERVICE=N ...]
#   deploy/swarm.sh status | logs [SERVICE] | down
#
# `up` makes sure Docker and Compose are there (installing them on Debian as root),
# builds the images (from the registry when one answers; otherwise from a local base
# image and the CPU torch wheel, see deploy/offline/), starts the swarm with Prometheus
# (and Grafana when its image can be had), waits until every container is healthy,
# prints where to look, then follows the trainers' logs (Ctrl-C stops following; the
# swarm keeps running until `deploy/swarm.sh down`).
#
# --tls (or DMOE_TLS=1): a private swarm over mutual TLS. Makes deploy/tls/certs/ when
# missing (deploy/tls/make_certs.py: a CA and a pair per service, plus `client` for your own
# tools; needs Python's cryptography on this host) and adds deploy/docker-compose.tls.yml.
set -euo pipefail
cd "$(dirname "$0")/.."

project=${DMOE_PROJECT:-dmoe}
files=(-f deploy/docker-compose.yml)
export DMOE_TAG=${DMOE_TAG:-latest}
tls=${DMOE_TLS:-}
tls_dir=deploy/tls/certs
tls_services=(dht-bootstrap dht expert trainer explorer)

compose_cmd() {
  local compose
  compose=$(deploy/offline/ensure-docker.sh | tail -n1)
  # shellcheck disable=SC2086
  $compose -p "$project" "${files[@]}" "$@"
}

registry_reachable() {
  timeout 60 docker pull -q python:3.11-slim >/dev/null 2>&1
}

build_images() {
  if [ -n "${DMOE_OFFLINE:-}" ] || ! registry_reachable; then
    echo "no container registry reachable: building images offline" >&2
    deploy/offline/build-images.sh "$DMOE_TAG"
    export DMOE_PROMETHEUS_IMAGE=${DMOE_PROMETHEUS_IMAGE:-dmoe-prometheus:$DMOE_TAG}
    OFFLINE=1
  else
    compose_cmd build
    OFFLINE=
  fi
}

make_certs() {
  if ! python3 -c 'import cryptography' 2>/dev/null; then
    echo "--tls makes certificates with Python's cryptography package:" \
      "pip install cryptography (or apt-get install python3-cryptography)" >&2
    exit 1
  fi
  python3 deploy/tls/make_certs.py "$tls_dir" --names "${tls_services[@]}" client
  # Keys are 0600 and the containers run as uid 10001 (deploy/Dockerfile): hand them the
  # services' keys (through a container, so this works without root too).
  local keys=() name
  for name in "${tls_services[@]}"; do keys+=("/certs/$name.key"); done
  docker run --rm --user 0 --entrypoint chown -v "$PWD/$tls_dir:/certs" \
    "dmoe-dht:$DMOE_TAG" 10001 "${keys[@]}"
}

wait_healthy() {
  local deadline=$((SECONDS + ${DMOE_UP_TIMEOUT:-300})) ids states
  while [ $SECONDS -lt $deadline ]; do
    ids=$(compose_cmd ps -q)
    states=$(docker inspect -f '{{.Name}} {{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' $ids)
    if ! grep -qvE ' (healthy|running)$' <<<"$states"; then
      echo "$states" | sed 's#^/##'
      return 0
    fi
    sleep 3
  done
  echo "not healthy after ${DMOE_UP_TIMEOUT:-300}s:" >&2
  echo "$states" | sed 's#^/##' >&2
  return 1
}

cmd=${1:-up}
shift || true
if [ -n "$tls" ] && [ "$cmd" != up ]; then files+=(-f deploy/docker-compose.tls.yml); fi
case "$cmd" in
  up)
    detach= monitoring=1 scale=()
    while [ $# -gt 0 ]; do
      case "$1" in
        --detach|-d) detach=1 ;;
        --no-monitoring) monitoring= ;;
        --tls) tls=1 ;;
        --scale) scale+=(--scale "$2"); shift ;;
        --scale=*) scale+=(--scale "${1#--scale=}") ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
      esac
      shift
    done
    build_images
    if [ -n "$tls" ]; then
      make_certs
      files+=(-f deploy/docker-compose.tls.yml)
    fi
    services=(dht-bootstrap dht expert trainer explorer)
    profile=()
    if [ -n "$monitoring" ]; then
      profile=(--profile monitoring)
      services+=(prometheus)
      if [ -z "$OFFLINE" ] || docker image inspect "${DMOE_GRAFANA_IMAGE:-grafana/grafana:11.1.0}" >/dev/null 2>&1; then
        services+=(grafana)
      else
        echo "Grafana's image cannot be had offline: starting Prometheus only" >&2
      fi
    fi
    # Compose v1 sometimes races creating scaled replicas behind a health condition: `up` again
    compose_cmd "${profile[@]}" up -d --no-build "${scale[@]}" "${services[@]}" ||
      compose_cmd "${profile[@]}" up -d --no-build "${scale[@]}" "${services[@]}"
    wait_healthy
    echo
    echo "swarm is up.  Explorer: http://localhost:${DMOE_EXPLORER_PORT:-8080}" \
      " Prometheus: http://localhost:${DMOE_PROMETHEUS_PORT:-9090}" \
      "$([[ " ${services[*]} " == *" grafana "* ]] && echo " Grafana: http://localhost:${DMOE_GRAFANA_PORT:-3000}")"
    [ -z "$tls" ] || echo "mutual TLS on every gRPC port; a client certificate: $tls_dir/client.{crt,key}, CA $tls_dir/ca.crt, server name dmoe"
    echo "stop it with: deploy/swarm.sh down"
    if [ -z "$detach" ]; then
      compose_cmd logs -f --tail 20 trainer
    fi
    ;;
  status) compose_cmd --profile monitoring ps ;;
  logs) compose_cmd --profile monitoring logs -f --tail 50 "$@" ;;
  down) compose_cmd --profile monitoring down --remove-orphans "$@" ;;
  *) echo "usage: deploy/swarm.sh up|status|logs|down" >&2; exit 2 ;;
esac
