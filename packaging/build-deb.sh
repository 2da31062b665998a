#!/usr/bin/env bash
# Builds hubd's Debian packages with cargo-deb, from [package.metadata.deb] in
# hubd/Cargo.toml:
#
#   packaging/build-deb.sh [amd64|arm64|all]     (default: all)
#
# Each package holds hubd and hubctl (built with the `deb` profile: LTO, one
# codegen unit, stripped), the systemd unit, sysusers and tmpfiles entries,
# /etc/hubd/hubd.toml, man pages, hubctl's completions, and the docs.
# arm64 is cross-built with rustup's aarch64-unknown-linux-gnu target and
# Debian's gcc-aarch64-linux-gnu. Prints the path of each .deb it made, last,
# one per line. Needs: cargo-deb (cargo install cargo-deb --locked), help2man,
# and for arm64 the rustup target and aarch64-linux-gnu-gcc; it stops, naming
# what is missing, if they are not there.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

die() {
    echo "build-deb.sh: $*" >&2
    exit 1
}

case "${1:-all}" in
amd64) arches=(amd64) ;;
arm64) arches=(arm64) ;;
all) arches=(amd64 arm64) ;;
*) die "unknown architecture '$1' (amd64, arm64 or all)" ;;
esac

command -v cargo-deb >/dev/null ||
    die "cargo-deb is missing: cargo install cargo-deb --locked"

target_dir="${CARGO_TARGET_DIR:-$root/target}"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
support_end="$(cat packaging/support-end)"
[ -n "$version" ] || die "no version in Cargo.toml [workspace.package]"
[[ "$support_end" =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}$ ]] ||
    die "packaging/support-end must hold one date, YYYY-MM-DD"

command -v help2man >/dev/null ||
    die "help2man is missing (it writes hubd's man page): apt-get install help2man"

# The man pages and completions do not depend on the architecture: host
# builds write them once. hubctl's come from its clap definition
# (hubctl-docs), hubd's from its --help with packaging/hubd.h2m (help2man).
docs="$target_dir/hubd-docs"
rm -rf "$docs"
cargo run --locked --quiet -p hubctl --bin hubctl-docs -- "$docs" >/dev/null
cargo build --locked --quiet -p hubd --bin hubd
help2man --no-info --include packaging/hubd.h2m --output "$docs/man/hubd.1" \
    "$target_dir/debug/hubd"
gzip -9n "$docs"/man/*.1

debs=()
for arch in "${arches[@]}"; do
    case "$arch" in
    amd64) triple=x86_64-unknown-linux-gnu ;;
    arm64)
        triple=aarch64-unknown-linux-gnu
        command -v aarch64-linux-gnu-gcc >/dev/null ||
            die "aarch64-linux-gnu-gcc is missing: apt-get install gcc-aarch64-linux-gnu"
        rustup target list --installed | grep -qx "$triple" ||
            die "the Rust target $triple is missing: rustup target add $triple"
        export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
        export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
        export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
        ;;
    esac
    echo ">>> building hubd and hubctl for $arch ($triple, profile deb)" >&2
    cargo build --locked --profile deb --target "$triple" -p hubd -p hubctl

    # cargo-deb reads generated assets under target/release/, which it maps
    # to this directory.
    gen="$target_dir/$triple/deb/packaging"
    rm -rf "$gen"
    mkdir -p "$gen"
    cp -r "$docs/." "$gen/"
    sed -e "s/@VERSION@/$version/" -e "s/@SUPPORT_END@/$support_end/" \
        packaging/SUPPORT.in >"$gen/SUPPORT"
    # The copyright file lists every crate compiled into the binaries.
    crates="$(cargo tree --locked -p hubd -p hubctl -e normal --target "$triple" \
        --prefix none --format '{p} {l}' |
        grep -v ' (/' | sed 's/ (\*)$//' | sort -u | sed 's/^/ /')"
    [ -n "$crates" ] || die "cargo tree listed no crates"
    while IFS= read -r line; do
        if [ "$line" = "@CRATES@" ]; then
            printf '%s\n' "$crates"
        else
            printf '%s\n' "$line"
        fi
    done <packaging/debian/copyright.in >"$gen/copyright"

    echo ">>> packaging hubd for $arch" >&2
    # --no-strip: the deb profile strips already (and no cross strip is needed).
    deb="$(cargo deb -p hubd --no-build --no-strip --profile deb --target "$triple" \
        --output "$target_dir/debian/")"
    [ -f "$deb" ] || die "cargo deb did not say where the package is ($deb)"
    debs+=("$deb")
done

for deb in "${debs[@]}"; do
    echo ">>> $(basename "$deb"): $(stat -c %s "$deb") bytes" >&2
done
printf '%s\n' "${debs[@]}"
