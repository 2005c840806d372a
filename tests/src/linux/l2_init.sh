#!/bin/sh
# /init of the Linux guest (L2) initramfs built by ringvm-tests' linux
# harness. It runs busybox sh as PID 1 and
#   1. prints RINGVM-INIT first of all (the harness times /init from it);
#   2. mounts proc, sys, devtmpfs and loads the modules listed in
#      /etc/ringvm/modules (virtio_pci, virtio_blk, virtio_net and their
#      dependencies, in load order);
#   3. decodes the command from the base64 word ringvm.cmd= of the kernel
#      command line, prints RINGVM-OUTPUT-BEGIN, runs it with sh and prints
#      RINGVM-RESULT: status=<its exit status>;
#   4. waits until the serial console has sent everything, then ends as
#      ringvm.end= says: poweroff (default) or reboot, forced.
echo RINGVM-INIT
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

while read -r module; do
    insmod "$module" || echo "RINGVM-INIT: insmod $module failed"
done < /etc/ringvm/modules

cmd_b64=
end=poweroff
set -f
for word in $(cat /proc/cmdline); do
    case "$word" in
        ringvm.cmd=*) cmd_b64=${word#ringvm.cmd=} ;;
        ringvm.end=*) end=${word#ringvm.end=} ;;
    esac
done
set +f

# Waits until the serial console has sent what was written to it: reboot -f
# and poweroff -f do not, and under load the last lines (the result line)
# were lost with the bytes still in the UART's buffer. busybox stty applies a
# changed setting with tcsetattr(TCSADRAIN), which returns only once the
# buffer is empty and the transmitter idle; toggling echoprt (nothing reads
# the console here) makes it apply at least once. Bounded; where stty cannot,
# sync and a short sleep instead.
drain_console() {
    if ! { timeout 10 stty -F /dev/console echoprt &&
        timeout 10 stty -F /dev/console -echoprt; } 2>/dev/null; then
        sync
        sleep 1
    fi
}

finish() {
    drain_console
    case "$end" in
        reboot) reboot -f ;;
        poweroff) poweroff -f ;;
        *) echo "RINGVM-INIT: unknown ringvm.end=$end, powering off"; drain_console; poweroff -f ;;
    esac
    echo "RINGVM-INIT: $end -f failed"
    exit 1
}

if [ -z "$cmd_b64" ]; then
    echo "RINGVM-INIT: no ringvm.cmd= on the kernel command line, nothing to run"
    finish
fi
if ! cmd=$(echo "$cmd_b64" | base64 -d) || [ -z "$cmd" ]; then
    echo "RINGVM-INIT: cannot decode ringvm.cmd=$cmd_b64 (base64)"
    finish
fi

cd /root
echo RINGVM-OUTPUT-BEGIN
sh -c "$cmd"
echo "RINGVM-RESULT: status=$?"
finish
