#!/usr/bin/env bash
# Builds hubd's Debian packages and checks what they promise (.ci/run runs it
# after the tests; the README says how to run it by hand):
#
#   packaging/check-deb.sh [amd64|all]      (default: all)
#
#  1. the amd64 package holds every promised file, with the right mode and
#     owner, the config as a conffile, and executable maintainer scripts;
#     the unit passes systemd-analyze verify; no key or password ships;
#  2. lintian reports no error and no warning (the ones kept are overridden
#     in packaging/lintian-overrides, each with its reason);
#  3. it installs into a scratch root (dpkg --root, maintainer scripts run
#     chrootless with DPKG_ROOT, as debhelper's do): the hubd user and the
#     hubadmin group (no password), /var/lib/hubd 0700, the unit enabled, the
#     conffile and the docs; nothing on this machine changes;
#  4. the installed hubd runs as the unit runs it (user hubd, group hubadmin,
#     /run/hubd 0750, no capabilities; in a private mount namespace, so the
#     scratch root's users and a private /run are what it sees): a member of
#     hubadmin runs `hubctl status` with no options, anyone else is refused;
#     every system call it made (strace) is one the unit's filter allows;
#  5. remove keeps /var/lib/hubd and says so; purge deletes it and says so;
#  6. (all) the arm64 package is at most 4 MB, lintian-clean, and its hubd
#     and hubctl run `--version` under qemu-user.
#
# Every outside program it needs is named, and missing ones stop it at once.
set -euo pipefail
root_dir="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root_dir"

passed=0
ok() {
    passed=$((passed + 1))
    echo "ok: $*"
}
fail() {
    echo "FAILED: $*" >&2
    echo "check-deb: $passed passed, 1 failed" >&2
    exit 1
}

mode="${1:-all}"
case "$mode" in
amd64 | all) ;;
*) fail "unknown mode '$mode' (amd64 or all)" ;;
esac

need=(dpkg dpkg-deb lintian setpriv unshare strace pgrep systemd-analyze systemd-sysusers systemd-tmpfiles deb-systemd-helper cargo-deb)
[ "$mode" = all ] && need+=(qemu-aarch64 aarch64-linux-gnu-gcc)
for program in "${need[@]}"; do
    command -v "$program" >/dev/null ||
        fail "!!! $program is missing: .ci/run installs it (see there) !!!"
done

started=$SECONDS
arches=amd64
[ "$mode" = all ] && arches=all
mapfile -t debs < <(packaging/build-deb.sh "$arches")
amd64_deb="${debs[0]}"
[ -f "$amd64_deb" ] || fail "build-deb.sh made no amd64 package"
echo ">>> packages built in $((SECONDS - started)) s"

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
support_end="$(cat packaging/support-end)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# 1. What the package holds.
info="$(dpkg-deb --info "$amd64_deb")"
grep -q '^ Package: hubd$' <<<"$info" || fail "Package is not hubd"
grep -q '^ Architecture: amd64$' <<<"$info" || fail "Architecture is not amd64"
grep -q "^ Version: $version-1$" <<<"$info" || fail "Version is not $version-1"
grep -q '^ Depends: .*systemd | systemd-standalone-sysusers | systemd-sysusers' <<<"$info" ||
    fail "Depends lacks systemd-sysusers"
ok "control: hubd $version-1 amd64, depends on systemd-sysusers"

listing="$(dpkg-deb --contents "$amd64_deb")"
expect() { # mode path
    local line
    line="$(awk -v p="./$2" '$6 == p' <<<"$listing")"
    [ -n "$line" ] || fail "/$2 is not in the package"
    case "$(awk '{print $1, $2}' <<<"$line")" in
    "$1 root/root" | "$1 0/0") ;;
    *) fail "/$2 is not $1 root/root: $line" ;;
    esac
}
expect -rwxr-xr-x usr/bin/hubd
expect -rwxr-xr-x usr/bin/hubctl
expect -rw-r--r-- usr/lib/systemd/system/hubd.service
expect -rw-r--r-- usr/lib/sysusers.d/hubd.conf
expect -rw-r--r-- usr/lib/tmpfiles.d/hubd.conf
expect -rw-r--r-- etc/hubd/hubd.toml
for doc in README.md SECURITY.md security.txt PRIVACY.md SUPPORT copyright changelog.Debian.gz; do
    expect -rw-r--r-- "usr/share/doc/hubd/$doc"
done
for page in hubd hubctl hubctl-about hubctl-status hubctl-pair hubctl-devices hubctl-devices-list; do
    expect -rw-r--r-- "usr/share/man/man1/$page.1.gz"
