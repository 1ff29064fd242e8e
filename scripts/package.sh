#!/usr/bin/env bash
# Builds a Debian package of plughost: target/debian/plughost_VERSION_ARCH.deb with the binary, the
# reference drivers in /usr/lib/plughost/drivers, the systemd unit, a commented default config,
# completions and man pages. `--check` then lists it against the expected files, unpacks it into a
# temporary root and starts the host from there (no systemd, nothing installed on this machine).
set -euo pipefail
cd "$(dirname "$0")/.."
check=false
[ "${1:-}" = "--check" ] && check=true

cargo build --quiet --release -p host -p file-volume -p process-compute -p fake-volume -p fake-compute -p bridge-network -p fake-network
version=$(sed -n 's/^version = "\(.*\)"/\1/p' host/Cargo.toml | head -1)
arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
out=target/debian
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root="$stage/plughost_${version}_${arch}"
bin=target/release/plughost

install -d -m 0755 "$root/DEBIAN" "$root/usr/bin" "$root/usr/lib/plughost/drivers" "$root/lib/systemd/system" \
    "$root/etc/plughost" "$root/usr/share/man/man8" "$root/usr/share/doc/plughost" \
    "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
    "$root/usr/share/fish/vendor_completions.d"
install -m 0755 "$bin" "$root/usr/bin/plughost"
for d in file_volume process_compute fake_volume fake_compute bridge_network fake_network; do
    install -m 0644 "target/release/lib$d.so" "$root/usr/lib/plughost/drivers/lib$d.so"
done
install -m 0644 packaging/plughost.service "$root/lib/systemd/system/plughost.service"
install -m 0644 packaging/plughost.socket "$root/lib/systemd/system/plughost.socket"
# The default config: the reference drivers, every option commented with its default.
"$bin" config sample --driver-dir "$root/usr/lib/plughost/drivers" file-volume process-compute \
    | sed 's|^# plughost sample configuration|# plughost configuration (installed by the package)|' > "$root/etc/plughost/plughost.toml"
chmod 0644 "$root/etc/plughost/plughost.toml"
"$bin" man "$root/usr/share/man/man8" > /dev/null
gzip -9n "$root"/usr/share/man/man8/*.8
"$bin" completions bash > "$root/usr/share/bash-completion/completions/plughost"
"$bin" completions zsh > "$root/usr/share/zsh/vendor-completions/_plughost"
"$bin" completions fish > "$root/usr/share/fish/vendor_completions.d/plughost.fish"
install -m 0644 README.md "$root/usr/share/doc/plughost/README.md"
printf 'plughost\nLicense: Apache-2.0\n' > "$root/usr/share/doc/plughost/copyright"
echo /etc/plughost/plughost.toml > "$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: plughost
Version: $version
Architecture: $arch
Maintainer: plughost developers <plughost@example.invalid>
Installed-Size: $size
Depends: libc6
Section: admin
Priority: optional
Homepage: https://github.com/plughost/plughost
Description: host for compiled driver plugins (volume and compute drivers)
 plughost runs services whose drivers are shared objects, loaded after trust,
 pin and layout checks, swappable while serving, optionally isolated in worker
 processes; a fleet of hosts can share a NATS broker.
CONTROL
mkdir -p "$out"
deb="$out/plughost_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" > /dev/null
echo "built $deb"
$check || exit 0

# The file list, exactly.
expected="./etc/plughost/plughost.toml
./lib/systemd/system/plughost.service
./lib/systemd/system/plughost.socket
./usr/bin/plughost
./usr/lib/plughost/drivers/libbridge_network.so
./usr/lib/plughost/drivers/libfake_compute.so
./usr/lib/plughost/drivers/libfake_network.so
./usr/lib/plughost/drivers/libfake_volume.so
./usr/lib/plughost/drivers/libfile_volume.so
./usr/lib/plughost/drivers/libprocess_compute.so
./usr/share/bash-completion/completions/plughost
./usr/share/doc/plughost/README.md
./usr/share/doc/plughost/copyright
./usr/share/fish/vendor_completions.d/plughost.fish
./usr/share/man/man8/plughost.8.gz
./usr/share/zsh/vendor-completions/_plughost"
got=$(dpkg-deb -c "$deb" | awk '{print $6}' | grep -v '/$' | grep -v 'man8/plughost-' | sort)
if [ "$got" != "$expected" ]; then
    echo "package file list differs:" >&2
    diff <(echo "$expected") <(echo "$got") >&2 || true
    exit 1
fi
# Unpacked into a private root, the host starts from it with the packaged config.
tmp=$(mktemp -d)
trap 'rm -rf "$stage" "$tmp"' EXIT
chmod 0755 "$tmp"
dpkg-deb -x "$deb" "$tmp/root"
conf="$tmp/root/etc/plughost/plughost.toml"
sed -i "s|^# driver_dirs = .*|driver_dirs = [\"$tmp/root/usr/lib/plughost/drivers\"]|" "$conf"
"$tmp/root/usr/bin/plughost" config check --config "$conf" --state-dir "$tmp/state" > /dev/null
"$tmp/root/usr/bin/plughost" run --config "$conf" --state-dir "$tmp/state" 2> "$tmp/log" &
pid=$!
for _ in $(seq 1 100); do
    "$tmp/root/usr/bin/plughost" ctl --socket "$tmp/state/plughost.sock" ping > /dev/null 2>&1 && break
    sleep 0.1
done
"$tmp/root/usr/bin/plughost" ctl --socket "$tmp/state/plughost.sock" health
kill -TERM "$pid"
wait "$pid"
echo "package checked: file list, config check, the host ran from it"
