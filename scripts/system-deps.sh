#!/usr/bin/env bash
# Install the Debian packages the test suite uses, if missing and if we may (root + apt).
set -euo pipefail
need=()
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# prometheus and promtool: the alert rules' unit tests and the real-Prometheus test.
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || need+=(prometheus)
# ip (iproute2): the multi-host tests build network namespaces.
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# rabbitmq-server: the RabbitMQ variants of the reliability suite start their own
# node from Debian's package (batchvision/cli/rabbitmq_server.py), never the system's service.
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need+=(rabbitmq-server)
# The container tier (tests/containers/): Debian's Docker engine and client (a private dockerd
# the tests start; installing it starts none), debootstrap for base images where no registry
# answers, and what the compose quickstart runs (openssl, curl).
{ [ -x /usr/sbin/dockerd ] && [ -x /usr/bin/docker ]; } || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: missing ${need[*]}; install them to run every test" >&2
  exit 0
fi
echo "system-deps: apt-get install ${need[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
