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
# Output: one TSV line per run (workload, server, repetition, IOPS, then CPU microseconds
# per request on the server's CPUs, of them in the kernel, and on the client's CPUs) on
# stderr, then two tables of medians on stdout: IOPS [min-max], and the CPU cost per
# request. The CPU figures are taken from /proc/stat over the measured part of each run;
# they mean something only when the two CPU sets are disjoint, nothing else runs, and
# SECONDS is 5 or more (the window is the run less its first second; at 100 ticks a second
# a shorter one is coarse). They show which side limits a row, and what a request costs
# the kernel whatever the server does in user space. Everything it starts is stopped by
# PID and its directory removed on exit.
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

# sample_cpu OUT: the busy and kernel clock ticks of the server's CPUs and of the client's
# from 1 s after fio starts (past its start-up and 0.5 s ramp, which count in its runtime)
# to 0.1 s before its runtime ends, then that window's length in seconds, into OUT.
sample_cpu() {
  python3 - "$server_cpu" "$client_cpu" "$secs" "$1" <<'EOF'
import sys, time
def cpus(spec):
    out = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out
sides = [cpus(sys.argv[1]), cpus(sys.argv[2])]
secs, out = float(sys.argv[3]), sys.argv[4]
def ticks():
    per_side = [[0, 0], [0, 0]]
    for line in open("/proc/stat"):
        name, *f = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f[:7])
        for i, side in enumerate(sides):
            if int(name[3:]) in side:
                per_side[i][0] += user + nice + system + irq + softirq
                per_side[i][1] += system + irq + softirq
    return per_side
time.sleep(1.0)
t0, a = time.monotonic(), ticks()
time.sleep(max(secs - 1.1, 0.1))
b, t1 = ticks(), time.monotonic()
with open(out, "w") as f:
    for i in range(2):
        f.write(f"{b[i][0] - a[i][0]} {b[i][1] - a[i][1]}\n")
    f.write(f"{t1 - t0}\n")
EOF
}
ticks_per_s=$(getconf CLK_TCK)
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
      sample_cpu "$work/cpu.txt" &
      sampler=$!
      if ! taskset -c "$client_cpu" fio --name=ab --ioengine=nbd \
        --uri="nbd+unix:///?socket=$work/$t.sock" --size="${mib}M" --thread --time_based \
        --runtime="$secs" --ramp_time=0.5 --norandommap --randrepeat=0 \
        --output-format=json --output="$work/fio.json" "${fio_opts[@]}" \
        >/dev/null 2>"$work/fio.err"; then
        echo "nbd-ab: fio failed on $t: $(cat "$work/fio.err")" >&2
        exit 1
      fi
      wait "$sampler"
      python3 - "$work/fio.json" "$dir" "$w" "$t" "$r" "$work/cpu.txt" "$ticks_per_s" <<'EOF' | tee -a "$results" >&2
import json, sys
path, direction, w, t, r, cpu, hz = sys.argv[1:]
text = open(path).read()
iops = json.loads(text[text.index("{"):])["jobs"][0][direction]["iops"]
server, client, window = open(cpu).read().split("\n")[:3]
(server_busy, server_kernel), (client_busy, _) = (map(int, x.split()) for x in (server, client))
requests = iops * float(window)
us = lambda ticks: ticks / int(hz) * 1e6 / requests if requests else 0.0
print(f"{w}\t{t}\t{r}\t{iops:.0f}\t{us(server_busy):.2f}\t{us(server_kernel):.2f}\t{us(client_busy):.2f}")
EOF
    done
  done
done

python3 - "$results" "${targets[@]}" <<'EOF'
import collections, statistics, sys
path, targets = sys.argv[1], sys.argv[2:]
runs = collections.defaultdict(list)
cost = collections.defaultdict(list)
order = []
for line in open(path):
    w, t, _, iops, server_us, kernel_us, client_us = line.split("\t")
    runs[(w, t)].append(float(iops))
    cost[(w, t)].append((float(server_us), float(kernel_us), float(client_us)))
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
print()
print("CPU microseconds per request, medians: server (of it in the kernel) / client")
print()
print("| workload | " + " | ".join(targets) + " |")
print("|---" * (len(targets) + 1) + "|")
for w in order:
    cells = []
    for t in targets:
        s, k, c = (statistics.median(x[i] for x in cost[(w, t)]) for i in range(3))
        cells.append(f"{s:.2f} ({k:.2f}) / {c:.2f}")
    print(f"| {w} | " + " | ".join(cells) + " |")
EOF