done
expect -rw-r--r-- usr/share/bash-completion/completions/hubctl
expect -rw-r--r-- usr/share/zsh/vendor-completions/_hubctl
expect -rw-r--r-- usr/share/fish/vendor_completions.d/hubctl.fish
expect -rw-r--r-- usr/share/lintian/overrides/hubd
ok "$(wc -l <<<"$listing") entries; every promised file is there, root-owned, with its mode"

control="$work/control"
dpkg-deb --control "$amd64_deb" "$control"
grep -qx /etc/hubd/hubd.toml "$control/conffiles" || fail "/etc/hubd/hubd.toml is not a conffile"
for script in postinst prerm postrm; do
    [ "$(stat -c %a "$control/$script")" = 755 ] || fail "$script is not 0755"
    sh -n "$control/$script" || fail "$script is not valid sh"
done
ok "/etc/hubd/hubd.toml is a conffile; postinst, prerm and postrm are 0755 sh"

tree="$work/tree"
dpkg-deb --extract "$amd64_deb" "$tree"
cmp -s "$tree/usr/lib/systemd/system/hubd.service" packaging/hubd.service || fail "the unit differs from packaging/hubd.service"
cmp -s "$tree/etc/hubd/hubd.toml" config/hubd.toml || fail "the conffile differs from config/hubd.toml"
grep -q "security updates until $support_end" "$tree/usr/share/doc/hubd/SUPPORT" ||
    fail "SUPPORT does not state the support end $support_end"
grep -q "^Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/" "$tree/usr/share/doc/hubd/copyright" ||
    fail "copyright is not machine-readable"
grep -q '^ tokio v' "$tree/usr/share/doc/hubd/copyright" || fail "copyright does not list the crates"
about="$("$tree/usr/bin/hubctl" about)"
grep -q "support end: *$support_end" <<<"$about" || fail "hubctl about does not say $support_end: $about"
"$tree/usr/bin/hubd" --version | grep -qx "hubd $version" || fail "hubd --version is not $version"
"$tree/usr/bin/hubd" --check-config "$tree/etc/hubd/hubd.toml" >/dev/null || fail "the conffile does not validate"
# systemd-analyze verify knows every directive of this systemd; it needs the
# ExecStart binary to exist, so it checks a copy that names the extracted one.
sed "s|^ExecStart=/usr/bin/hubd|ExecStart=$tree/usr/bin/hubd|" \
    "$tree/usr/lib/systemd/system/hubd.service" >"$work/hubd.service"
verify="$(systemd-analyze verify --man=no "$work/hubd.service" 2>&1)" || fail "systemd-analyze verify: $verify"
[ -z "$verify" ] || fail "systemd-analyze verify complains: $verify"
ok "unit (systemd-analyze verify: clean) and conffile as in the repo; SUPPORT, hubctl about and the docs say $support_end"

# Principle 1: no key or password ships. The binaries hold PEM labels for
# parsing, never a PEM block, so look for a label followed by a line of
# base64 (-z: the whole file is one record, so the pattern spans lines).
if grep -raPzq -- '-----BEGIN [A-Z ]*PRIVATE KEY-----\r?\n[A-Za-z0-9+/]{40}' "$tree"; then
    fail "the package contains a private key"
fi
if grep -rIiq 'password *[=:] *[^ ]' "$tree/etc" "$tree/usr/lib"; then
    fail "the package's config sets a password"
fi
ok "no private key and no password in the package"

# 2. lintian.
if ! lintian --fail-on error,warning --info "$amd64_deb" >"$work/lintian.txt" 2>&1; then
    cat "$work/lintian.txt"
    fail "lintian reports errors or warnings"
fi
# For the record: the overridden warnings and the informational tags.
lintian --fail-on none --display-info --show-overrides "$amd64_deb" 2>&1 |
    grep -v '^running with root privileges' | tee "$work/lintian.txt"
ok "lintian: no errors, no warnings ($(grep -c '^O:' "$work/lintian.txt" || true) overridden in packaging/lintian-overrides)"

