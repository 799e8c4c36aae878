#!/usr/bin/env bash
# Measures the fleet migration commands on the file store (or any store
# given as STORE=s3://bucket with the AWS_* environment):
#   1. `migrate apply --all` of one ALTER TABLE on N tenants held by one
#      pool machine (through the holder's admin route),
#   2. the same on N tenants that no machine holds (under apply's own lease),
#   3. `migrate status` on M tenants.
# Prints wall times and store requests (the command's, and the machine's
# from its /metrics). Usage: scripts/bench-migrations.sh [N] [M]
set -euo pipefail
T=${TENANTD:-target/debug/tenantd}
N=${1:-1000}
M=${2:-10000}
dir=$(mktemp -d)
STORE=${STORE:-file://$dir/store}
export TENANTD_ADMIN_TOKEN=bench-admin
unset TENANTD_STORE
trap 'kill $machine 2>/dev/null || true; rm -rf "$dir"' EXIT
now() { date +%s.%N; }
machine_requests() {
  curl -s -H "Authorization: Bearer $TENANTD_ADMIN_TOKEN" "http://$addr/metrics" |
    awk '/^tenantd_store_requests_total/ {s += $NF} END {print s + 0}'
}

mkdir -p "$dir/m"
echo "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT);" > "$dir/m/0001_items.sql"
$T migrate push --store "$STORE" "$dir/m" > /dev/null
seq -f "t%05g" 1 "$N" | xargs -n 200 $T tenants create --store "$STORE" > /dev/null

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
addr=127.0.0.1:$port
# The watcher would apply the push itself: look once an hour only, so that
# `migrate apply` is what is measured.
TENANTD_MIGRATIONS_INTERVAL=1h $T serve --listen "$addr" --store "$STORE" --data-dir "$dir/local" \
  --idle-timeout 1h --max-tenants $((N + 100)) --lease-ttl 5s > "$dir/machine.log" 2>&1 &
machine=$!
until curl -sf "http://$addr/healthz" > /dev/null; do sleep 0.2; done
seq -f "t%05g" 1 "$N" | xargs -P 8 -I{} curl -sf -o /dev/null "http://$addr/customers/{}/count"

echo "ALTER TABLE items ADD COLUMN price INTEGER;" > "$dir/m/0002_price.sql"
$T migrate push --store "$STORE" "$dir/m" > /dev/null
before=$(machine_requests)
start=$(now)
$T migrate apply --store "$STORE" --all --concurrency 8 --store-requests 2> "$dir/apply.err" | head -5 || true
end=$(now)
after=$(machine_requests)
echo "held: apply --all on $N tenants: $(echo "$end - $start" | bc) s; command: $(grep 'store requests' "$dir/apply.err"); machine: $((after - before)) requests"

kill -TERM $machine; wait $machine || true
echo "ALTER TABLE items ADD COLUMN sku TEXT;" > "$dir/m/0003_sku.sql"
$T migrate push --store "$STORE" "$dir/m" > /dev/null
start=$(now)
$T migrate apply --store "$STORE" --all --concurrency 8 --store-requests 2> "$dir/apply2.err" | head -5 || true
grep -v 'store requests' "$dir/apply2.err" | tail -3 || true
end=$(now)
echo "not held: apply --all on $N tenants: $(echo "$end - $start" | bc) s; command: $(grep 'store requests' "$dir/apply2.err")"

if [ "$M" -gt "$N" ]; then
  seq -f "u%05g" 1 $((M - N)) | xargs -P 2 -n 500 $T tenants create --store "$STORE" > /dev/null
fi
start=$(now)
$T migrate status --store "$STORE" --json --store-requests > "$dir/status.json" 2> "$dir/status.err"
end=$(now)
echo "status on $M tenants: $(echo "$end - $start" | bc) s; $(cat "$dir/status.err"); $(tr -d ' \n' < "$dir/status.json")"
