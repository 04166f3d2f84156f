# shellcheck shell=bash
# Sourced by the fetch scripts (qemu10.sh, guest.sh): apt with a private state, so that
# Debian packages of any suite can be downloaded and unpacked without touching the
# machine's own apt or dpkg. The caller defines log() and die().

# The mirror this machine's apt already uses for Debian (deb822 or one-line sources),
# so a script reaches only the registry the machine is set up for.
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

# private_apt WORK MIRROR SUITE KEYRING: lay out WORK as apt's whole world (one sources
# file for SUITE main, its own lists, cache and an empty dpkg status), fill the global
# array APT_OPTS with the options that point apt there, and fetch the package lists.
# Recommends and Suggests are off: only the Depends closure is ever fetched.
private_apt() {
    local work="$1" mirror="$2" suite="$3" keyring="$4"
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs" \
        "$work/etc/preferences.d"
    : >"$work/status"
    printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n' \
        "$mirror" "$suite" "$keyring" >"$work/etc/$suite.sources"
    APT_OPTS=(
        -o "Dir::State=$work" -o "Dir::State::lists=$work/lists"
        -o "Dir::State::status=$work/status" -o "Dir::Cache=$work/cache"
        -o "Dir::Etc::sourcelist=/dev/null" -o "Dir::Etc::sourceparts=$work/etc"
        -o "Dir::Etc::preferencesparts=$work/etc/preferences.d"
        -o "APT::Architecture=amd64" -o "APT::Architectures::=amd64"
        -o "APT::Install-Recommends=false" -o "APT::Install-Suggests=false"
        -o "APT::Sandbox::User=root"
    )
    apt-get "${APT_OPTS[@]}" -qq update >&2 || die "apt-get update for $suite failed"
    # apt-get update only warns when a mirror is unreachable.
    compgen -G "$work/lists/*_Packages*" >/dev/null || die "no package lists from $mirror $suite"
}
