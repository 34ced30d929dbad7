#!/usr/bin/env bash
# The achieved RPO of `lifeboat run` with N items under a steady write rate.
#
# Sets up N items (one 64 MiB raw disk each, 30 s copy frequency) on the local embedded
# store, starts the service with --metrics, and for DURATION seconds has every item's
# stand-in guest write (8 x 4 KiB) and ship a closed log into the inbox every WRITE_EVERY
# seconds, as Hyper-V Replica's log shipper would. Samples lifeboat_rpo_seconds every 2 s
# (from the first point on) and prints, per item and over all items, the RPO's p50 / p99 /
# max, then the service's CPU (user+system over wall time) and its peak memory (VmHWM).
# Every item must end with every shipped log applied (inbox empty) and a verify passing.
#
# Usage: benches/rpo.sh [N_ITEMS] [DURATION_S] [WRITE_EVERY_S] [WORK_DIR]
# Not part of CI (minutes of wall time).
set -euo pipefail
cd "$(dirname "$0")/.."

N=${1:-20}
DURATION=${2:-180}
EVERY=${3:-10}
WORK=${4:-$(mktemp -d /tmp/rpo-bench.XXXXXX)}
PORT=${PORT:-19477}

cargo build --release --locked -q -p lifeboat-agent
LB=$PWD/target/release/lifeboat
cd "$WORK"
export LIFEBOAT_SITE=$WORK/site
lb() { "$LB" "$@"; }

echo "== $N items, 64 MiB each, 30 s copy frequency; a log per item every ${EVERY} s for ${DURATION} s" >&2
for i in $(seq 1 "$N"); do
    truncate -s 64M "d$i.raw"
    lb protect "vm$i" --disk "d$i.raw" --copy-frequency 30s >/dev/null
done

"$LB" run --metrics "127.0.0.1:$PORT" > service.log 2>&1 &
SVC=$!
trap 'kill $SVC 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf "127.0.0.1:$PORT/metrics" >/dev/null && break; sleep 0.2; done

python3 - "$LB" "$N" "$DURATION" "$EVERY" "$PORT" "$SVC" <<'PY'
import os, re, subprocess, sys, time, urllib.request
lb, n, duration, every, port, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
site = os.environ["LIFEBOAT_SITE"]
clk = os.sysconf("SC_CLK_TCK")

def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / clk

def metrics():
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r'lifeboat_rpo_seconds\{item="([^"]+)"\} (\S+)', page)}

samples = {f"vm{i}": [] for i in range(1, n + 1)}
start, cpu0, seq, next_write, next_sample = time.time(), cpu(), 0, 0.0, 0.0
while (now := time.time() - start) < duration:
    if now >= next_write:
        seq += 1
        for i in range(1, n + 1):
            log = f"l{i}-{seq}.hrl"
            subprocess.run([lb, "guest-write", f"vm{i}", "--disk", "0", "--log", log,
                            "--writes", "8", "--size", "4K", "--seed", str(seq)],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            inbox = f"{site}/inbox/vm{i}/0"
            os.makedirs(inbox, exist_ok=True)
            os.rename(log, f"{inbox}/{log}")
        next_write += every
    if now >= next_sample:
        for item, rpo in metrics().items():
            samples[item].append(rpo)
        next_sample += 2
    time.sleep(0.2)
wall, used = time.time() - start, cpu() - cpu0
hwm = next(l.split()[1] for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM"))

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")

print(f"{'item':<8}{'samples':>8}{'p50 s':>8}{'p99 s':>8}{'max s':>8}")
for item, xs in samples.items():
    print(f"{item:<8}{len(xs):>8}{pct(xs, 50):>8.1f}{pct(xs, 99):>8.1f}{max(xs, default=float('nan')):>8.1f}")
every_sample = [x for xs in samples.values() for x in xs]
print(f"{'all':<8}{len(every_sample):>8}{pct(every_sample, 50):>8.1f}{pct(every_sample, 99):>8.1f}{max(every_sample, default=float('nan')):>8.1f}")
print(f"logs shipped: {seq * n}; service CPU {used:.1f} s over {wall:.0f} s wall ({100 * used / wall:.1f} % of one core); peak memory {int(hwm) / 1024:.1f} MiB")
PY

# Drain: the logs still in the inbox go at the next cycle; then every item must verify.
for _ in $(seq 90); do
    left=$(find site/inbox -maxdepth 3 -name '*.hrl' | wc -l)
    [ "$left" = 0 ] && break
    sleep 1
done
kill -TERM $SVC; wait $SVC || true
trap - EXIT
[ -z "$(find site/inbox -path '*refused*' -name '*.reason')" ] || { echo "logs were refused:" >&2; find site/inbox -name '*.reason' -exec cat {} + >&2; exit 1; }
[ "$left" = 0 ] || { echo "$left logs left in the inbox" >&2; exit 1; }
for i in $(seq 1 "$N"); do lb verify "vm$i" >/dev/null; done
echo "every item verified; work dir $WORK" >&2
