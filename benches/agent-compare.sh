#!/usr/bin/env bash
# The reference agent side by side with the peer tools, in one run, on the local site:
#   initial replication:  `lifeboat protect`  vs  `cp --sparse=always` + `sync -f` of the disk
#   disk use after it:    the embedded store  vs  the sparse copy
#   resync after 1 %:     `lifeboat resync`   vs  `rsync --inplace --no-whole-file --ignore-times`
#   local diff:           `lifeboat diff A B` vs  reading A and B with two readers (the floor)
#   signature hashing:    BLAKE3 signatures of A and B (both cores) vs `b3sum --num-threads 2`
#   applying logs:        `lifeboat replicate` of logged writes (a quarter of the disk, in
#                         four chained logs) vs `lifeboat hrl apply` of the same logs onto
#                         a raw copy of the replica
#   CPU of the initial copy: user + sys seconds per GiB of data, protect vs cp + sync, and
#                         vs the floor of any copy that digests what it writes: the disk's
#                         data read 1 MiB at a time, BLAKE3-digested per block and written
#                         back 256 KiB at a time (as the embedded store writes) on one
#                         thread, then one fdatasync (`resync-bench copy-floor`),
#                         and vs the same in protect's 4 MiB segments (each read whole
#                         into one of two buffers, then written)
# The disk (default 1 GiB) is half random data, half zero regions. For the resync, 1 % of
# the 64 KiB blocks are rewritten, then rewritten back, alternately: every timed run of
# either tool has 1 % to send. Results are checked (the replica's test-failover export and
# rsync's target must equal the disk). Prints each time and the ratio lifeboat / peer.
#
# Usage: benches/agent-compare.sh [SIZE_MIB] [WORK_DIR]    (page cache hot, median of 5)
# Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MIB=${1:-1024}
WORK=${2:-$(mktemp -d /tmp/agent-compare.XXXXXX)}
RUNS=5
if ! command -v rsync >/dev/null 2>&1 || ! command -v b3sum >/dev/null 2>&1; then
  apt-get update -qq >/dev/null && apt-get install -y -qq rsync b3sum >/dev/null
fi

