#!/usr/bin/env bash
# nbd-ab.sh: A/B the NBD front end of two blkdebugfs builds against nbdkit, with the server
# and the client pinned to different CPUs (unpinned runs on a small shared machine vary by
# 2-5x), alternating the servers within each repetition, and print the median and spread.
#
#   bash scripts/nbd-ab.sh A_BINARY [B_BINARY|-] [REPS] [SECONDS] [WORKLOAD...]
#
# Servers (all started once, on the same image, with --force-share): `A serve`, `B serve`
# (unless `-`), and `nbdkit file --filter=error error-rate=0` (the error filter in the path,
# injecting nothing), each pinned with `taskset -c $SERVER_CPU`. The client is `fio
# --ioengine=nbd` (libnbd, one connection) pinned to `$CLIENT_CPU`.
#
# Workloads: rr1 rr16 (4k random read, QD1/QD16), rw1 rw16 (4k random write), sr sw (1 MiB
# sequential read/write, QD1). Default: all six, 5 repetitions of 3 s.
#
# Environment:
#   DIR=PATH        where the image goes (default /dev/shm: page-cache speed)
#   MIB=N           image size in MiB (default 256; random data)
#   COLD=1          drop the image's pages from the page cache before every run
#                   (posix_fadvise DONTNEED; with DIR on a real disk, requests that miss)
#   SERVER_CPU, CLIENT_CPU   (default 1 and 0)
#
# Output: one TSV line per run (workload, server, repetition, IOPS) on stderr, then a table
# of medians [min-max] on stdout. Everything it starts is stopped by PID and its directory
# removed on exit.
set -euo pipefail

A=${1:?usage: nbd-ab.sh A_BINARY [B_BINARY|-] [REPS] [SECONDS] [WORKLOAD...]}
B=${2:--}
reps=${3:-5}
secs=${4:-3}
shift $(($# < 4 ? $# : 4))
workloads=("$@")
[ ${#workloads[@]} -gt 0 ] || workloads=(rr1 rr16 rw1 rw16 sr sw)
server_cpu=${SERVER_CPU:-1}
client_cpu=${CLIENT_CPU:-0}
mib=${MIB:-256}

for tool in fio nbdkit taskset python3; do
  command -v "$tool" >/dev/null || { echo "nbd-ab: $tool is missing" >&2; exit 1; }
done

work=$(mktemp -d "${DIR:-/dev/shm}/nbd-ab.XXXXXX")
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

head -c $((mib << 20)) /dev/urandom >"$work/disk.img"

# start NAME COMMAND...: starts a server pinned to the server CPU, waits for its socket.
start() {
  local name=$1 i
  shift
  taskset -c "$server_cpu" "$@" 2>"$work/$name.log" &
  pids+=($!)
  for i in $(seq 100); do [ -S "$work/$name.sock" ] && return 0; sleep 0.05; done
  echo "nbd-ab: $name did not start: $(cat "$work/$name.log")" >&2
  exit 1
}
targets=(a)
start a "$A" serve "$work/disk.img" --listen "unix:$work/a.sock" --force-share
if [ "$B" != - ]; then
  start b "$B" serve "$work/disk.img" --listen "unix:$work/b.sock" --force-share
  targets+=(b)
fi
start nbdkit nbdkit -f --unix "$work/nbdkit.sock" --filter=error file "$work/disk.img" error-rate=0
targets+=(nbdkit)

results=$work/results.tsv
for w in "${workloads[@]}"; do
  case $w in
    rr1) opts="--rw=randread --bs=4k --iodepth=1" dir=read ;;
    rr16) opts="--rw=randread --bs=4k --iodepth=16" dir=read ;;
    rw1) opts="--rw=randwrite --bs=4k --iodepth=1" dir=write ;;
    rw16) opts="--rw=randwrite --bs=4k --iodepth=16" dir=write ;;
    sr) opts="--rw=read --bs=1M --iodepth=1" dir=read ;;
    sw) opts="--rw=write --bs=1M --iodepth=1" dir=write ;;
    *) echo "nbd-ab: unknown workload $w" >&2; exit 2 ;;
  esac
  read -r -a fio_opts <<<"$opts"
  for r in $(seq "$reps"); do
    for t in "${targets[@]}"; do
      if [ "${COLD:-0}" = 1 ]; then
        python3 -c 'import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)' "$work/disk.img"
      fi
      if ! taskset -c "$client_cpu" fio --name=ab --ioengine=nbd \
        --uri="nbd+unix:///?socket=$work/$t.sock" --size="${mib}M" --thread --time_based \
        --runtime="$secs" --ramp_time=0.5 --norandommap --randrepeat=0 \
        --output-format=json --output="$work/fio.json" "${fio_opts[@]}" \
        >/dev/null 2>"$work/fio.err"; then
        echo "nbd-ab: fio failed on $t: $(cat "$work/fio.err")" >&2
        exit 1
      fi
      python3 - "$work/fio.json" "$dir" "$w" "$t" "$r" <<'EOF' | tee -a "$results" >&2
import json, sys
path, direction, w, t, r = sys.argv[1:]
text = open(path).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
print(f"{w}\t{t}\t{r}\t{job[direction]['iops']:.0f}")
EOF
    done
  done
done

python3 - "$results" "${targets[@]}" <<'EOF'
import collections, statistics, sys
path, targets = sys.argv[1], sys.argv[2:]
runs = collections.defaultdict(list)
order = []
for line in open(path):
    w, t, _, iops = line.split("\t")
    runs[(w, t)].append(float(iops))
    if w not in order:
        order.append(w)
print("| workload | " + " | ".join(f"{t} IOPS, median [min-max]" for t in targets)
      + " | " + " | ".join(f"{t} / nbdkit" for t in targets if t != "nbdkit") + " |")
print("|---" * (2 * len(targets)) + "|")
for w in order:
    med = {t: statistics.median(runs[(w, t)]) for t in targets}
    cells = [f"{med[t]:.0f} [{min(runs[(w, t)]):.0f}-{max(runs[(w, t)]):.0f}]" for t in targets]
    ratios = [f"{med[t] / med['nbdkit']:.2f}x" for t in targets if t != "nbdkit"]
    print(f"| {w} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
EOF
