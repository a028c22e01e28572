#!/usr/bin/env bash
# Make the images the compose files name, in the Docker that DOCKER_HOST points at, when they
# cannot be pulled (no registry reachable: offline or air-gapped hosts, this project's CI):
#   python:3.11.11-slim-bookworm  Debian bookworm minbase + python3, python3-venv, python-is-python3
#   redis:7.4.2-bookworm          that base + Debian's redis-server (runs as user redis, /data)
#   prom/prometheus:v3.1.0        that base + Debian's prometheus (entrypoint: the binary)
#   rabbitmq:3.13.7               that base + Debian's rabbitmq-server (user rabbitmq)
# They stand in for the real images under the same names, in a private daemon only (the tier's
# own dockerd): the versions are Debian's (Python 3.11.2, Redis 7.0, Prometheus 2.42,
# RabbitMQ 3.10), not the
# tags'. Each is labelled with a hash of its inputs and rebuilt only when they change.
#   scripts/make-base-images.sh CACHE_DIR [IMAGE...]   (default: all four)
# CACHE_DIR keeps the debootstrap root file system as a tarball, keyed by the same hash.
# This machine's extra CA certificates (/usr/local/share/ca-certificates, e.g. a TLS-inspecting
# egress proxy's) are copied into the base at build time, never into the repository, so pip and
# apt inside image builds verify TLS as the host does.
set -euo pipefail
cache=${1:?usage: make-base-images.sh CACHE_DIR [IMAGE...]}
shift
wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=(python redis prometheus rabbitmq)
docker=${DOCKER:-/usr/bin/docker}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
packages=python3,python3-venv,python-is-python3,ca-certificates
certs=/usr/local/share/ca-certificates
mkdir -p "$cache"
export DOCKER_BUILDKIT=0

log() { echo "make-base-images: $*" >&2; }

# Inputs that decide an image: this script, the suite and packages, the extra CA certificates.
inputs_hash() {
  { cat "$0"; echo "$suite $packages $mirror"; find "$certs" -type f -name '*.crt' -print0 2>/dev/null |
      sort -z | xargs -0r cat; } | sha256sum | cut -c1-16
}
hash=$(inputs_hash)

current() {  # current IMAGE: true when IMAGE exists and was made from these inputs
  [ "$("$docker" image inspect -f '{{ index .Config.Labels "org.batchvision.inputs" }}' "$1" 2>/dev/null)" = "$hash" ]
}

pulled() {  # pulled IMAGE: the real image, when a registry answers within a minute
  timeout 60 "$docker" pull -q "$1" >/dev/null 2>&1
}

python_base() {
  local name=python:3.11.11-slim-bookworm
  if current "$name"; then return; fi
  # A real image that was pulled before carries no label: keep it.
  if "$docker" image inspect "$name" >/dev/null 2>&1 &&
     [ -z "$("$docker" image inspect -f '{{ index .Config.Labels "org.batchvision.inputs" }}' "$name")" ]; then
    return
  fi
  if pulled "$name"; then log "pulled $name"; return; fi
  local tarball="$cache/rootfs-$suite-$hash.tar"
  if [ ! -s "$tarball" ]; then
    local root
    root=$(mktemp -d "$cache/rootfs.XXXXXX")
    log "debootstrap $suite ($packages) into $root"
    debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" >"$root.log" 2>&1 ||
      { tail -n 20 "$root.log" >&2; rm -rf "$root" "$root.log"; exit 1; }
    # Package installs in derived images start no services (invoke-rc.d asks this script).
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"
    # Smaller: no apt lists or package archives, no docs or man pages.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb \
      "$root"/usr/share/doc/* "$root"/usr/share/man/*
    tar -C "$root" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$root" "$root.log"
    # Older tarballs of other inputs are of no more use.
    find "$cache" -maxdepth 1 -name "rootfs-$suite-*.tar" ! -name "$(basename "$tarball")" -delete
  fi
  log "import $tarball"
  "$docker" import -c 'CMD ["python3"]' -c 'ENV LANG=C.UTF-8' "$tarball" "batchvision-test/minbase:$hash" >/dev/null
  local ctx
  ctx=$(mktemp -d)
  mkdir -p "$ctx/certs"
  find "$certs" -type f -name '*.crt' -exec cp {} "$ctx/certs/" \; 2>/dev/null || true
  cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM batchvision-test/minbase:$hash
COPY certs/ /usr/local/share/ca-certificates/
RUN update-ca-certificates >/dev/null
LABEL org.batchvision.inputs=$hash
DOCKERFILE
  "$docker" build -q -t "$name" "$ctx" >/dev/null
  rm -rf "$ctx"
  log "made $name"
}

# derived NAME DOCKERFILE-BODY: an image FROM the python base, built with the host's network.
derived() {
  local name=$1 body=$2
  if current "$name"; then return; fi
  if pulled "$name"; then log "pulled $name"; return; fi
  python_base
  local ctx
  ctx=$(mktemp -d)
  printf 'FROM python:3.11.11-slim-bookworm\n%s\nLABEL org.batchvision.inputs=%s\n' "$body" "$hash" >"$ctx/Dockerfile"
  "$docker" build -q --network host -t "$name" "$ctx" >/dev/null
  rm -rf "$ctx"
  log "made $name"
}

apt_install='RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends'
apt_clean='&& apt-get clean && rm -rf /var/lib/apt/lists/*'

for image in "${wanted[@]}"; do
  case "$image" in
    python) python_base ;;
    redis) derived redis:7.4.2-bookworm "$apt_install redis-server >/dev/null $apt_clean \\
 && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD [\"redis-server\"]" ;;
    prometheus) derived prom/prometheus:v3.1.0 "$apt_install prometheus >/dev/null $apt_clean \\
 && mkdir -p /prometheus && chown nobody:nogroup /prometheus
WORKDIR /prometheus
USER nobody
EXPOSE 9090
ENTRYPOINT [\"/usr/bin/prometheus\"]
CMD [\"--config.file=/etc/prometheus/prometheus.yml\", \"--storage.tsdb.path=/prometheus\"]" ;;
    # The official image's entrypoint turns RABBITMQ_DEFAULT_USER/PASS into the node's default
    # user; this one does the same with a conf.d file, then runs the command as user rabbitmq.
    rabbitmq) derived rabbitmq:3.13.7 "$apt_install rabbitmq-server >/dev/null $apt_clean \\
 && mkdir -p /etc/rabbitmq/conf.d && chown -R rabbitmq:rabbitmq /etc/rabbitmq /var/lib/rabbitmq \\
 && printf '%s\\n' '#!/bin/sh' 'set -e' \\
      'if [ -n \"\$RABBITMQ_DEFAULT_USER\" ] && [ -n \"\$RABBITMQ_DEFAULT_PASS\" ]; then' \\
      '  printf \"default_user = %s\\\\ndefault_pass = %s\\\\n\" \"\$RABBITMQ_DEFAULT_USER\" \"\$RABBITMQ_DEFAULT_PASS\" >/etc/rabbitmq/conf.d/10-default-user.conf' \\
      'fi' 'exec \"\$@\"' >/usr/local/bin/docker-entrypoint.sh \\
 && chmod 755 /usr/local/bin/docker-entrypoint.sh
ENV HOME=/var/lib/rabbitmq
USER rabbitmq
EXPOSE 5672
ENTRYPOINT [\"docker-entrypoint.sh\"]
CMD [\"rabbitmq-server\"]" ;;
    *) echo "make-base-images: unknown image $image (python, redis, prometheus, rabbitmq)" >&2; exit 2 ;;
  esac
done
