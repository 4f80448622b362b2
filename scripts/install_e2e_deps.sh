#!/usr/bin/env bash
# Installs the programs the e2e tests start, from Debian's packages: Prometheus (with promtool),
# Chromium (headless dashboard test), nginx (the deploy/nginx config test) and amtool (the
# deploy/alertmanager config test, from Debian's prometheus-alertmanager).
# Idempotent: does nothing when they are all present. Where it cannot install (no root, no
# apt-get), it says so and exits 0: those tests then skip, except under CI=true where they fail.
set -euo pipefail

need=()
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
command -v amtool >/dev/null 2>&1 || need+=(prometheus-alertmanager)

if [ ${#need[@]} -eq 0 ]; then
    echo "e2e dependencies present: prometheus, promtool, chromium, nginx, amtool"
    exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        echo "install_e2e_deps: missing ${need[*]}, and no root to install them; the e2e tests will skip" >&2
        exit 0
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_e2e_deps: missing ${need[*]}, and no apt-get; install them by hand" >&2
    exit 0
fi

echo "install_e2e_deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
# The packages' service scripts would start daemons; the tests start their own on loopback ports.
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
for daemon in prometheus nginx prometheus-alertmanager; do
    if pgrep -x "${daemon:0:15}" >/dev/null 2>&1 && [ -x "/etc/init.d/$daemon" ]; then
        "${sudo[@]}" "/etc/init.d/$daemon" stop >/dev/null 2>&1 || true
    fi
done
