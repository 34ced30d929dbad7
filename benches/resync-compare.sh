#!/usr/bin/env bash
# Side-by-side resync comparison, in one run: creates a raw image pair (default 2 GiB, 1 %
# of 64 KiB blocks changed), then times reading both images, b3sum of both, rsync
# --inplace, qemu-img compare on an identical pair, and lifeboat-resync (local fast path,
# remote mode, hash-tree mode). Every result that writes is checked with cmp. Prints a
# table with each time as a ratio to rsync, plus bytes sent and peak memory.
#
# Usage: benches/resync-compare.sh [SIZE_MIB] [WORK_DIR]    (page cache hot, best of 3)
# Not part of CI: it needs ~5 × SIZE of disk and a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MIB=${1:-2048}
WORK=${2:-$(mktemp -d /tmp/resync-compare.XXXXXX)}
RUNS=3
BLOCK=65536

need() { command -v "$1" >/dev/null 2>&1; }
if ! need rsync || ! need b3sum; then
  echo "installing rsync and b3sum (Debian packages)..." >&2
  apt-get update -qq >/dev/null && apt-get install -y -qq rsync b3sum >/dev/null
fi
need qemu-img || { echo "qemu-img is required" >&2; exit 1; }

cargo build --release --locked -q -p lifeboat-benches --bin resync-bench
TOOL=target/release/resync-bench

A=$WORK/source.raw; B=$WORK/target.raw; C=$WORK/identical.raw
echo "== creating a ${SIZE_MIB} MiB pair in $WORK" >&2
python3 - "$A" "$B" "$C" "$SIZE_MIB" "$BLOCK" <<'PY'
import os, random, shutil, sys
a, b, c, mib, block = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
size = mib << 20
rng = random.Random(20261128)
with open(a, "wb") as f:
    chunk = os.urandom(8 << 20)
    for i in range(size // len(chunk)):
        # vary each chunk cheaply so blocks are distinct
        f.write(chunk[i % 4096:] + chunk[:i % 4096])
shutil.copyfile(a, b)
shutil.copyfile(a, c)
blocks = size // block
changed = rng.sample(range(blocks), max(1, blocks // 100))
with open(b, "r+b") as f:
    for i in changed:
        f.seek(i * block + rng.randrange(block - 16))
        f.write(os.urandom(16))
print(f"changed {len(changed)} of {blocks} blocks", file=sys.stderr)
PY
cat "$A" "$B" "$C" > /dev/null   # warm the page cache

# best-of-N wall time in seconds of a command (after a reset step, not timed)
best() {
  local reset=$1; shift
  local best=""
  for _ in $(seq $RUNS); do
    eval "$reset"
    local t0 t1 dt
    t0=$(date +%s.%N); "$@" > /dev/null 2>&1; t1=$(date +%s.%N)
    dt=$(echo "$t1 - $t0" | bc -l)
    if [ -z "$best" ] || [ "$(echo "$dt < $best" | bc -l)" = 1 ]; then best=$dt; fi
  done
  printf '%.3f' "$best"
}
command -v bc >/dev/null || { apt-get install -y -qq bc >/dev/null; }

R=$WORK/rsync.raw; O=$WORK/ours.raw
t_read=$(best : cat "$A" "$B")
t_b3=$(best : b3sum --num-threads 2 "$A" "$B")
t_rsync=$(best "cp --sparse=never $B $R" rsync --inplace --no-whole-file -B $BLOCK "$A" "$R")
cmp "$A" "$R" || { echo "rsync result differs!" >&2; exit 1; }
t_qemu=$(best : qemu-img compare -f raw -F raw "$A" "$C")
t_local=$(best : "$TOOL" local "$A" "$B")
t_remote=$(best : "$TOOL" remote "$A" "$B")
t_tree=$(best : "$TOOL" tree "$A" "$B")
# Apply once each way and check the result.
cp --sparse=never "$B" "$O"; "$TOOL" local "$A" "$O" --apply > /dev/null; cmp "$A" "$O"
cp --sparse=never "$B" "$O"; "$TOOL" remote "$A" "$O" --apply > /dev/null; cmp "$A" "$O"
t_qemu_ours=$(best : "$TOOL" local "$A" "$C")

remote_line=$("$TOOL" remote "$A" "$B")
tree_line=$("$TOOL" tree "$A" "$B" | tr '\n' ' ')
data=$(sed -E 's/.*data_bytes=([0-9]+).*/\1/' <<<"$remote_line")
digests=$(sed -E 's/.*digest_bytes=([0-9]+).*/\1/' <<<"$remote_line")
image=$((SIZE_MIB << 20))

peak() { /usr/bin/time -f '%M' "$@" 2>&1 >/dev/null | tail -1; }
mem_2g=$(peak "$TOOL" remote "$A" "$B")
S1=$WORK/sparse-a.raw; S2=$WORK/sparse-b.raw
truncate -s 16G "$S1"; truncate -s 16G "$S2"
printf 'x' | dd of="$S2" bs=1 seek=$((5 << 30)) conv=notrunc status=none
mem_16g=$(peak "$TOOL" remote "$S1" "$S2")

gbps() { echo "scale=2; $image / $1 / 1000000000" | bc -l; }
ratio() { echo "scale=2; $1 / $t_rsync" | bc -l; }
echo
echo "| what (${SIZE_MIB} MiB pair, 1 % of 64 KiB blocks changed, best of $RUNS) | seconds | GB/s of image | × rsync time |"
echo "|---|---|---|---|"
echo "| read both images (cat) | $t_read | $(gbps "$t_read") | $(ratio "$t_read") |"
echo "| b3sum --num-threads 2, both images | $t_b3 | $(gbps "$t_b3") | $(ratio "$t_b3") |"
echo "| rsync --inplace --no-whole-file -B 65536 | $t_rsync | $(gbps "$t_rsync") | 1.00 |"
echo "| qemu-img compare, identical pair | $t_qemu | $(gbps "$t_qemu") | $(ratio "$t_qemu") |"
echo "| lifeboat local fast path (byte compare) | $t_local | $(gbps "$t_local") | $(ratio "$t_local") |"
echo "| lifeboat local fast path, identical pair | $t_qemu_ours | $(gbps "$t_qemu_ours") | $(ratio "$t_qemu_ours") |"
echo "| lifeboat remote (target signature + source hashed) | $t_remote | $(gbps "$t_remote") | $(ratio "$t_remote") |"
echo "| lifeboat hash-tree (both signatures + exchange) | $t_tree | $(gbps "$t_tree") | $(ratio "$t_tree") |"
echo
echo "remote resync sends: data $data + signature $digests bytes = $(echo "scale=3; 100 * ($data + $digests) / $image" | bc -l) % of the image"
echo "hash tree: $tree_line"
echo "ours vs qemu-img compare on the identical pair: $(echo "scale=2; $t_qemu / $t_qemu_ours" | bc -l) x faster"
echo "ours remote vs b3sum of both: $(echo "scale=2; $t_b3 / $t_remote" | bc -l) x b3sum speed"
echo "peak RSS of remote mode: ${mem_2g} KiB on the ${SIZE_MIB} MiB pair, ${mem_16g} KiB on a 16 GiB sparse pair"
rm -rf "$WORK"
