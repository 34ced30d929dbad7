#!/usr/bin/env bash
# The reference agent side by side with the peer tools, in one run, on the local site:
#   initial replication:  `lifeboat protect`  vs  `cp --sparse=always` + `sync -f` of the disk
#   disk use after it:    the embedded store  vs  the sparse copy
#   resync after 1 %:     `lifeboat resync`   vs  `rsync --inplace --no-whole-file --ignore-times`
# The disk (default 1 GiB) is half random data, half zero regions. For the resync, 1 % of
# the 64 KiB blocks are rewritten, then rewritten back, alternately: every timed run of
# either tool has 1 % to send. Results are checked (the replica's test-failover export and
# rsync's target must equal the disk). Prints each time and the ratio lifeboat / peer.
#
# Usage: benches/agent-compare.sh [SIZE_MIB] [WORK_DIR]    (page cache hot, best of 3)
# Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MIB=${1:-1024}
WORK=${2:-$(mktemp -d /tmp/agent-compare.XXXXXX)}
RUNS=3
command -v rsync >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get install -y -qq rsync >/dev/null; }

cargo build --release --locked -q -p lifeboat-agent
LB=$PWD/target/release/lifeboat
cd "$WORK"

python3 - "$SIZE_MIB" <<'PY'
import os, random, sys
mib = int(sys.argv[1]); size = mib << 20; region = 1 << 20
rng = random.Random(7)
with open("disk.raw", "wb") as f:
    f.truncate(size)
    chunk = os.urandom(region)
    for i in range(size // region):
        if rng.random() < 0.5:
            f.seek(i * region)
            f.write(chunk[i % 4096:] + chunk[:i % 4096])
blocks = size // 65536
changed = rng.sample(range(blocks), blocks // 100)
with open("changes", "w") as f:
    f.write("\n".join(map(str, changed)))
PY
cat disk.raw > /dev/null

now() { date +%s.%N; }
best() { # best-of-N seconds of "$@", after running the reset command $1 (not timed)
  local reset=$1; shift; local b=""
  for _ in $(seq $RUNS); do
    eval "$reset"
    local t0 t1; t0=$(now); "$@" >/dev/null 2>&1; t1=$(now)
    local dt; dt=$(echo "$t1 - $t0" | bc -l)
    if [ -z "$b" ] || (( $(echo "$dt < $b" | bc -l) )); then b=$dt; fi
  done
  echo "$b"
}

# Rewrites the chosen blocks with fresh bytes (toggle 0) or their saved originals (1).
toggle() {
  python3 - "$1" <<'PY'
import os, sys
mode = sys.argv[1]
blocks = [int(x) for x in open("changes").read().split()]
with open("disk.raw", "r+b") as f:
    if mode == "save":
        with open("originals", "wb") as o:
            for b in blocks:
                f.seek(b * 65536); o.write(f.read(65536))
    elif mode == "new":
        for b in blocks:
            f.seek(b * 65536); f.write(os.urandom(65536))
    else:
        with open("originals", "rb") as o:
            for b in blocks:
                f.seek(b * 65536); f.write(o.read(65536))
PY
}
toggle save
STATE=new
flip() { toggle "$STATE"; if [ "$STATE" = new ]; then STATE=old; else STATE=new; fi; }

echo "== initial replication of ${SIZE_MIB} MiB" >&2
t_cp=$(best "rm -f copy.raw" sh -c "cp --sparse=always disk.raw copy.raw && sync -f copy.raw")
t_protect=$(best "rm -rf site" "$LB" --site site protect vm --disk disk.raw)
# Disk use: the store after protect, against the data (what the sparse copy allocates).
used_store=$(du -s --block-size=1 site/store | cut -f1)
used_data=$(du -s --block-size=1 copy.raw | cut -f1)

echo "== resync after 1 % of blocks changed" >&2
cp disk.raw peer.raw
t_rsync=$(best "flip" rsync --inplace --no-whole-file --ignore-times disk.raw peer.raw)
cmp disk.raw peer.raw
toggle old; STATE=new   # the disk as protected: every resync run below has 1 % to send
t_resync=$(best "flip" "$LB" --site site resync vm)
"$LB" --site site resync vm | tail -n 1 >&2
"$LB" --site site test-failover vm --out tf >/dev/null
cmp disk.raw tf/disk0.raw
"$LB" --site site test-failover-cleanup vm >/dev/null

printf '\n%-34s %10s %10s %8s\n' "operation (${SIZE_MIB} MiB)" "lifeboat" "peer" "ratio"
printf '%-34s %9.2fs %9.2fs %7.2fx\n' "initial copy (protect / cp)" "$t_protect" "$t_cp" "$(echo "$t_protect / $t_cp" | bc -l)"
printf '%-34s %9.2fs %9.2fs %7.2fx\n' "1 % resync (resync / rsync)" "$t_resync" "$t_rsync" "$(echo "$t_resync / $t_rsync" | bc -l)"
printf '%-34s %8.0fM %8.0fM %7.2fx\n' "disk use (store / sparse copy)" "$(echo "$used_store / 1048576" | bc -l)" "$(echo "$used_data / 1048576" | bc -l)" "$(echo "$used_store / $used_data" | bc -l)"
echo "($(nproc) cores)"