# 3. Install into a scratch root.
scratch="$work/root"
mkdir -p "$scratch/var/lib/dpkg/info" "$scratch/var/lib/dpkg/updates"
touch "$scratch/var/lib/dpkg/status" "$scratch/var/lib/dpkg/available"
chmod 755 "$work" "$scratch"
host_passwd="$(sha256sum /etc/passwd /etc/group)"
dpkg_root() {
    dpkg --root="$scratch" --force-script-chrootless --force-depends --log=/dev/null "$@"
}
dpkg_root --install "$amd64_deb" >"$work/install.txt" 2>&1 || {
    cat "$work/install.txt"
    fail "dpkg --root --install failed"
}
dpkg --root="$scratch" --status hubd | grep -qx 'Status: install ok installed' || fail "hubd is not installed in the scratch root"
[ "$host_passwd" = "$(sha256sum /etc/passwd /etc/group)" ] || fail "installing into the scratch root changed this machine's users"
[ ! -e /etc/systemd/system/multi-user.target.wants/hubd.service ] || fail "the scratch install enabled hubd on this machine"
for path in usr/bin/hubd usr/bin/hubctl usr/lib/systemd/system/hubd.service usr/lib/sysusers.d/hubd.conf \
    etc/hubd/hubd.toml usr/share/doc/hubd/SECURITY.md usr/share/doc/hubd/PRIVACY.md usr/share/doc/hubd/SUPPORT; do
    [ -f "$scratch/$path" ] || fail "/$path did not land in the scratch root"
done
ok "installed into a scratch root; this machine's users and units untouched"

passwd_line="$(grep '^hubd:' "$scratch/etc/passwd")" || fail "no hubd user in the scratch root"
IFS=: read -r _ _ hubd_uid _ _ hubd_home hubd_shell <<<"$passwd_line"
[ "$hubd_home" = /var/lib/hubd ] || fail "hubd's home is $hubd_home"
[ "$hubd_shell" = /usr/sbin/nologin ] || fail "hubd's shell is $hubd_shell"
[ "$hubd_uid" -lt 1000 ] || fail "hubd is not a system user (uid $hubd_uid)"
group_line="$(grep '^hubadmin:' "$scratch/etc/group")" || fail "no hubadmin group in the scratch root"
hubadmin_gid="$(cut -d: -f3 <<<"$group_line")"
hubd_pw="$(grep '^hubd:' "$scratch/etc/shadow" | cut -d: -f2)"
case "$hubd_pw" in
'!'* | '*'*) ;;
*) fail "the hubd user has a password ($hubd_pw)" ;;
esac
ok "user hubd (uid $hubd_uid, home /var/lib/hubd, nologin, locked password) and group hubadmin (gid $hubadmin_gid)"

state="$scratch/var/lib/hubd"
[ "$(stat -c '%a %u %g' "$state")" = "700 $hubd_uid $hubadmin_gid" ] ||
    fail "/var/lib/hubd is $(stat -c '%a %u %g' "$state"), not 700 hubd hubadmin"
wants="$scratch/etc/systemd/system/multi-user.target.wants/hubd.service"
[ "$(readlink "$wants")" = /usr/lib/systemd/system/hubd.service ] || fail "hubd.service is not enabled in the scratch root"
ok "/var/lib/hubd is 0700 hubd:hubadmin; hubd.service is enabled (multi-user.target.wants)"

# 4. Run the installed hub as its unit would, and administer it.
tester_uid=64123
stranger_uid=64124
cp "$scratch/etc/passwd" "$work/passwd"
cp "$scratch/etc/group" "$work/group"
echo "hubtester:x:$tester_uid:$tester_uid::/nonexistent:/usr/sbin/nologin" >>"$work/passwd"
echo "stranger:x:$stranger_uid:$stranger_uid::/nonexistent:/usr/sbin/nologin" >>"$work/passwd"
echo "hubtester:x:$tester_uid:" >>"$work/group"
echo "stranger:x:$stranger_uid:" >>"$work/group"
sed -i "s/^hubadmin:x:$hubadmin_gid:\$/hubadmin:x:$hubadmin_gid:hubtester/" "$work/group"
grep -q "^hubadmin:x:$hubadmin_gid:hubtester$" "$work/group" || fail "could not add the tester to hubadmin"
cat >"$work/run-as-unit.sh" <<'EOF'
# Runs inside `unshare --mount`: the scratch root's users, a private /run.
set -eu
work="$1" scratch="$2"
mount --bind "$work/passwd" /etc/passwd
mount --bind "$work/group" /etc/group
mount -t tmpfs -o mode=0755 tmpfs /run
# What systemd does for RuntimeDirectory=hubd, RuntimeDirectoryMode=0750.
mkdir /run/hubd
chown hubd:hubadmin /run/hubd
chmod 0750 /run/hubd
mkdir "$work/trace"
chown hubd "$work/trace"
NO_COLOR=1 RUNTIME_DIRECTORY=/run/hubd STATE_DIRECTORY="$scratch/var/lib/hubd" \
    setpriv --reuid=hubd --regid=hubadmin --clear-groups --no-new-privs \
    --inh-caps=-all --bounding-set=-all \
    strace -f -qq -o "$work/trace/hubd.strace" \
    "$scratch/usr/bin/hubd" --config "$scratch/etc/hubd/hubd.toml" --listen 127.0.0.1:0 \
    2>"$work/hubd.log" &
