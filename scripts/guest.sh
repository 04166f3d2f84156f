#!/usr/bin/env bash
# Build the real guest of the VM tests: Debian 12's cloud kernel and an initramfs whose
# /init (busybox) prints a heartbeat on the serial console and keeps dirtying RAM.
#
# Usage: scripts/guest.sh [DIR]      (or GUEST_DIR=...; default <repo>/.cache/guest)
#
# Output: DIR/vmlinuz, DIR/initrd.gz, DIR/versions (the packages they came from).
# Nothing is installed system-wide: apt runs with its own sources list (bookworm main
# only), lists, cache and an empty dpkg status; `apt-get download` fetches the kernel
# package that linux-image-cloud-amd64 depends on and busybox-static, and `dpkg-deb -x`
# unpacks them in a scratch directory of which only the kernel image and the busybox
# binary are kept. The initramfs is packed by scripts/initramfs.py (no cpio needed).
#
# Rerunning is a no-op once DIR/.complete holds the hash of this script and of
# initramfs.py; after an edit of either, the initramfs is rebuilt from the kept busybox
# without the network. Delete DIR to fetch again.
#
# The guest's console protocol (tests/vm/guest.py parses it):
#   HB <n>         heartbeat n (1, 2, ...), about every 100 ms; "<n>\n" is appended to
#                  /run/hb, so the file always holds the lines "1\n" .. "<n>\n"
#   CK <n> <md5>   every 10th beat: the md5 of /run/hb right after beat n was appended
#
# Environment:
#   GUEST_DIR      the output directory (the first argument wins)
#   GUEST_MIRROR   the Debian mirror; default: the one this machine's apt uses
#   GUEST_SUITE    default bookworm
#   PYTHON         the interpreter for initramfs.py; default python3
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-${GUEST_DIR:-$repo/.cache/guest}}"
out="$(realpath -m "$out")"
[[ "$out" != / ]] || { echo "guest: refusing to build into /" >&2; exit 1; }
suite="${GUEST_SUITE:-bookworm}"
python="${PYTHON:-python3}"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
meta=linux-image-cloud-amd64
stamp="$out/.complete"

