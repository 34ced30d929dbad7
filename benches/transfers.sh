#!/usr/bin/env bash
# Initial replication of N items beside `lifeboat run`, one transfer at a time against
# N at once (`run --transfers`), in one run on the same disks.
#
# Makes N raw disks of SIZE_MIB (half random data in 1 MiB regions, half zeros), starts
# the service, protects every item beside it (the service does the copies) and times from
# the first protect to every item Protected; then `verify --source` checks each replica.
# Done with `--transfers 1`, then `--transfers N`, then 1 again (best of the two), on a
# fresh site and store each time. The store is the embedded one, or Azurite with
# AZURITE=1 (started here from tools/azurite, in memory).
#
# Usage: benches/transfers.sh [N_ITEMS] [SIZE_MIB] [WORK_DIR]
# Not part of CI.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

N=${1:-4}
SIZE_MIB=${2:-256}
WORK=${3:-$(mktemp -d /tmp/transfers-bench.XXXXXX)}
AZ_PORT=${AZ_PORT:-10777}

cargo build --release --locked -q -p lifeboat-agent
LB=$PWD/target/release/lifeboat
AZURITE_BIN=$PWD/tools/azurite/node_modules/.bin/azurite-blob
mkdir -p "$WORK" && cd "$WORK"

python3 - "$N" "$SIZE_MIB" <<'PY'
import os, random, sys
n, mib = int(sys.argv[1]), int(sys.argv[2])
for i in range(1, n + 1):
    rng = random.Random(i)
    with open(f"d{i}.raw", "wb") as f:
        f.truncate(mib << 20)
        for r in range(mib):
            if rng.random() < 0.5:
                f.seek(r << 20)
                f.write(rng.randbytes(1 << 20))
PY

AZ=""
cleanup() { [ -n "$AZ" ] && kill "$AZ" 2>/dev/null || true; }
trap cleanup EXIT

# One run: prints the seconds from the first protect to every item Protected.
run() {
    local transfers=$1 tag=$2
    rm -rf "site-$tag" "store-$tag"
    local target=(--site "$WORK/site-$tag")
    if [ "${AZURITE:-0}" = 1 ]; then
        target+=(--azure "http://127.0.0.1:$AZ_PORT/devstoreaccount1/bench-$tag"
                 --account devstoreaccount1
                 --key "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==")
    else
        target+=(--store "$WORK/store-$tag")
    fi
    "$LB" "${target[@]}" run --transfers "$transfers" > "service-$tag.log" 2>&1 &
    local svc=$!
    sleep 1
    local t0; t0=$(date +%s.%N)
    for i in $(seq 1 "$N"); do
        "$LB" "${target[@]}" -q protect "vm$i" --disk "d$i.raw" >/dev/null
    done
    local deadline=$((SECONDS + 1800)) done
    while :; do
        done=$("$LB" "${target[@]}" --json status | python3 -c '
import json, sys
print(sum(1 for s in json.load(sys.stdin) if s.get("state") == "protected"))')
        [ "$done" = "$N" ] && break
        if [ "$SECONDS" -gt "$deadline" ]; then
            echo "not every item protected after 30 min: see service-$tag.log" >&2
            exit 1
        fi
        sleep 0.2
    done
    local t1; t1=$(date +%s.%N)
    kill -TERM "$svc"; wait "$svc" || true
    for i in $(seq 1 "$N"); do
        "$LB" "${target[@]}" -q verify "vm$i" --source >/dev/null
    done
    echo "$t1 - $t0" | bc -l
}

if [ "${AZURITE:-0}" = 1 ]; then
    "$AZURITE_BIN" --blobHost 127.0.0.1 --blobPort "$AZ_PORT" --inMemoryPersistence \
        --skipApiVersionCheck --disableTelemetry > azurite.log 2>&1 &
    AZ=$!
    # Until it takes connections (2 s was not always enough: a service started before
    # it exits at once, and the run fails).
    for _ in $(seq 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$AZ_PORT") 2>/dev/null && break
        sleep 0.1
    done
fi

echo "== $N items of $SIZE_MIB MiB, store: $([ "${AZURITE:-0}" = 1 ] && echo Azurite || echo embedded)" >&2
a=$(run 1 a)
b=$(run "$N" b)
c=$(run 1 c)
one=$(python3 -c "print(min($a, $c))")
printf '%-34s %8.2fs\n' "--transfers 1 (best of 2)" "$one"
printf '%-34s %8.2fs\n' "--transfers $N" "$b"
printf '%-34s %8.2fx\n' "speed-up" "$(echo "$one / $b" | bc -l)"
echo "($(nproc) cores; runs: $a, $b, $c)"
