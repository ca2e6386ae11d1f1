#!/bin/sh
# Token budget: install what the project needs to build and test.
# Idempotent: a second run installs nothing new and returns quickly.

set -e

cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive

pkgs="build-essential clang libclang-rt-14-dev nginx nginx-dev \
    libyajl-dev zlib1g-dev libpcre2-dev libssl-dev perl libjson-pp-perl \
    curl wrk redis-server redis-tools"

command -v node >/dev/null 2>&1 || pkgs="$pkgs nodejs"
command -v npm >/dev/null 2>&1 || pkgs="$pkgs npm"

missing=""
for p in $pkgs; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null \
         | grep -q '^install ok installed$'
    then
        missing="$missing $p"
    fi
done

if [ -n "$missing" ]; then
    echo "deps: installing$missing"

    # Debian starts nginx and redis on install; keep them from starting.
    # A policy-rc.d that refuses every start works without systemd too.
    policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        trap 'rm -f $policy' EXIT
        trap 'exit 1' INT TERM
        printf '#!/bin/sh\nexit 101\n' > $policy
        chmod 755 $policy
    fi

    apt-get update -q
    apt-get install -y -q --no-install-recommends $missing

    if [ -n "$policy" ]; then
        trap - EXIT INT TERM
        rm -f $policy
    fi
fi

# Stop a system nginx on port 80 if something started one anyway; the
# tests run their own nginx instances on free ports.
if [ -e /run/nginx.pid ] && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null; then
    echo "deps: stopping the system nginx"
    service nginx stop >/dev/null 2>&1 \
        || /usr/sbin/nginx -s stop >/dev/null 2>&1 || true
fi
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now nginx >/dev/null 2>&1 || true
fi
update-rc.d nginx disable >/dev/null 2>&1 || true

# The e2e clients are real provider SDKs from npm.
if [ -f t/e2e/package.json ]; then
    if [ ! -d t/e2e/node_modules ] \
       || [ t/e2e/package-lock.json -nt t/e2e/node_modules/.package-lock.json ]
    then
        (cd t/e2e && npm ci --no-audit --no-fund --loglevel=error)
    fi
fi