hubd_pid=$!
deadline=$(($(date +%s) + 30))
until [ -S /run/hubd/hubd.sock ]; do
    kill -0 "$hubd_pid" 2>/dev/null || { cat "$work/hubd.log"; echo "hubd exited"; exit 1; }
    [ "$(date +%s)" -lt "$deadline" ] || { echo "no socket after 30 s"; kill "$(pgrep -P "$hubd_pid")"; exit 1; }
    sleep 0.1
done
stat -c '%A %U %G' /run/hubd /run/hubd/hubd.sock >"$work/modes.txt"
status=0
env -i PATH=/usr/bin:/bin HOME=/nonexistent setpriv --reuid=hubtester --regid=hubtester --init-groups \
    "$scratch/usr/bin/hubctl" status >"$work/tester.txt" 2>&1 || status=$?
echo "$status" >"$work/tester.code"
status=0
env -i PATH=/usr/bin:/bin HOME=/nonexistent setpriv --reuid=stranger --regid=stranger --init-groups \
    "$scratch/usr/bin/hubctl" status >"$work/stranger.txt" 2>&1 || status=$?
echo "$status" >"$work/stranger.code"
# $hubd_pid is strace (setpriv execs it), which does not pass SIGTERM on:
# stop hubd itself, and strace ends with it.
kill -TERM "$(pgrep -P "$hubd_pid")"
wait "$hubd_pid"
EOF
unshare --mount --propagation private sh "$work/run-as-unit.sh" "$work" "$scratch" ||
    fail "running the installed hubd as its unit would failed: $(cat "$work/hubd.log" 2>/dev/null)"
[ "$(sed -n 1p "$work/modes.txt")" = "drwxr-x--- hubd hubadmin" ] || fail "/run/hubd is $(sed -n 1p "$work/modes.txt")"
[ "$(sed -n 2p "$work/modes.txt")" = "srw-rw---- hubd hubadmin" ] || fail "the socket is $(sed -n 2p "$work/modes.txt")"
if grep -q "cannot give the admin socket" "$work/hubd.log"; then
    fail "hubd tried to chown its socket: $(cat "$work/hubd.log")"
fi
echo ">>> hubd's log: $(tr '\n' ' ' <"$work/hubd.log")"
echo ">>> a hubadmin member: hubctl status -> exit $(cat "$work/tester.code"): $(head -n 2 "$work/tester.txt" | tr '\n' ' ')"
echo ">>> a stranger: hubctl status -> exit $(cat "$work/stranger.code"): $(tr '\n' ' ' <"$work/stranger.txt")"
[ "$(cat "$work/tester.code")" = 0 ] || fail "a hubadmin member's 'hubctl status' failed: $(cat "$work/tester.txt")"
grep -q "^version: *$version" "$work/tester.txt" || fail "hubctl status did not show the version: $(cat "$work/tester.txt")"
[ "$(cat "$work/stranger.code")" = 1 ] || fail "a non-member's 'hubctl status' did not fail with 1: $(cat "$work/stranger.txt")"
grep -q "permission denied" "$work/stranger.txt" || fail "a non-member was not told permission denied: $(cat "$work/stranger.txt")"
grep -q "hubadmin group" "$work/stranger.txt" || fail "a non-member was not told about hubadmin: $(cat "$work/stranger.txt")"
[ "$(stat -c '%a %u' "$state/ca/ca.key")" = "600 $hubd_uid" ] || fail "ca.key is not hubd's, 0600"
[ "$(stat -c %u "$state/hub.redb")" = "$hubd_uid" ] || fail "hub.redb is not hubd's"
ok "hubd as user hubd, group hubadmin: /run/hubd drwxr-x--- and socket srw-rw---- hubd:hubadmin; a hubadmin member's plain 'hubctl status' works, a stranger is refused"