log() { printf 'guest: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The mirror this machine's apt already uses for Debian (deb822 or one-line sources).
system_mirror() {
    local files=(/etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list)
    local file uri
    for file in "${files[@]}"; do
        [[ -r "$file" ]] || continue
        uri="$(sed -n -E \
            -e 's#^URIs:[[:space:]]*([^[:space:]]*/debian)/?([[:space:]].*)?$#\1#p' \
            -e 's#^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]*/debian)/?[[:space:]].*$#\2#p' \
            "$file" | head -n 1)"
        if [[ -n "$uri" ]]; then
            printf '%s\n' "$uri"
            return 0
        fi
    done
    return 1
}

recipe_hash() {
    cat "$0" "$repo/scripts/initramfs.py" | sha256sum | cut -d' ' -f1
}

# Fetch the kernel and busybox into $out (vmlinuz, busybox, versions).
fetch() {
    local mirror work
    mirror="${GUEST_MIRROR:-$(system_mirror)}" || die "no Debian mirror in /etc/apt; set GUEST_MIRROR"
    work="$out/.apt"
    rm -rf "$work"
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs" \
        "$work/etc/preferences.d" "$work/root"
    : >"$work/status"
    printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n' \
        "$mirror" "$suite" "$keyring" >"$work/etc/$suite.sources"
    local apt_opts=(
        -o "Dir::State=$work" -o "Dir::State::lists=$work/lists"
        -o "Dir::State::status=$work/status" -o "Dir::Cache=$work/cache"
        -o "Dir::Etc::sourcelist=/dev/null" -o "Dir::Etc::sourceparts=$work/etc"
        -o "Dir::Etc::preferencesparts=$work/etc/preferences.d"
        -o "APT::Architecture=amd64" -o "APT::Architectures::=amd64"
        -o "APT::Sandbox::User=root"
    )
    apt-get "${apt_opts[@]}" -qq update >&2 || die "apt-get update for $suite failed"
    # apt-get update only warns when a mirror is unreachable.
    compgen -G "$work/lists/*_Packages*" >/dev/null || die "no package lists from $mirror $suite"
    # The metapackage only depends on the versioned kernel package, which holds the image.
    local kernel
    kernel="$(apt-cache "${apt_opts[@]}" depends "$meta" \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-cloud-amd64$/ {print $2; exit}')"
    [[ -n "$kernel" ]] || die "$suite: no versioned kernel package behind $meta"
    log "fetching $kernel and busybox-static from $suite"
    (cd "$work/debs" && apt-get "${apt_opts[@]}" -qq download "$kernel" busybox-static) >&2 \
        || die "apt-get download failed"
    local deb
    for deb in "$work/debs"/*.deb; do
        dpkg-deb -x "$deb" "$work/root"
        dpkg-deb -f "$deb" Package Version | paste -sd' ' | sed 's/Package: //; s/ Version: /=/'
    done >"$work/versions"
    local image=("$work/root/boot/vmlinuz-"*)
    [[ -f "${image[0]}" ]] || die "$kernel holds no boot/vmlinuz-*"
    [[ -x "$work/root/bin/busybox" ]] || die "busybox-static holds no bin/busybox"
    # A bzImage carries the magic "HdrS" at offset 0x202 of its setup header.
    [[ "$(dd if="${image[0]}" bs=1 skip=514 count=4 status=none)" == HdrS ]] \
        || die "${image[0]} is not a bzImage"
    cp "${image[0]}" "$out/vmlinuz.partial"
    cp "$work/root/bin/busybox" "$out/busybox"
    mv "$work/versions" "$out/versions"
    mv "$out/vmlinuz.partial" "$out/vmlinuz"
    log "download: $(du -cb "$work/debs"/*.deb | awk 'END {printf "%.1f MB", $1 / 1e6}') of packages"
    rm -rf "$work"
}

# The guest's /init. Kernel messages are kept off the console once it runs: a printk in
# the middle of a heartbeat line would garble it (migration makes the clocksource
# watchdog complain under TCG).
write_init() {
    cat >"$1" <<'EOF'
#!/bin/busybox sh
# Generated by scripts/guest.sh: the guest of the multifd VM tests.
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=96m tmpfs /run
echo 1 >/proc/sys/kernel/printk
# Rewrite 32 MiB of tmpfs over and over, so RAM keeps being dirtied while it migrates.
(while :; do dd if=/dev/urandom of=/run/dirt bs=1M count=32 2>/dev/null; done) &
n=0
while :; do
    n=$((n + 1))
    echo "$n" >>/run/hb
    echo "HB $n"
    if [ $((n % 10)) -eq 0 ]; then
        set -- $(md5sum /run/hb)
        echo "CK $n $1"
    fi
    usleep 100000
done
EOF
    chmod 0755 "$1"
}

build_initrd() {
    local tree="$out/.tree"
    rm -rf "$tree"
    mkdir -p "$tree/bin" "$tree/dev" "$tree/proc" "$tree/sys" "$tree/run"
    cp "$out/busybox" "$tree/bin/busybox"
    chmod 0755 "$tree/bin/busybox"
    write_init "$tree/init"
    "$python" "$repo/scripts/initramfs.py" "$tree" "$out/initrd.gz" --char-dev dev/console:5:1
    rm -rf "$tree"
}

main() {
    local hash
    hash="$(recipe_hash)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$hash" && -f "$out/vmlinuz" && -f "$out/initrd.gz" ]]; then
        log "already built in $out ($(paste -sd' ' "$out/versions"))"
        return 0
    fi
    mkdir -p "$out"
    rm -f "$stamp"
    if [[ ! -f "$out/vmlinuz" || ! -x "$out/busybox" || ! -s "$out/versions" ]]; then
        fetch
    fi
    build_initrd
    printf '%s\n' "$hash" >"$stamp"
    log "built $out: $(paste -sd' ' "$out/versions");" \
        "vmlinuz $(du -h "$out/vmlinuz" | cut -f1), initrd.gz $(du -h "$out/initrd.gz" | cut -f1)"
}

main "$@"
