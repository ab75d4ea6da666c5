#!/usr/bin/env bash
# Boot the machine's systemd as PID 1 of a throw-away container (recipe A of
# /work/shared/reference/systemd-sandbox.md): an overlay over the host's root filesystem with a
# tmpfs upper layer, so whatever systemd writes (/etc, /run, /tmp, /var) never reaches the host.
#
# Usage (as root):  boot.sh outer
#   env SANDBOX_CGROUP  host path of an empty cgroup2 directory made for this sandbox
#       SANDBOX_BINDS   ':'-separated host paths that must appear at the same path inside
#                       (project tree, virtualenv, interpreter); bound only when they live on
#                       another filesystem than /, because the overlay shows the root fs only,
#                       or under /tmp, /run, /dev, which the sandbox replaces
#       SANDBOX_SCRATCH where to mount the scratch tmpfs (default /tmp): never above a bind
#       SANDBOX_FRESH   ':'-separated paths of the host the sandbox must not see (what an
#                       earlier install of poolkeeper left: its state, cache, configs); inside
#                       they are absent, as on a machine that never had it
#       SANDBOX_NAME    value of $container and the hostname (default poolkeeper-sandbox)
# The `outer` stage joins SANDBOX_CGROUP and re-executes this script as `inner` under
# `unshare`; `inner` runs as PID 1 of the new PID namespace, builds the root and execs systemd.
set -euo pipefail

NAME=${SANDBOX_NAME:-poolkeeper-sandbox}
TARGET=poolkeeper-sandbox.target

# Every mount here is in a private namespace, but libmount would still record it in the host's
# /run/mount/utab (creating /run/mount on a machine that never had it) before our own /run
# tmpfs hides that directory: -n (--no-mtab) keeps it from writing there at all.
mount() { command mount -n "$@"; }
umount() { command umount -n "$@"; }

outer() {
    : "${SANDBOX_CGROUP:?SANDBOX_CGROUP must name a cgroup2 directory}"
    # The cgroup namespace root is the cgroup of the process calling unshare(2): join ours first
    # so the sandbox's /sys/fs/cgroup shows only its own subtree, never the host's tree.
    echo $$ >"$SANDBOX_CGROUP/cgroup.procs"
    # --kill-child: if this unshare process dies (pytest killed), the container dies with it.
    exec unshare --pid --fork --kill-child --mount --uts --ipc --cgroup \
        --propagation private "$BASH" "$0" inner
}

mount_dev() {
    local dev=$1/dev n
    # A private /dev: binding the host's devtmpfs would let journald's /dev/log symlink (and
    # anything else systemd creates in /dev) land on the host.
    mount -t tmpfs -o mode=755,nosuid dev "$dev"
    for n in null zero full random urandom tty; do
        touch "$dev/$n"
        mount --bind "/dev/$n" "$dev/$n"
    done
    mkdir "$dev/pts" "$dev/shm"
    mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$dev/pts"
    ln -s pts/ptmx "$dev/ptmx"
    mount -t tmpfs -o mode=1777,nosuid,nodev shm "$dev/shm"
    ln -s /proc/self/fd "$dev/fd"
    ln -s /proc/self/fd/0 "$dev/stdin"
    ln -s /proc/self/fd/1 "$dev/stdout"
    ln -s /proc/self/fd/2 "$dev/stderr"
}

mount_api_filesystems() {
    local m=$1
    mount -t proc proc "$m/proc"
    # Read-only: /sys writes change the (shared) kernel; it also makes udev units skip.
    mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$m/sys"
    # Inside our cgroup namespace this shows only SANDBOX_CGROUP's subtree.
    mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$m/sys/fs/cgroup"
    mount -t tmpfs -o mode=755,nosuid,nodev run "$m/run"
    mount -t tmpfs -o mode=1777,nosuid,nodev tmp "$m/tmp"
}

hide_host_leftovers() {
    local m=$1 p
    local IFS=:
    for p in ${SANDBOX_FRESH:-}; do
        # Removed from the overlay only: a whiteout in the tmpfs upper layer hides the host's
        # entry; overlayfs never writes to its lower layer, the host's root filesystem.
        [ -n "$p" ] && rm -rf -- "$m$p"
    done
}

