#!/usr/bin/env bash
# PageWriter throughput to Azurite next to a raw baseline in one run: the same bytes sent
# as 4 MiB Put Page requests by plain parallel curl processes (SAS-authenticated), with the
# same number in flight. Both results are read back and compared with the source file.
#
# Usage: benches/pageblob-compare.sh [SIZE_MIB] [IN_FLIGHT]   (not part of CI)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-256}
IN_FLIGHT=${2:-4}
CHUNK=$((4 << 20))

[ -x tools/azurite/node_modules/.bin/azurite-blob ] || npm ci --prefix tools/azurite --no-audit --no-fund --loglevel=error
cargo build --release --locked -q -p lifeboat-pageblob --example pageblob_bench
TOOL=target/release/examples/pageblob_bench
WORK=$(mktemp -d /tmp/pageblob-compare.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
tools/azurite/node_modules/.bin/azurite-blob --blobHost 127.0.0.1 --blobPort "$PORT" \
  --inMemoryPersistence --skipApiVersionCheck --disableTelemetry > "$WORK/azurite.log" 2>&1 &
AZ=$!
trap 'kill $AZ 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 150); do curl -s -o /dev/null "http://127.0.0.1:$PORT/devstoreaccount1?comp=list" && break; sleep 0.1; done

# The same bytes the tool writes (lifeboat-source's SplitMix64, seed 42), for curl and for
# checking.
python3 - "$WORK/data.bin" "$SIZE_MIB" <<'PY'
import struct, sys
path, mib = sys.argv[1], int(sys.argv[2])
M = (1 << 64) - 1
s = 42
words = []
for _ in range((mib << 20) // 8):
    s = (s + 0x9E3779B97F4A7C15) & M
    z = s
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
    words.append(z ^ (z >> 31))
open(path, "wb").write(struct.pack("<%dQ" % len(words), *words))
PY
split -b $CHUNK -d -a 4 "$WORK/data.bin" "$WORK/chunk."

read -r t_ours puts _ < <("$TOOL" write "$PORT" bench ours "$SIZE_MIB" "$IN_FLIGHT")
"$TOOL" verify "$PORT" bench ours "$WORK/data.bin" > /dev/null

SAS=$("$TOOL" sas)
for f in "$WORK"/chunk.*; do "$TOOL" crc "$f" > "$f.crc"; done
# One 4 MiB Put Page of chunk file $1 to blob $BLOB; with WITH_CRC set, also send its CRC-64.
put() {
  local f=$1 i start end code crc=()
  i=$((10#${f##*.}))
  start=$((i * CHUNK)); end=$((start + $(stat -c %s "$f") - 1))
  [ -n "${WITH_CRC:-}" ] && crc=(-H "x-ms-content-crc64: $(cat "$f.crc")")
  code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT \
    "http://127.0.0.1:$PORT/devstoreaccount1/bench/$BLOB?comp=page&$SAS" \
    -H "x-ms-version: 2022-11-02" -H "x-ms-page-write: update" \
    -H "x-ms-range: bytes=$start-$end" -H "Content-Type: application/octet-stream" \
    "${crc[@]}" --data-binary @"$f")
  [ "$code" = 201 ] || { echo "curl PUT $f: HTTP $code" >&2; return 1; }
}
export -f put; export PORT SAS CHUNK
# Times sending every chunk to blob $1 with curl, then checks the blob.
timed_curl() {
  local t0 t1
  "$TOOL" create "$PORT" bench "$1" "$SIZE_MIB"
  t0=$(date +%s.%N)
  find "$WORK" -name 'chunk.*' ! -name '*.crc' | sort | BLOB=$1 xargs -P "$IN_FLIGHT" -I{} bash -c 'put {}'
  t1=$(date +%s.%N)
  "$TOOL" verify "$PORT" bench "$1" "$WORK/data.bin" > /dev/null
  echo "$t1 - $t0" | bc -l
}
t_curl=$(timed_curl raw)
t_curl_crc=$(WITH_CRC=1 timed_curl rawcrc)

mibps() { echo "scale=1; $SIZE_MIB / $1" | bc -l; }
echo
echo "| ${SIZE_MIB} MiB to Azurite, ${IN_FLIGHT} in flight, 4 MiB Put Pages | seconds | MiB/s | requests |"
echo "|---|---|---|---|"
printf '| lifeboat PageWriter (CRC-64, fenced, retrying) | %.3f | %s | %s |\n' "$t_ours" "$(mibps "$t_ours")" "$puts"
n=$(find "$WORK" -name 'chunk.*' ! -name '*.crc' | wc -l)
printf '| curl, plain parallel PUTs | %.3f | %s | %s |\n' "$t_curl" "$(mibps "$t_curl")" "$n"
printf '| curl, plain parallel PUTs with the same CRC-64 header | %.3f | %s | %s |\n' "$t_curl_crc" "$(mibps "$t_curl_crc")" "$n"
echo "PageWriter / curl time: $(echo "scale=2; $t_ours / $t_curl" | bc -l); PageWriter / curl-with-CRC time: $(echo "scale=2; $t_ours / $t_curl_crc" | bc -l)"