# The unit's system call filter, against every call that run made (from
# start, with its new CA and keys, to the admin call and shutdown): a call
# outside it would fail with EPERM under systemd.
expand_filter() { # a set such as @system-service, nested sets expanded
    systemd-analyze syscall-filter --no-pager "$1" | tail -n +2 | sed 's/^ *//' |
        grep -v -e '^#' -e '^$' | while read -r name; do
        case "$name" in
        @*) expand_filter "$name" ;;
        *) echo "$name" ;;
        esac
    done
}
filters="$(sed -n 's/^SystemCallFilter=//p' packaging/hubd.service | tr '\n' ' ')"
[ "$filters" = "@system-service ~@privileged @resources " ] ||
    fail "check-deb.sh knows SystemCallFilter=@system-service, =~@privileged @resources; the unit says $filters"
expand_filter @system-service | sort -u >"$work/allowed-base"
{ expand_filter @privileged; expand_filter @resources; } | sort -u >"$work/denied"
comm -23 "$work/allowed-base" "$work/denied" >"$work/allowed"
grep -oE '^[0-9]+ +[a-z0-9_]+\(' "$work/trace/hubd.strace" | sed -E 's/^[0-9]+ +//; s/\($//' | sort -u >"$work/used"
[ "$(wc -l <"$work/used")" -gt 20 ] || fail "strace saw only $(wc -l <"$work/used") system calls"
outside="$(comm -23 "$work/used" "$work/allowed" | tr '\n' ' ')"
[ -z "$outside" ] || fail "hubd made system calls the unit forbids: $outside"
ok "the $(wc -l <"$work/used") system calls hubd made are all allowed by the unit's SystemCallFilter="

# 5. Remove keeps the state; purge deletes it, and both say so.
dpkg_root --remove hubd >"$work/remove.txt" 2>&1 || { cat "$work/remove.txt"; fail "dpkg --remove failed"; }
grep -q "kept the hub's state in /var/lib/hubd" "$work/remove.txt" || fail "remove did not say it kept the state: $(cat "$work/remove.txt")"
[ -f "$state/ca/ca.key" ] || fail "remove deleted the state"
[ ! -e "$scratch/usr/bin/hubd" ] || fail "remove left /usr/bin/hubd"
[ -f "$scratch/etc/hubd/hubd.toml" ] || fail "remove deleted the conffile"
ok "remove: binaries gone, /var/lib/hubd and the conffile kept, and it says so"

dpkg_root --purge hubd >"$work/purge.txt" 2>&1 || { cat "$work/purge.txt"; fail "dpkg --purge failed"; }
grep -q "deleted /var/lib/hubd" "$work/purge.txt" || fail "purge did not say it deleted the state: $(cat "$work/purge.txt")"
[ ! -e "$state" ] || fail "purge left /var/lib/hubd"
[ ! -e "$scratch/etc/hubd/hubd.toml" ] || fail "purge left the conffile"
[ ! -L "$wants" ] || fail "purge left hubd.service enabled"
[ ! -L "$scratch/etc/systemd/system/hubd.service" ] || fail "purge left hubd.service masked"
ok "purge: /var/lib/hubd, the conffile and the unit's links deleted, and it says so"

# 6. arm64.
amd64_size="$(stat -c %s "$amd64_deb")"
echo ">>> $(basename "$amd64_deb"): $amd64_size bytes"
if [ "$mode" = all ]; then
    arm64_deb="${debs[1]}"
    [ -f "$arm64_deb" ] || fail "build-deb.sh made no arm64 package"
    dpkg-deb --field "$arm64_deb" Architecture | grep -qx arm64 || fail "the arm64 package is not Architecture: arm64"
    arm64_size="$(stat -c %s "$arm64_deb")"
    echo ">>> $(basename "$arm64_deb"): $arm64_size bytes"
    [ "$arm64_size" -le 4000000 ] || fail "the arm64 package is $arm64_size bytes, more than 4 MB"
    lintian --fail-on error,warning "$arm64_deb" >"$work/lintian-arm64.txt" 2>&1 || {
        cat "$work/lintian-arm64.txt"
        fail "lintian reports errors or warnings for the arm64 package"
    }
    arm="$work/arm64"
    dpkg-deb --extract "$arm64_deb" "$arm"
    for bin in hubd hubctl; do
        out="$(qemu-aarch64 -L /usr/aarch64-linux-gnu "$arm/usr/bin/$bin" --version)" ||
            fail "$bin (arm64) does not run under qemu-aarch64"
        echo ">>> qemu-aarch64 usr/bin/$bin --version: $out"
        [ "$out" = "$bin $version" ] || fail "arm64 $bin --version said '$out'"
    done
    ok "arm64: $arm64_size bytes (<= 4 MB), lintian clean; hubd and hubctl run --version under qemu-aarch64"
fi

echo ">>> check-deb took $((SECONDS - started)) s"
echo "check-deb: $passed passed, 0 failed"
