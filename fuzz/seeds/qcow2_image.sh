#!/usr/bin/env bash
# Seeds for the qcow2_image fuzz target (written to corpus/qcow2_image/):
# small images made by qemu-img and qemu-io, each once bare (no operations)
# and once followed by operation records (see the target's doc comment for
# the input format). Needs qemu-utils and python3.
set -euo pipefail
out="$(dirname "$0")/../corpus/qcow2_image"
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for cs in 512 4096 65536; do
    qemu-img create -q -f qcow2 -o cluster_size=$cs "$tmp/empty-$cs.qcow2" 1M
    cp "$tmp/empty-$cs.qcow2" "$tmp/data-$cs.qcow2"
    qemu-io -c "write -P 0x5a 0 64k" -c "write -P 0xa5 512k 4k" "$tmp/data-$cs.qcow2" >/dev/null
done
# The fuzz target puts a backing file named base.qcow2 next to the image.
qemu-img create -q -f qcow2 "$tmp/base.qcow2" 1M
qemu-img create -q -f qcow2 -o cluster_size=4096 -b base.qcow2 -F qcow2 "$tmp/top.qcow2" 2M
qemu-io -c "write -P 0x3c 4k 8k" "$tmp/top.qcow2" >/dev/null
# Larger than its backing file (2 MiB in the fuzz target): the rest reads as
# zeroes.
qemu-img create -q -f qcow2 -o cluster_size=4096 -b base.qcow2 -F qcow2 "$tmp/top-large.qcow2" 3M
# Compressed clusters (copy-on-write, discard and write-zeroes of them).
qemu-img create -q -f raw "$tmp/plain.raw" 256k
qemu-io -f raw -c "write -P 0x12 0 96k" -c "write -P 0x34 200k 5000" "$tmp/plain.raw" >/dev/null
qemu-img convert -c -O qcow2 -o cluster_size=4096 "$tmp/plain.raw" "$tmp/compressed.qcow2"
# Zero clusters with preallocated host clusters, and zero clusters without.
qemu-img create -q -f qcow2 -o cluster_size=4096,preallocation=metadata "$tmp/prealloc.qcow2" 256k
cp "$tmp/data-4096.qcow2" "$tmp/zeroed.qcow2"
qemu-io -c "write -z 0 8k" -c "write -z -u 16k 8k" "$tmp/zeroed.qcow2" >/dev/null
# A virtual size that is not a multiple of the cluster size.
qemu-img create -q -f qcow2 -o cluster_size=65536 "$tmp/odd.qcow2" 1000k
qemu-io -c "write -P 0x77 960k 40k" "$tmp/odd.qcow2" >/dev/null
# A poisoned cluster: the L2 entry of guest cluster 3 with a reserved bit set.
cp "$tmp/data-4096.qcow2" "$tmp/poisoned.qcow2"
python3 - "$tmp/poisoned.qcow2" <<'EOF'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(40)
    (l1,) = struct.unpack(">Q", f.read(8))
    f.seek(l1)
    (l2,) = struct.unpack(">Q", f.read(8))
    at = (l2 & 0x00FFFFFFFFFFFE00) + 3 * 8
    f.seek(at)
    (entry,) = struct.unpack(">Q", f.read(8))
    f.seek(at)
    f.write(struct.pack(">Q", entry | 0x2))
EOF

# Appends operation records and their count to a copy of an image: the
# generic set, or (third argument "whole") whole-cluster discards and
# write-zeroes, each read back.
with_ops() {
    python3 - "$1" "$2" "${3:-generic}" <<'EOF'
import sys

READ, WRITE, DISCARD, ZEROES, FLUSH = 0, 2, 5, 6, 7
START, CLUSTER, END, RAW = 0, 1, 2, 3
SMALL, CLUSTERS, NEAR_CLUSTERS, ANY = 0, 1, 2, 3


def op(kind, where, v, length, w, joins=False, shape=0, cut=(0, 0)):
    return bytes([kind | (8 if joins else 0) | shape << 4, where | length << 2,
                  v & 0xff, v >> 8, w & 0xff, w >> 8, cut[0], cut[1]])


def boundary(cluster, sectors):
    """Where CLUSTER positions start: `sectors` (-8..7) from a cluster start."""
    return cluster << 4 | (sectors + 8)


ops = [
    # 8 sectors across the start of cluster 1, cut anywhere; read back.
    op(WRITE, CLUSTER, boundary(1, -4), SMALL, 7, shape=2, cut=(1, 3)),
    op(READ, CLUSTER, boundary(1, -4), SMALL, 7, shape=3, cut=(5, 9)),
    # Two whole clusters, cut on a sector; concurrent writes to one
    # cluster and a read of another.
    op(WRITE, CLUSTER, boundary(2, 0), CLUSTERS, 1, shape=1, cut=(1, 0)),
    op(WRITE, START, 0, SMALL, 3),
    op(WRITE, START, 2, SMALL, 3, joins=True),
    op(READ, CLUSTER, boundary(2, 0), NEAR_CLUSTERS, 1, joins=True),
    # Discard a cluster, zero a few sectors, flush.
    op(DISCARD, CLUSTER, boundary(2, 0), CLUSTERS, 0),
    op(ZEROES, START, 3, SMALL, 4),
    op(FLUSH, 0, 0, 0, 0),
    # The end of the disk: the last 8 sectors, past it, the last sector.
    op(READ, END, 40, SMALL, 7),
    op(WRITE, END, 60, SMALL, 1),
    op(WRITE, END, 47, SMALL, 0),
    op(DISCARD, END, 44, SMALL, 3, joins=True),
    # Much of the disk at once, and a write-zeroes over cluster boundaries.
    op(READ, START, 0, ANY, 300, shape=3, cut=(7, 200)),
    op(ZEROES, CLUSTER, boundary(1, 3), NEAR_CLUSTERS, 6),
    op(WRITE, CLUSTER, boundary(3, -1), NEAR_CLUSTERS, 5),
    op(FLUSH, 0, 0, 0, 0),
]
if sys.argv[3] == "whole":
    ops = [
        op(DISCARD, CLUSTER, boundary(5, 0), CLUSTERS, 0),
        op(READ, CLUSTER, boundary(5, 0), CLUSTERS, 0),
        op(ZEROES, CLUSTER, boundary(7, 0), CLUSTERS, 1),
        op(READ, CLUSTER, boundary(6, 0), CLUSTERS, 3),
        op(FLUSH, 0, 0, 0, 0),
    ]
with open(sys.argv[1], "rb") as f:
    image = f.read()
with open(sys.argv[2], "wb") as f:
    f.write(image + b"".join(ops) + bytes([len(ops)]))
EOF
}

rm "$tmp/base.qcow2"
for f in "$tmp"/*.qcow2; do
    name=$(basename "$f" .qcow2)
    { cat "$f"; printf '\0'; } >"$out/$name.qcow2"
    with_ops "$f" "$out/$name-ops.qcow2"
done
with_ops "$tmp/compressed.qcow2" "$out/compressed-whole-ops.qcow2" whole
