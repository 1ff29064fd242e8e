#!/usr/bin/env bash
# Checks packaging/plughost.service (and plughost.socket): `systemd-analyze verify` must print nothing (it exits 0 on misspelt
# keys and bad values and only says so on stderr), and the offline security exposure must stay at or
# under 7.5 (7.1 today). The unit's /usr/bin/plughost is pointed at the built binary for the check.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v systemd-analyze >/dev/null; then
    echo "scripts/check-unit.sh: skipped (no systemd-analyze)" >&2
    exit 0
fi
cargo build --quiet -p host --bin plughost
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
sed "s|/usr/bin/plughost|$PWD/target/debug/plughost|g" packaging/plughost.service > "$dir/plughost.service"
cp packaging/plughost.socket "$dir/plughost.socket"
out=$(systemd-analyze verify --man=no "$dir/plughost.service" "$dir/plughost.socket" 2>&1) || { echo "$out" >&2; exit 1; }
if [ -n "$out" ]; then
    echo "packaging/plughost.service, plughost.socket: systemd-analyze verify says:" >&2
    echo "$out" >&2
    exit 1
fi
if ! systemd-analyze security --offline=true --threshold=75 "$dir/plughost.service" > "$dir/security.txt" 2>&1; then
    tail -1 "$dir/security.txt" >&2
    echo "packaging/plughost.service: exposure over 7.5" >&2
    exit 1
fi
echo "packaging/plughost.service: verify clean, $(tail -1 "$dir/security.txt" | sed 's/^→ //')"
