#!/usr/bin/env bash
# Start a private dockerd for the container test tier (tests/containers/) and wait until it
# answers. Everything it owns lives under STATE (its socket, pid file, exec root, log) and
# DATA_ROOT (images, layers, volumes), so it never touches a system Docker.
#   scripts/start-dockerd.sh STATE DATA_ROOT   -> prints the DOCKER_HOST to use
# Networking is chosen so the machine's forwarding stays as it was:
# - --iptables=false: dockerd would otherwise set the iptables FORWARD policy to DROP, which
#   breaks the network-namespace tests (tests/integration/test_multihost.py). Containers on one
#   compose network still reach each other by name over the bridge, and ports published on the
#   host are served by docker-proxy (userland), which needs no iptables rule. Builds use
#   --network host, since without NAT the bridge has no way out.
# - --bridge=none: no docker0; compose makes its own bridges from the address pool below,
#   10.214.0.0/16, kept apart from the multi-host tests' 10.213.x.0/24 (batchvision/cli/netns.py).
set -euo pipefail
state=${1:?usage: start-dockerd.sh STATE DATA_ROOT}
data_root=${2:?usage: start-dockerd.sh STATE DATA_ROOT}
mkdir -p "$state/exec" "$data_root"
sock="$state/docker.sock"
# Debian's dockerd (docker.io) and its client: the docker first on PATH may be a newer client.
dockerd=${DOCKERD:-/usr/sbin/dockerd}
docker=${DOCKER:-/usr/bin/docker}
"$dockerd" \
  --data-root "$data_root" \
  --exec-root "$state/exec" \
  --pidfile "$state/dockerd.pid" \
  --host "unix://$sock" \
  --iptables=false \
  --ip-masq=false \
  --ip-forward=false \
  --bridge=none \
  --default-address-pool base=10.214.0.0/16,size=24 \
  --storage-driver overlay2 \
  >"$state/dockerd.log" 2>&1 &
for _ in $(seq 1 300); do
  if DOCKER_HOST="unix://$sock" "$docker" version >/dev/null 2>&1; then
    echo "unix://$sock"
    exit 0
  fi
  if ! kill -0 $! 2>/dev/null; then
    echo "dockerd exited; its log ($state/dockerd.log):" >&2
    tail -n 30 "$state/dockerd.log" >&2
    exit 1
  fi
  sleep 0.2
done
echo "dockerd did not answer on $sock within 60 s; its log: $state/dockerd.log" >&2
exit 1
