#!/usr/bin/env bash
# The big-tenant figure of docs/benchmarks.md (issue 22): a SIZE_MB tenant
# on the embedded file store imported (`tenants create --from-file`),
# served by a real `tenantd serve` (claim, 20 increments, a compaction
# after 10 of them), released with SIGTERM and restored with
# `tenantd restore`; the wall time and peak RSS (GNU time's %M, the
# kernel's maxrss) of each process, and the serving process's VmHWM before
# the claim (idle) and after the compaction.
#
# Usage: scripts/bench-big-tenant.sh [SIZE_MB (1024)]
# Needs the release binary (`nice cargo build --release -p tenantd`),
# python3, curl and /usr/bin/time. Uses SIZE_MB × 3 of disk under
# $TMPDIR (the source file, the store, the working copy, the restore),
# all removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

size=${1:-1024}
bin=${TENANTD_BIN:-$PWD/target/release/tenantd}
[ -x "$bin" ] || { echo "error: $bin missing: run 'nice cargo build --release -p tenantd' first" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "error: /usr/bin/time (GNU time) is needed for the peak RSS" >&2; exit 1; }
scratch=$(mktemp -d)
serve_pid=
cleanup() {
    [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null || true
    rm -rf "$scratch"
}
trap cleanup EXIT
store="file://$scratch/store"
max=$((size * 4 * 1048576))
# Bringing the snapshot up to date at the release copies the whole file:
# give big tenants more than the default drain timeout.
drain=$((size / 20 > 300 ? size / 20 : 300))

# "<seconds> <peak RSS in KiB>" of the command run by `timed NAME ...`.
timed() {
    local name=$1
    shift
    /usr/bin/time -f "%e %M" -o "$scratch/$name.time" "$@"
}
report() { # NAME LABEL
    read -r secs kib <"$scratch/$1.time"
    printf '%-9s %8.1f s  peak RSS %6d MiB\n' "$2" "$secs" $((kib / 1024))
}
hwm_mib() { awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$1/status"; }

echo "==> a ${size} MiB SQLite file"
python3 - "$scratch/big.sqlite3" "$size" <<'EOF'
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
conn.executescript("""
    PRAGMA journal_mode = DELETE;
    CREATE TABLE welcome (count INTEGER); INSERT INTO welcome VALUES (0);
    CREATE TABLE ballast (b BLOB);
""")
for _ in range(int(sys.argv[2])):
    conn.execute("INSERT INTO ballast VALUES (randomblob(1048576))")
conn.commit()
conn.close()
EOF

echo "==> import"
timed import "$bin" tenants create big --from-file "$scratch/big.sqlite3" \
    --store "$store" --max-db-bytes "$max" >/dev/null
rm "$scratch/big.sqlite3"

echo "==> serve: claim, 20 increments (a compaction after 10), release (SIGTERM)"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
/usr/bin/time -f "%e %M" -o "$scratch/serve.time" "$bin" serve \
    --listen "127.0.0.1:$port" --machine-id a0000000000001 --store "$store" \
    --data-dir "$scratch/local" --lease-ttl 30s --drain-timeout "${drain}s" \
    --compact-after 10 --max-db-bytes "$max" >"$scratch/serve.log" 2>&1 &
time_pid=$!
for _ in $(seq 1 200); do
    serve_pid=$(pgrep -P "$time_pid" || true)
    [ -n "$serve_pid" ] && curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done
idle=$(hwm_mib "$serve_pid")
claim=$(curl -sf -o /dev/null -w '%{time_total}' -X POST "http://127.0.0.1:$port/customers/big/increment")
inc() { curl -sf -o /dev/null -X POST "http://127.0.0.1:$port/customers/big/increment"; }
for _ in $(seq 2 10); do inc; done
# The tenth commit starts a compaction; ten more go on meanwhile.
started=$(date +%s.%N)
for _ in $(seq 11 20); do inc; done
during=$(python3 -c "import time; print(f'{time.time() - $started:.2f}')")
until grep -q 'snapshot written' "$scratch/serve.log"; do sleep 0.05; done
compacted=$(python3 -c "import time; print(f'{time.time() - $started:.1f}')")
served=$(hwm_mib "$serve_pid")
released_at=$(date +%s.%N)
kill -TERM "$serve_pid"
wait "$time_pid" || true
serve_pid=
released=$(python3 -c "import time; print(f'{time.time() - $released_at:.1f}')")

echo "==> restore"
timed restore "$bin" restore --store "$store" --customer-id big \
    --output "$scratch/restored.sqlite3" >/dev/null
count=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('SELECT count FROM welcome').fetchone()[0])" "$scratch/restored.sqlite3")

echo
echo "${size} MiB tenant, file store, $(nproc) cores:"
report import import
printf '%-9s idle VmHWM %d MiB; claim (first increment) %.1f s; compaction written %s s after the 10th commit, the next 10 commits meanwhile took %s s; VmHWM then %d MiB\n' \
    serve "$idle" "$claim" "$compacted" "$during" "$served"
printf '%-9s %8s s  (SIGTERM to exit: the snapshot brought up to date, or the deltas left to the next holder in the log when they are small beside the database; serve.log says which)\n' release "$released"
report serve "serve"
report restore restore
echo "restored count: $count (20 expected)"
[ "$count" = 20 ] || { echo "error: the restored tenant has count $count, not 20" >&2; exit 1; }
