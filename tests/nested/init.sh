#!/bin/sh
# PID 1 of the KVM lane's L1 machine (tests/nested/lane.py boots it; the
# image's /sbin/lane-init has mounted /proc, /sys, /dev and the checkout).
# Sets up what a host running hyperrun has, loads KVM and vhost-vsock, runs
# the command the host left in the results share, and powers off. Lines
# that start with "@@lane " are for the host; the rest is the lane's log.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb
say() { echo "@@lane $*"; }
finish() {
    say "exit $1"
    sync
    echo o > /proc/sysrq-trigger  # power off (q35 has ACPI)
    sleep 60
}

mount -o remount,rw /
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 shm /dev/shm
mount -t tmpfs -o mode=755 run /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
rm -rf /tmp && mkdir -m 1777 /tmp  # on the disk: the tests' images are large
ip link set lo up
hostname hyperrun-l1
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 assets /mnt/assets || finish 90
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 results /mnt/results || finish 90

# KVM: kvm_amd (TCG's -cpu max shows AMD's SVM) or kvm_intel; vhost-vsock.
modprobe kvm_amd 2>/dev/null || modprobe kvm_intel 2>/dev/null
modprobe vhost_vsock
modprobe tun  # /dev/net/tun for pod taps (no udev here to make the node on demand)
for dev in /dev/kvm /dev/vhost-vsock; do
    [ -c "$dev" ] || { echo "lane: $dev missing after modprobe"; finish 91; }
done
# The modes Debian's udev rules give them (L1 runs no udev): group kvm,
# so that an unprivileged QEMU can be given them.
getent group kvm >/dev/null || groupadd --system kvm
chgrp kvm /dev/kvm /dev/vhost-vsock
chmod 0660 /dev/kvm
chmod 0666 /dev/vhost-vsock

# The checkout, copied: tests write beside themselves (caches, temp files).
mkdir -p /hyperrun
tar -C /mnt/checkout --exclude=./.venv --exclude=./.git --exclude=./build -cf - . \
    | tar -C /hyperrun -xf - || finish 92
cd /hyperrun

# What `make setup` does on a host: the CNI network and QEMU's user.
PY=/opt/hyperrun-venv/bin/python
$PY -m hyperrun.network install-config >/dev/null || finish 93
id -u hyperrun-vmm >/dev/null 2>&1 || useradd --system --user-group --no-create-home \
    --home-dir /nonexistent --shell /usr/sbin/nologin hyperrun-vmm

# The host's lane.py wrote the environment and the command.
. /mnt/results/lane.env
say "booted $(cut -d' ' -f1 /proc/uptime)"
/opt/hyperrun-venv/bin/hyperrun check
say "checked $?"
# fd 3: the lane's events, kept out of pytest's capture of fds 1 and 2.
/bin/sh -c "$LANE_COMMAND" 3>&1
finish $?
