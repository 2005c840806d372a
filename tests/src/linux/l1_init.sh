#!/bin/sh
# /init of the emulated KVM host (L1) that ringvm-tests' linux harness boots
# under QEMU/TCG when this machine's /dev/kvm cannot run a stock kernel.
#   1. mounts proc, sys, devtmpfs and loads the modules listed in
#      /etc/ringvm/modules (kvm-amd, 9p over virtio-pci, their dependencies);
#   2. mounts the host's root file system (9p tag hostroot, read-only) on
#      /hostroot, and proc, sys, devtmpfs, a /dev/shm tmpfs and a tmpfs on the
#      directory ringvm.l1tmp= names (the run's work directory: sockets and
#      files the job creates live there, not on 9p);
#   3. runs the job script ringvm.l1job= (a path on the host) with the host's
#      /bin/sh, chrooted into the host root: every host binary and library is
#      there at its usual path;
#   4. waits until the serial console has sent everything (the job's last
#      lines carry the VMM's status and the backends' logs) and powers off
#      (QEMU runs with -no-reboot, so a panic ends it too).
# Lines starting with "RINGVM-L1: " are for the harness; times are L1
# uptimes in seconds.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# Waits until the serial console has sent what was written to it: poweroff
# -f does not, and the last lines could be lost in the UART's buffer. busybox
# stty applies a changed setting with tcsetattr(TCSADRAIN), which returns
# only once the buffer is empty and the transmitter idle; toggling echoprt
# (nothing reads the console here) makes it apply at least once. Bounded;
# where stty cannot, sync and a short sleep instead.
drain_console() {
    if ! { timeout 10 stty -F /dev/console echoprt &&
        timeout 10 stty -F /dev/console -echoprt; } 2>/dev/null; then
        sync
        sleep 1
    fi
}
stamp() {
    read -r up _ < /proc/uptime
    echo "RINGVM-L1: $1 $up"
}
fail() {
    echo "RINGVM-L1: error: $*"
    drain_console
    poweroff -f
    exit 1
}
stamp init

job=
work=
set -f
for word in $(cat /proc/cmdline); do
    case "$word" in
        ringvm.l1job=*) job=${word#ringvm.l1job=} ;;
        ringvm.l1tmp=*) work=${word#ringvm.l1tmp=} ;;
    esac
done
set +f
[ -n "$job" ] && [ -n "$work" ] || fail "ringvm.l1job= and ringvm.l1tmp= must be on the kernel command line"

while read -r module; do
    insmod "$module" || echo "RINGVM-L1: insmod $module failed"
done < /etc/ringvm/modules
[ -c /dev/kvm ] || fail "no /dev/kvm after loading kvm-amd (does the emulated CPU have SVM?)"

mkdir -p /hostroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 hostroot /hostroot ||
    fail "cannot mount the host root (9p tag hostroot)"
mount -t proc proc /hostroot/proc || fail "cannot mount /hostroot/proc"
mount -t sysfs sysfs /hostroot/sys || fail "cannot mount /hostroot/sys"
mount -t devtmpfs devtmpfs /hostroot/dev || fail "cannot mount /hostroot/dev"
mkdir -p /hostroot/dev/shm && mount -t tmpfs shm /hostroot/dev/shm || fail "cannot mount /hostroot/dev/shm"
mount -t tmpfs l1tmp "/hostroot$work" || fail "cannot mount a tmpfs on $work (does it exist on the host?)"
stamp ready

chroot /hostroot /bin/sh "$job" < /dev/null
echo "RINGVM-L1: job-status $?"
stamp done
drain_console
poweroff -f
