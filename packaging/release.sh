#!/usr/bin/env bash
# Builds a release tarball: cubby-<version>-<target>.tar.gz with the server and CLI binaries,
# the example configs, the systemd unit, the Dockerfile, the README and the LICENSE.
#
#   packaging/release.sh [--out DIR] [--bin-dir DIR]
#
# --out DIR      where the tarball goes (default target/dist)
# --bin-dir DIR  package the binaries already built in DIR instead of building them
#                (cargo build --locked --release -p cubby-server -p cubby-cli)
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/dist
bin_dir=
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --bin-dir) bin_dir=$2; shift 2 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "release.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
target=$(rustc -vV | sed -n 's/^host: //p')
if [ -z "$bin_dir" ]; then
    cargo build --locked --release -p cubby-server -p cubby-cli
    bin_dir=target/release
fi
for bin in cubby-server cubby; do
    [ -x "$bin_dir/$bin" ] || { echo "release.sh: no $bin in $bin_dir" >&2; exit 1; }
done

name="cubby-$version-$target"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/$name/bin" "$stage/$name/config" "$stage/$name/systemd"
install -m 0755 "$bin_dir/cubby-server" "$bin_dir/cubby" "$stage/$name/bin/"
install -m 0644 server/config/*.toml "$stage/$name/config/"
install -m 0644 packaging/cubby-server.service "$stage/$name/systemd/"
install -m 0644 packaging/Dockerfile README.md LICENSE "$stage/$name/"
mkdir -p "$out"
tar -C "$stage" --owner=0 --group=0 --numeric-owner -czf "$out/$name.tar.gz" "$name"
(cd "$out" && sha256sum "$name.tar.gz" > "$name.tar.gz.sha256")
echo "$out/$name.tar.gz"
