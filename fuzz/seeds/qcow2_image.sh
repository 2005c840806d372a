#!/usr/bin/env bash
# Seeds for the qcow2_image fuzz target: small images made by qemu-img and
# qemu-io (written to corpus/qcow2_image/). Needs qemu-utils.
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
qemu-img create -q -f qcow2 "$tmp/base.qcow2" 1M
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$tmp/top.qcow2" 1M
for f in "$tmp"/*.qcow2; do
    cp "$f" "$out/$(basename "$f")"
done