bind_other_filesystems() {
    local m=$1 p
    local IFS=:
    for p in ${SANDBOX_BINDS:-}; do
        [ -n "$p" ] && [ -e "$p" ] || continue
        # On another filesystem (the overlay shows only /), or under a directory the sandbox
        # replaces with its own tmpfs (a CI clone in /tmp).
        case "$p" in
            /tmp/* | /run/* | /dev/*) local hidden=1 ;;
            *) local hidden=0 ;;
        esac
        if [ "$hidden" = 1 ] || [ "$(findmnt -n -o TARGET --target "$p")" != / ]; then
            mkdir -p "$m$p"
            mount --rbind "$p" "$m$p"
            # Read-only: units must not write into the host's tree through the sandbox.
            mount -o remount,bind,ro "$m$p"
        fi
    done
}

# Every unit the early targets would pull in, except journald and D-Bus: they would load kernel
# modules, write sysctls or binfmt handlers (global kernel state), flush the journal to disk, run
# timers, read the host's kernel audit stream (systemd-journald-audit.socket).
units_to_mask() {
    local d t
    for d in /etc/systemd/system /lib/systemd/system /usr/lib/systemd/system; do
        for t in sysinit basic sockets timers paths local-fs local-fs-pre remote-fs swap \
            cryptsetup veritysetup integritysetup; do
            [ -d "$d/$t.target.wants" ] && ls "$d/$t.target.wants"
        done
    done | grep -v -x -e 'systemd-journald\(-dev-log\)\?\.\(socket\|service\)' -e 'dbus\..*' |
        sort -u
}

# D-Bus, when installed, for the systemctl/systemd-run features that need the bus
# (systemd-run --wait/--pipe, the logind check of systemctl poweroff).
dbus_units() {
    if [ -e /lib/systemd/system/dbus.socket ] && command -v dbus-daemon >/dev/null; then
        echo dbus.socket
    fi
}

write_units() {
    local etc=$1/etc/systemd u g
    cat >"$etc/system/$TARGET" <<EOF
[Unit]
Description=poolkeeper test sandbox
Wants=systemd-journald.socket systemd-journald.service $(dbus_units)
After=systemd-journald.service
AllowIsolate=yes
EOF
    for u in $(units_to_mask); do
        ln -sfn /dev/null "$etc/system/$u"
    done
    # Generators would turn the host's fstab, getty, sysv scripts... into units: disable all.
    mkdir -p "$etc/system-generators"
    for g in /lib/systemd/system-generators/* /usr/lib/systemd/system-generators/*; do
        [ -e "$g" ] && ln -sfn /dev/null "$etc/system-generators/${g##*/}"
    done
    # Keep the journal volatile (/run/log/journal) and quick.
    mkdir -p "$etc/journald.conf.d"
    printf '[Journal]\nStorage=volatile\nRateLimitBurst=0\n' >"$etc/journald.conf.d/sandbox.conf"
}

inner() {
    # A scratch tmpfs (on /tmp unless a path to bind lives there) of our private mount
    # namespace: holds the overlay's upper and work dirs, hides nothing from the host
    # (propagation is private).
    local r=${SANDBOX_SCRATCH:-/tmp} m
    mount -t tmpfs -o mode=700 sandbox "$r"
    mkdir "$r/upper" "$r/work" "$r/merged"
    m=$r/merged
    mount -t overlay overlay -o "lowerdir=/,upperdir=$r/upper,workdir=$r/work" "$m"
    hide_host_leftovers "$m"
    mount_dev "$m"
    mount_api_filesystems "$m"
    bind_other_filesystems "$m"
    write_units "$m"
    # systemd sets the (UTS-namespaced) hostname from /etc/hostname: make journal lines say so.
    echo "$NAME" >"$m/etc/hostname"
    mkdir -p "$m/.oldroot"
    cd "$m"
    pivot_root . .oldroot
    umount -l /.oldroot
    rmdir /.oldroot
    cd /
    exec env -i container="$NAME" PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        LANG=C.UTF-8 /lib/systemd/systemd --system --unit="$TARGET" --show-status=no
}

case "${1:-}" in
outer) outer ;;
inner) inner ;;
*)
    echo "usage: $0 outer   (see the comment at the top)" >&2
    exit 64
    ;;
esac