cargo build --release --locked -q -p lifeboat-agent
cargo build --release --locked -q -p lifeboat-benches --bin resync-bench
LB=$PWD/target/release/lifeboat
RB=$PWD/target/release/resync-bench
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
wall() { local t0 t1; t0=$(now); "$@" >/dev/null 2>&1; t1=$(now); echo "$t1 - $t0" | bc -l; }
cpu_of() { /usr/bin/time -f "%U %S" -o cpu.time "$@" >/dev/null 2>&1; awk '{print $1 + $2}' cpu.time; }
# Each figure is a median of $RUNS measures ($1: wall or cpu_of, in seconds) of a tool and
# its peers, alternated: each round runs each command once (after its reset command and a
# sync, neither measured: a reset's own writes are not flushed inside the measured run), so
# every command meets the machine in the same minutes. On this VM the cost of the same
# run moves by a third from one minute to the next (the host's page reporting): measured
# in turns of five runs each, protect and `cp` met different minutes (run I's 1.57x, with
# 1.2x in alternating runs right after). The median, not the least: the least of 3 made
# one tool's lucky run the ratio (an `hrl apply` at 0.68 s against a median of 0.85 s).
# Each round starts one command further on, so each meets each place in the round: the run
# right after the copy floor cost this VM more (protect, 6 rounds in a fixed order: median
# 0.74 s of CPU right after the floor, 0.49 and 0.53 s in the two places after that).
# ROTATE=0 keeps the order (where a reset prepares the next command's work).
#   alternate MEASURE RESET1 CMD1 [RESET2 CMD2 ...]   (strings, eval'd) -> "M1 M2 ..."
alternate() {
  local measure=$1; shift
  local n=$(($# / 2)) i j r
  local -a all=()
  for r in $(seq "$RUNS"); do
    for j in $(seq 0 $((n - 1))); do
      i=$(((j + r * ${ROTATE:-1}) % n))
      local reset=${@:$((2 * i + 1)):1} cmd=${@:$((2 * i + 2)):1}
      eval "$reset"
      sync
      all[$((i * RUNS + r))]=$(eval "$measure $cmd")
    done
  done
  local out=()
  for i in $(seq 0 $((n - 1))); do
    out+=("$(for r in $(seq "$RUNS"); do echo "${all[$((i * RUNS + r))]}"; done |
      sort -g | sed -n "$(((RUNS + 1) / 2))p")")
  done
  echo "${out[*]}"
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

# CPU time the hypervisor gave to other guests (steal) during the timed runs: on a shared
# host it comes and goes, and slows the tool using more CPU (lifeboat) more than its peer.
stat0=$(head -n 1 /proc/stat)

echo "== initial replication of ${SIZE_MIB} MiB" >&2
PROTECT='"$LB" --site site protect vm --disk disk.raw'
CP='sh -c "cp --sparse=always disk.raw copy.raw && sync -f copy.raw"'
read -r t_protect t_cp < <(alternate wall "rm -rf site" "$PROTECT" "rm -f copy.raw" "$CP")
read -r c_protect c_cp c_floor c_pieces < <(alternate cpu_of "rm -rf site" "$PROTECT" \
  "rm -f copy.raw" "$CP" "rm -f floor.raw" '"$RB" copy-floor disk.raw floor.raw' \
  "rm -f pieces.raw" '"$RB" copy-floor disk.raw pieces.raw 4')
cmp disk.raw floor.raw && rm floor.raw
cmp disk.raw pieces.raw && rm pieces.raw
# Disk use: the store after protect, against the data (what the sparse copy allocates).
used_store=$(du -s --block-size=1 site/store | cut -f1)
used_data=$(du -s --block-size=1 copy.raw | cut -f1)

echo "== resync after 1 % of blocks changed" >&2
# Both start from the disk as protected; each flip before a round gives both 1 % to send.
cp disk.raw peer.raw
read -r t_resync t_rsync < <(ROTATE=0 alternate wall "flip" '"$LB" --site site resync vm' \
  ":" "rsync --inplace --no-whole-file --ignore-times disk.raw peer.raw")
cmp disk.raw peer.raw
"$LB" --site site resync vm | tail -n 1 >&2   # nothing left to send
"$LB" --site site test-failover vm --out tf >/dev/null
cmp disk.raw tf/disk0.raw
"$LB" --site site test-failover-cleanup vm >/dev/null

echo "== local diff and signatures" >&2
cp --sparse=never disk.raw other.raw
python3 - <<'PY'
import os
blocks = [int(x) for x in open("changes").read().split()]
with open("other.raw", "r+b") as f:
    for b in blocks:
        f.seek(b * 65536); f.write(os.urandom(65536))
PY
cat other.raw > /dev/null
read -r t_diff t_floor t_sig t_b3 < <(alternate wall \
  : '"$LB" diff disk.raw other.raw' \
  : 'sh -c "cat disk.raw > /dev/null & cat other.raw > /dev/null; wait"' \
  : '"$RB" signature disk.raw other.raw' \
  : "b3sum --num-threads 2 disk.raw other.raw")

echo "== applying logged writes" >&2
# The replica as it stands (the disk as protected), then a quarter of the disk written in
# 64 KiB writes, in four chained logs (each under half the disk: no resync).
"$LB" --site site test-failover vm --out base >/dev/null
cp --sparse=always base/disk0.raw base.raw   # the clean-up deletes the test disks
"$LB" --site site test-failover-cleanup vm >/dev/null
writes=$(( SIZE_MIB * 16 / 4 / 4 ))
for i in 1 2 3 4; do
  "$LB" --site site guest-write vm --disk 0 --log "l$i.hrl" --writes "$writes" --size 64K --seed "$i" >/dev/null
done
logged=$(( writes * 4 * 64 / 1024 ))
rm -rf site.before && cp -a site site.before
read -r t_repl t_hrl < <(alternate wall \
  "rm -rf site && cp -a site.before site" \
  '"$LB" --site site replicate vm --log 0=l1.hrl --log 0=l2.hrl --log 0=l3.hrl --log 0=l4.hrl' \
  "cp --sparse=always base.raw applied.raw" \
  '"$LB" hrl apply --disk applied.raw l1.hrl l2.hrl l3.hrl l4.hrl')
cmp disk.raw applied.raw
"$LB" --site site test-failover vm --out tf2 >/dev/null
cmp disk.raw tf2/disk0.raw

stat1=$(head -n 1 /proc/stat)
steal=$(echo "$stat0 $stat1" | awk '{t = 0; for (i = 2; i <= 11; i++) t += $(i + 11) - $i; print 100 * ($20 - $9) / t}')

printf '\n%-38s %10s %10s %8s\n' "operation (${SIZE_MIB} MiB)" "lifeboat" "peer" "ratio"
row() { printf '%-38s %9.2fs %9.2fs %7.2fx\n' "$1" "$2" "$3" "$(echo "$2 / $3" | bc -l)"; }
row "initial copy (protect / cp+sync)" "$t_protect" "$t_cp"
row "1 % resync (resync / rsync)" "$t_resync" "$t_rsync"
row "local diff (diff / two readers)" "$t_diff" "$t_floor"
row "signatures (BLAKE3 / b3sum -j2)" "$t_sig" "$t_b3"
row "${logged} MiB of logs (replicate / hrl apply)" "$t_repl" "$t_hrl"
printf '%-38s %8.0fM %8.0fM %7.2fx\n' "disk use (store / sparse copy)" "$(echo "$used_store / 1048576" | bc -l)" "$(echo "$used_data / 1048576" | bc -l)" "$(echo "$used_store / $used_data" | bc -l)"
# CPU (user + sys) per GiB of data, the median of the runs each.
data_gib=$(echo "$used_data / 1073741824" | bc -l)
cpu_row() { printf '%-38s %8.2fs %8.2fs %7.2fx\n' "$1" "$(echo "$2 / $data_gib" | bc -l)" "$(echo "$3 / $data_gib" | bc -l)" "$(echo "$2 / $3" | bc -l)"; }
cpu_row "CPU per GiB of data (protect / cp)" "$c_protect" "$c_cp"
cpu_row "CPU per GiB (protect / copy floor)" "$c_protect" "$c_floor"
cpu_row "CPU per GiB (protect / 4 MiB pieces)" "$c_protect" "$c_pieces"
printf '(%d cores; CPU steal during the runs: %.0f %% of the machine'"'"'s time)\n' "$(nproc)" "$steal"
