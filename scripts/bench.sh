#!/usr/bin/env bash
# Benchmark blkdebugfs against the raw image and against QEMU's own blkdebug stack.
#
#   scripts/bench.sh            # full run: about 6 minutes (35 jobs of 8 s)
#   scripts/bench.sh --quick    # CI smoke run: 256 MiB image, ~1 s per job, ~70 s
#
# Targets (all serve the same image in /dev/shm; each workload measures them one after
# another, so background noise hits every target of a workload alike):
#   raw             the image file itself (tmpfs, O_DIRECT)
#   blkdebugfs x0   blkdebugfs, no rules
#   blkdebugfs x100, x10000
#                   blkdebugfs with 100 / 10,000 inject-error rules that every event arms
#                   but no request ever matches (see gen_config)
#   blkdebugfs, 100 standing rules
#                   4k workloads only: 100 standing rules (no event) that every read and
#                   write request is checked against and that never act (probability 0,
#                   see gen_standing); faults.md: "free when unused", the goal is to stay
#                   within 5% of 0 rules (the "vs 0 rules" column)
#   blkdebugfs, delay 1ms
#                   4k random reads only: one standing `[delay] latency = 1ms` rule; a
#                   delayed request must hold no worker, so IOPS should approach 1,000 at
#                   depth 1 and 16,000 at depth 16 (the summary below the table)
#   blkdebugfs, --write-cache
#                   0 rules, mounted with --write-cache (faults.md §5: every write first
#                   journals its before-image beside the image; a flush drops the journal);
#                   4k QD16 workloads only: random writes without a flush and with an fsync
#                   every 64 writes (goal: at least half the IOPS of 0 rules, no cache),
#                   random reads (which never touch the journal: goal about 1.0x)
#   blkdebugfs, 1,000,000 bad sectors
#                   4k random reads QD16 only: a [bad-sectors] list file (badblocks style,
#                   one sector per line, every other sector so none merge) of 1,000,000
#                   sectors past the image end, which no request touches (faults.md §4:
#                   free outside the set, goal about 1.0x vs 0 rules; see gen_badlist)
#   QEMU x100       qemu-storage-daemon: file -> blkdebug (the 100-rule config) -> raw,
#                   FUSE export onto a regular file (as tests/integration/differential.rs)
#
# NBD rows, in the same run (a second table): `blkdebugfs serve` with 0 rules against
# `nbdkit file` behind `--filter=error error-rate=0`, with fio --ioengine=nbd (4k random
# read and write at QD1 and QD16, 1 MiB sequential read and write; goal: at least nbdkit's
# IOPS on every row, 1.5x on the 4 KiB rows), and QEMU's own client (`qemu-img bench`, 4k
# QD16 read and write) through NBD, to both servers, against through the FUSE view of the
# 0-rule mount. The 4k QD16 fio rows also run against examples/nbd_ceiling.rs (no engine,
# no threads, no checks, replies sent 4 at a time): the bound any server meets with this
# client on this machine, so those rows show how far from it we are.
#
# Workloads (fio, direct=1, time-based): 4k random read psync QD1, 4k random read libaio
# QD16, 4k random write libaio QD16, the same with an fsync every 64 writes (0 rules and
# --write-cache only), 1 MiB sequential read psync, 1 MiB sequential write psync. The
# result is one Markdown table (IOPS, MB/s, p99 completion latency, IOPS ratio to QEMU, to
# the raw file and to blkdebugfs with 0 rules) and a short summary of the standing-rule,
# delay, write-cache and bad-sector rows on stdout, ready for the README; progress goes to
# stderr.
# Nothing here judges a number: the goals are printed beside them (this machine is noisy).
# Last, scripts/bench-explore.sh measures `explore`: states per second, the time to the first
# failure, and what recording costs (with --quick when this runs with --quick).
#
# Environment:
#   BLKDEBUGFS=PATH       use this binary instead of building with `cargo build --release`
#   NBD_CEILING=PATH      the nbd_ceiling example's binary (default: built with cargo
#                         beside blkdebugfs; without cargo and this, no ceiling rows)
#   BLKDEBUGFS_ARGS="..." extra `blkdebugfs mount` options (e.g. "--threads 4"); default:
#                         none (direct I/O, one FUSE worker per CPU)
#
# Needs root (FUSE mounts, apt-get), /dev/fuse, python3; installs fio and qemu-utils
# (qemu-storage-daemon) with apt-get when they are missing. Everything it starts, mounts
# or creates is stopped, unmounted and removed on exit, also on failure or Ctrl-C.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)

# ---------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------
quick=0
for arg in "$@"; do
  case $arg in
    --quick) quick=1 ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "bench.sh: unknown argument '$arg' (try --help)" >&2
      exit 2
      ;;
  esac
done

if [ "$quick" = 1 ]; then
  size_mib=256   # image size
  runtime=1      # seconds measured per job
  ramp=500ms     # warm-up per job, not measured
else
  size_mib=1024
  runtime=8      # 35 jobs x (8 s + 1 s ramp) + setup: about 6 minutes in all
  ramp=1s
fi

# Rule counts for the blkdebugfs targets; QEMU gets the 100-rule config.
rule_counts=(0 100 10000)
qemu_rules=100

# Extra blkdebugfs mount options from the environment, split on whitespace.
read -r -a bdfs_args <<<"${BLKDEBUGFS_ARGS:-}"

log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# ---------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "run as root (FUSE mounts and apt-get need it)"
[ -c /dev/fuse ] || die "/dev/fuse is missing"
command -v python3 >/dev/null 2>&1 || die "python3 is needed to read fio's JSON"

need=()
command -v fio >/dev/null 2>&1 || need+=(fio)
command -v qemu-storage-daemon >/dev/null 2>&1 || need+=(qemu-utils)
command -v nbdkit >/dev/null 2>&1 || need+=(nbdkit)
if [ "${#need[@]}" -gt 0 ]; then
  log "installing: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi

if [ -n "${BLKDEBUGFS:-}" ]; then
  bdfs=$BLKDEBUGFS
else
  log "building: cargo build --release (and the nbd_ceiling example)"
  (cd "$repo" && cargo build --release --bin blkdebugfs --example nbd_ceiling >&2)
  bdfs=$repo/target/release/blkdebugfs
fi
ceiling=${NBD_CEILING:-$repo/target/release/examples/nbd_ceiling}
[ -x "$bdfs" ] || die "no executable blkdebugfs at '$bdfs'"

# Every target serves the same image, one after another: a mount takes QEMU's image locks
# (a writer's) and refuses an image in use, so each mount is told to take and check none
# (`--force-share`; a binary from before image locking has no such option and needs none).
share_args=()
if "$bdfs" mount --help 2>/dev/null | grep -q -- '--force-share'; then
  share_args=(--force-share)
fi

# ---------------------------------------------------------------------------------------
# Cleanup: registered before anything is created
# ---------------------------------------------------------------------------------------
work=""          # scratch directory: configs, mount points, logs, fio output
image=""         # the image in /dev/shm
pids=()          # daemons we started, by PID (index-aligned with mounts)
mounts=()        # their mount points
fio_pid=""       # the running fio job (its `timeout` wrapper), if any

# True while PID runs (a zombie child of ours counts as gone).
alive() {
  [ -e "/proc/$1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

# True while something is mounted on PATH (read from the mount table: `mountpoint` would
# stat PATH, which fails with ENOTCONN once a FUSE daemon has died).
is_mounted() {
  awk -v m="$1" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo
}

# Stop daemon number I: SIGTERM (both daemons then unmount and exit), then umount, and
# as a last resort a lazy umount and SIGKILL. Only the PID we recorded is signalled.
stop_daemon() {
  local i=$1 pid=${pids[$1]} mnt=${mounts[$1]} t
  if [ -n "$pid" ] && alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((t = 0; t < 100; t++)); do
      alive "$pid" || break
      sleep 0.1
    done
  fi
  if is_mounted "$mnt"; then
    umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
  fi
  if [ -n "$pid" ] && alive "$pid"; then
    log "warning: daemon $pid ($mnt) ignored SIGTERM for 10 s; killing it"
    umount -l "$mnt" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
  fi
  # Reap it if it is our child (qemu-storage-daemon); harmless otherwise.
  if [ -n "$pid" ]; then wait "$pid" 2>/dev/null || true; fi
  pids[i]=""
}

cleanup() {
  local rc=$? i t
  trap - EXIT INT TERM
  # First the client: `timeout` passes SIGTERM on to fio. Not waited for without bound:
  # a request stuck in a hung daemon only returns once that daemon is gone.
  if [ -n "$fio_pid" ]; then
    kill -TERM "$fio_pid" 2>/dev/null || true
    for ((t = 0; t < 50; t++)); do
      alive "$fio_pid" || break
      sleep 0.1
    done
  fi
  for i in "${!mounts[@]}"; do
    stop_daemon "$i"
  done
  if [ -n "$fio_pid" ]; then
    alive "$fio_pid" && kill -KILL "$fio_pid" 2>/dev/null
    wait "$fio_pid" 2>/dev/null || true
  fi
  if [ "$rc" != 0 ] && [ -n "$work" ]; then
    # On failure, show what the daemons said.
    for f in "$work"/*.log; do
      [ -s "$f" ] || continue
      log "--- last lines of $(basename "$f"):"
      tail -n 20 "$f" >&2
    done
  fi
  [ -n "$image" ] && rm -f "$image"
  [ -n "$work" ] && rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

work=$(mktemp -d /tmp/blkdebugfs-bench.XXXXXX)
image=$(mktemp /dev/shm/blkdebugfs-bench.XXXXXX.img)
image_name=$(basename "$image")

# ---------------------------------------------------------------------------------------
# Image and configs
# ---------------------------------------------------------------------------------------
log "filling ${size_mib} MiB image $image from /dev/urandom"
dd if=/dev/urandom of="$image" bs=1M count="$size_mib" iflag=fullblock status=none

# gen_config N FILE: N [inject-error] rules that every event arms and no request matches.
# Rules cycle through the six events a read, write or flush fires (read_aio; write_aio,
# pwritev, pwritev_done; flush_to_os, flush_to_disk), so each event replaces the active
# list with ~N/6 rules and every request is checked against all of them. Each rule's
# `sector` lies 1 TiB beyond the image end: reads and writes never contain it, and a
# flush (no range) never matches a rule with a sector. Every other rule also names the
# iotype of its event (so the range, not the type, is what rejects it). Every value is
# quoted, which QEMU 10's INI parser requires; blkdebugfs accepts the same file.
gen_config() {
  local n=$1 file=$2
  awk -v n="$n" -v base=$((size_mib * 2048 + (1 << 31))) 'BEGIN {
    split("read_aio write_aio pwritev pwritev_done flush_to_os flush_to_disk", ev, " ")
    split("read write write write flush flush", type, " ")
    for (i = 0; i < n; i++) {
      e = i % 6 + 1
      printf "[inject-error]\nevent = \"%s\"\nerrno = \"5\"\nsector = \"%.0f\"\n", ev[e], base + i
      if (i % 2) printf "iotype = \"%s\"\n", type[e]
      printf "\n"
    }
  }' >"$file"
}

for n in "${rule_counts[@]}" "$qemu_rules"; do
  [ -e "$work/rules-$n.ini" ] || gen_config "$n" "$work/rules-$n.ini"
done

# gen_standing N FILE: N standing [inject-error] rules (no event: armed from mount start)
# that never act, chosen so that each one really is checked on every read and write, not
# skipped by the engine's index. Even rules have no range (they match every request, a
# flush too); odd rules have `sectors` spanning the whole image and `iotype = read|write`
# (the request overlaps their interval). All have `probability = 0`: every match counts
# and draws its seeded number, and the draw never says act. (Rules at sectors beyond the
# image end would not do: the interval index rejects them without looking at them.)
gen_standing() {
  local n=$1 file=$2
  awk -v n="$n" -v last=$((size_mib * 2048 - 1)) 'BEGIN {
    for (i = 0; i < n; i++) {
      printf "[inject-error]\nerrno = \"5\"\nprobability = \"0\"\n"
      if (i % 2) printf "sectors = \"0-%d\"\niotype = \"read|write\"\n", last
      printf "\n"
    }
  }' >"$file"
}
standing_rules=100
gen_standing "$standing_rules" "$work/standing-$standing_rules.ini"

# One standing delay rule (a `[delay]` without event acts on every request).
delay_latency=1ms
delay_ms=1
printf '[delay]\nlatency = "%s"\n' "$delay_latency" >"$work/delay.ini"

# gen_badlist N FILE: a badblocks-style list of N bad sectors, one per line, every other
# sector (so that the interval set keeps N separate intervals instead of merging them into
# one range), starting 1 MiB past the image end: no request of any workload touches them.
gen_badlist() {
  awk -v n="$1" -v base=$((size_mib * 2048 + 2048)) \
    'BEGIN { print "# blkdebugfs bench: bad sectors past the image end"
             for (i = 0; i < n; i++) printf "%.0f\n", base + 2 * i }' >"$2"
}
bad_count=1000000
gen_badlist "$bad_count" "$work/bad-sectors.txt"
printf '[bad-sectors]\nfile = "%s"\n' "$work/bad-sectors.txt" >"$work/bad-sectors.ini"

# ---------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------
labels=()   # table label per target
keys=()     # short name per target, for a workload's list of targets (see workloads)
files=()    # the file fio opens per target
daemon=()   # index into pids/mounts of the target's daemon ("" for raw)
only=()     # the workloads the target runs: names this extended regex matches ("" = all)

labels+=("raw file")
keys+=("raw")
files+=("$image")
daemon+=("")
only+=("")

# mount_bdfs NAME LABEL CONFIG ONLY [OPTION...]: mount blkdebugfs with CONFIG (and the
# extra mount OPTIONs) on a directory (the view is DIR/<image name>) as the target LABEL,
# key NAME, running the workloads ONLY selects.
mount_bdfs() {
  local name=$1 label=$2 config=$3 sel=$4 mnt=$work/bdfs-$1 idx
  shift 4
  mkdir "$mnt"
  mounts+=("$mnt")
  pids+=("")
  idx=$((${#mounts[@]} - 1))
  log "mounting $label${bdfs_args[*]:+, ${bdfs_args[*]}}"
  "$bdfs" mount -c "$config" --seed 1 "${share_args[@]}" "$@" "${bdfs_args[@]}" \
    --daemonize --pidfile "$work/bdfs-$name.pid" --log-file "$work/bdfs-$name.log" \
    "$image" "$mnt" 2>"$work/bdfs-$name.start.log" ||
    die "blkdebugfs mount ($label) failed: $(cat "$work/bdfs-$name.start.log")"
  pids[idx]=$(cat "$work/bdfs-$name.pid")
  is_mounted "$mnt" || die "blkdebugfs ($label) reported success but $mnt is not mounted"
  labels+=("$label")
  keys+=("$name")
  files+=("$mnt/$image_name")
  daemon+=("$idx")
  only+=("$sel")
}

# The 0-rule target first: the "vs 0 rules" column divides by it. The standing-rule,
# write-cache and bad-sector targets come right after it, so that each runs close to it on
# each workload.
for n in "${rule_counts[@]}"; do
  mount_bdfs "$n" "blkdebugfs, $n rules" "$work/rules-$n.ini" ""
  [ "$n" = 0 ] || continue
  zero_idx=$((${#labels[@]} - 1))
  mount_bdfs "standing-$standing_rules" "blkdebugfs, $standing_rules standing rules" \
    "$work/standing-$standing_rules.ini" "^4k "
  standing_idx=$((${#labels[@]} - 1))
  mount_bdfs wc "blkdebugfs, --write-cache" "$work/rules-0.ini" \
    "^4k rand(read|write) libaio QD16" --write-cache
  wc_idx=$((${#labels[@]} - 1))
  bad_label=$(sed ':a; s/\B[0-9]\{3\}\>/,&/; ta' <<<"$bad_count") # 1,000,000
  mount_bdfs bad "blkdebugfs, $bad_label bad sectors" "$work/bad-sectors.ini" \
    "^4k randread libaio QD16$"
  bad_idx=$((${#labels[@]} - 1))
done
mount_bdfs delay "blkdebugfs, delay $delay_latency" "$work/delay.ini" "^4k randread "
delay_idx=$((${#labels[@]} - 1))

# qemu-storage-daemon: file -> blkdebug(config) -> raw, FUSE-exported onto a regular file.
# Started as our background child (its --daemonize would send its log to /dev/null), in
# its own session (setsid execs it, keeping the PID) so that a Ctrl-C on the terminal
# does not kill it behind our back: cleanup stops it.
qtarget=$work/qemu-export
: >"$qtarget"
mounts+=("$qtarget")
pids+=("")
idx=$((${#mounts[@]} - 1))
log "starting qemu-storage-daemon, $qemu_rules rules"
setsid qemu-storage-daemon \
  --blockdev "driver=file,node-name=f,filename=$image" \
  --blockdev "driver=blkdebug,node-name=bd,config=$work/rules-$qemu_rules.ini,image=f" \
  --blockdev "driver=raw,node-name=r,file=bd" \
  --export "type=fuse,id=e,node-name=r,mountpoint=$qtarget,writable=on" \
  </dev/null >"$work/qemu.log" 2>&1 &
pids[idx]=$!
for ((t = 0; t < 100; t++)); do
  is_mounted "$qtarget" && break
  alive "${pids[idx]}" || die "qemu-storage-daemon exited: $(cat "$work/qemu.log")"
  sleep 0.1
done
is_mounted "$qtarget" || die "qemu-storage-daemon export did not come up in 10 s"
labels+=("QEMU FUSE, $qemu_rules rules")
keys+=("qemu")
files+=("$qtarget")
daemon+=("$idx")
only+=("")
qemu_idx=$((${#labels[@]} - 1))

# ---------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------
# name | fio options | direction reported | targets (keys; "" = every target whose `only`
# selects the workload). The fsync=64 workload runs on 0 rules and --write-cache only: each
# fsync is a successful flush, which drops the write cache's journal. Without fsync the
# journal grows for the whole job (IOPS x 4 KiB x (runtime + ramp) in /dev/shm beside the
# image) until fio's close(), which blkdebugfs treats as a flush, as QEMU's export does.
workloads=(
  "4k randread psync QD1|--rw=randread --bs=4k --ioengine=psync --iodepth=1|read|"
  "4k randread libaio QD16|--rw=randread --bs=4k --ioengine=libaio --iodepth=16|read|"
  "4k randwrite libaio QD16|--rw=randwrite --bs=4k --ioengine=libaio --iodepth=16|write|"
  "4k randwrite libaio QD16 fsync=64|--rw=randwrite --bs=4k --ioengine=libaio --iodepth=16"\
" --fsync=64|write|0 wc"
  "1M seqread psync|--rw=read --bs=1M --ioengine=psync --iodepth=1|read|"
  "1M seqwrite psync|--rw=write --bs=1M --ioengine=psync --iodepth=1|write|"
)

# fio_job FILE OUT.json OPTIONS...: one time-based O_DIRECT job. --thread keeps fio in one
# process so `timeout` can stop all of it if a daemon hangs; --allow_file_create=0 makes a
# missing view an error instead of a new file inside the mount point.
#
# fio runs in the background and we `wait` for it: a trapped SIGINT/SIGTERM interrupts
# `wait` at once and runs cleanup, which stops fio by its PID. (`timeout` puts fio in its
# own process group, so a terminal's Ctrl-C reaches us, not fio.)
fio_job() {
  local file=$1 out=$2 rc=0
  shift 2
  timeout --kill-after=10 $((runtime + 60)) \
    fio --name=bench --filename="$file" --size="${size_mib}M" --allow_file_create=0 \
    --direct=1 --thread --time_based --runtime="$runtime" --ramp_time="$ramp" \
    --norandommap --randrepeat=0 --output-format=json --output="$out" "$@" &
  fio_pid=$!
  wait "$fio_pid" || rc=$?
  fio_pid=""
  return "$rc"
}

# rss PID: resident set size in KiB (0 if gone).
rss() {
  awk '/^VmRSS:/ { print $2; found = 1 } END { if (!found) print 0 }' "/proc/$1/status" 2>/dev/null || echo 0
}
# Resident size of each daemon before the workloads: compared after them, it shows whether
# memory grows with the number of requests served (it should stay flat).
rss_before=()
for t in "${!labels[@]}"; do
  d=${daemon[t]}
  rss_before[t]=$([ -n "$d" ] && rss "${pids[d]}" || echo "")
done

results=$work/results.tsv # workload, target index, iops, MB/s, p99 us (or FAILED)
: >"$results"
failed=0
start=$SECONDS
log "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"

for w in "${workloads[@]}"; do
  IFS='|' read -r wname wopts wdir wtargets <<<"$w"
  read -r -a opts <<<"$wopts"
  for t in "${!labels[@]}"; do
    [ -z "${only[t]}" ] || [[ $wname =~ ${only[t]} ]] || continue
    [ -z "$wtargets" ] || [[ " $wtargets " == *" ${keys[t]} "* ]] || continue
    log "$wname on ${labels[t]}"
    d=${daemon[t]}
    if [ -n "$d" ] && ! { alive "${pids[d]}" && is_mounted "${mounts[d]}"; }; then
      log "error: the daemon of ${labels[t]} (PID ${pids[d]}) is gone or unmounted"
      printf '%s\t%s\tFAILED\n' "$wname" "$t" >>"$results"
      failed=1
      continue
    fi
    out=$work/fio-$t.json
    if fio_job "${files[t]}" "$out" "${opts[@]}" 2>"$work/fio.err"; then
      # IOPS, MB/s (10^6 bytes) and p99 completion latency in microseconds.
      python3 - "$out" "$wdir" "$wname" "$t" >>"$results" <<'EOF'
import json, sys
path, direction, name, target = sys.argv[1:]
with open(path) as f:
    text = f.read()
job = json.loads(text[text.index("{"):])["jobs"][0]  # skip any notes before the JSON
d = job[direction]
p99 = d["clat_ns"]["percentile"]["99.000000"] / 1000
print(f"{name}\t{target}\t{d['iops']:.0f}\t{d['bw_bytes'] / 1e6:.1f}\t{p99:.0f}")
EOF
    else
      log "error: fio failed on ${labels[t]}:"
      cat "$work/fio.err" "$out" >&2 2>/dev/null || true
      printf '%s\t%s\tFAILED\n' "$wname" "$t" >>"$results"
      failed=1
    fi
  done
done

# ---------------------------------------------------------------------------------------
# NBD: blkdebugfs serve (0 rules) against nbdkit's file plugin behind its error filter
# (error-rate=0: the filter is in the path and injects nothing), with fio's NBD engine
# (libnbd; one connection per job); then QEMU's own client, qemu-img bench, through NBD
# against through the FUSE view of the 0-rule mount above. Both servers serve the same
# image in /dev/shm; their logs are *.nbdlog (not checked with the mounts' logs below).
# ---------------------------------------------------------------------------------------
nbd_results=$work/nbd-results.tsv
qemu_bench_rows=$work/qemu-bench.tsv
: >"$nbd_results"
: >"$qemu_bench_rows"
nbd_labels=("blkdebugfs serve, 0 rules" "nbdkit file --filter=error error-rate=0"
  "nbd_ceiling (example: no engine, no checks)")
# start_nbd NAME: starts one NBD server (bdfs, nbdkit or ceiling) in the background, registered for
# cleanup by its PID; sets nbd_uri_NAME.
start_nbd() {
  local name=$1 sock=$work/nbd-$1.sock idx t
  mounts+=("$sock")
  pids+=("")
  idx=$((${#mounts[@]} - 1))
  case $name in
    bdfs)
      log "starting blkdebugfs serve, 0 rules"
      "$bdfs" serve --seed 1 --force-share --daemonize --pidfile "$work/nbd-bdfs.pid" \
        --log-file "$work/bdfs.nbdlog" "$image" --listen "unix:$sock" \
        2>"$work/bdfs-start.nbdlog" ||
        die "blkdebugfs serve failed: $(cat "$work/bdfs-start.nbdlog")"
      ;;
    nbdkit)
      log "starting nbdkit file --filter=error error-rate=0"
      nbdkit --unix "$sock" --pidfile "$work/nbd-nbdkit.pid" --filter=error \
        file "$image" error-rate=0 2>"$work/nbdkit.nbdlog" ||
        die "nbdkit failed: $(cat "$work/nbdkit.nbdlog")"
      ;;
    ceiling)
      # Replies 4 at a time: the batch that measured fastest (1, 2, 4, 16 tried).
      log "starting nbd_ceiling"
      NBD_CEILING_BATCH=4 "$ceiling" serve "$image" --listen "unix:$sock" \
        2>"$work/ceiling.nbdlog" &
      echo $! >"$work/nbd-ceiling.pid"
      ;;
  esac
  for ((t = 0; t < 100; t++)); do
    [ -s "$work/nbd-$name.pid" ] && [ -S "$sock" ] && break
    sleep 0.1
  done
  [ -S "$sock" ] || die "$name did not listen on $sock in 10 s"
  pids[idx]=$(cat "$work/nbd-$name.pid")
  printf -v "nbd_uri_$name" '%s' "nbd+unix:///?socket=$sock"
}

# qemu_bench ROW ARGS...: one qemu-img bench run of 4 KiB requests at depth 16; prints
# "ROW<TAB>IOPS".
qemu_bench() {
  local row=$1 secs
  shift
  secs=$({ timeout 300 qemu-img bench -f raw -c "$bench_count" -d 16 -s 4096 "$@" 2>&1 ||
    true; } | sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p')
  if [ -n "$secs" ]; then
    printf '%s\t%s\n' "$row" "$(python3 -c "print(round($bench_count / $secs))")"
  else
    printf '%s\tFAILED\n' "$row"
  fi
}

if command -v nbdkit >/dev/null 2>&1 && fio --enghelp 2>/dev/null | grep -qx '[[:space:]]*nbd'; then
  start_nbd bdfs
  start_nbd nbdkit
  nbd_targets=(bdfs nbdkit)
  if [ -x "$ceiling" ]; then
    start_nbd ceiling
    nbd_targets+=(ceiling)
  else
    log "no nbd_ceiling example at '$ceiling': no ceiling rows (set NBD_CEILING)"
  fi
  nbd_workloads=(
    "4k randread QD1|--rw=randread --bs=4k --iodepth=1|read"
    "4k randread QD16|--rw=randread --bs=4k --iodepth=16|read"
    "4k randwrite QD1|--rw=randwrite --bs=4k --iodepth=1|write"
    "4k randwrite QD16|--rw=randwrite --bs=4k --iodepth=16|write"
    "1M seqread QD1|--rw=read --bs=1M --iodepth=1|read"
    "1M seqwrite QD1|--rw=write --bs=1M --iodepth=1|write"
  )
  for w in "${nbd_workloads[@]}"; do
    IFS='|' read -r wname wopts wdir <<<"$w"
    read -r -a opts <<<"$wopts"
    for t in "${!nbd_targets[@]}"; do
      # The ceiling bounds the server-bound rows, 4 KiB at QD16. At QD1 it is no bound: it
      # sleeps on its socket, and pays the client's wake-up our polling reader avoids.
      [ "${nbd_targets[t]}" != ceiling ] || [[ $wname == 4k*QD16 ]] || continue
      uri_var=nbd_uri_${nbd_targets[t]}
      log "NBD $wname on ${nbd_labels[t]}"
      out=$work/fio-nbd-$t.json
      timeout --kill-after=10 $((runtime + 60)) \
        fio --name=bench --ioengine=nbd --uri="${!uri_var}" --size="${size_mib}M" \
        --thread --time_based --runtime="$runtime" --ramp_time="$ramp" --norandommap \
        --randrepeat=0 --output-format=json --output="$out" "${opts[@]}" \
        2>"$work/fio.err" >/dev/null &
      fio_pid=$!
      rc=0
      wait "$fio_pid" || rc=$?
      fio_pid=""
      if [ "$rc" = 0 ]; then
        python3 - "$out" "$wdir" "$wname" "$t" >>"$nbd_results" <<'EOF'
import json, sys
path, direction, name, target = sys.argv[1:]
with open(path) as f:
    text = f.read()
job = json.loads(text[text.index("{"):])["jobs"][0]
d = job[direction]
p99 = d["clat_ns"]["percentile"]["99.000000"] / 1000
print(f"{name}\t{target}\t{d['iops']:.0f}\t{d['bw_bytes'] / 1e6:.1f}\t{p99:.0f}")
EOF
      else
        log "error: fio (nbd) failed on ${nbd_labels[t]}: $(cat "$work/fio.err")"
        printf '%s\t%s\tFAILED\n' "$wname" "$t" >>"$nbd_results"
        failed=1
      fi
    done
  done

  # QEMU's block layer as the client: its NBD driver (on both servers: QEMU's NBD client
  # does its socket work in its one I/O thread, so nbdkit's row shows what that costs), and
  # its file driver (O_DIRECT, native AIO) on the FUSE view of the 0-rule mount.
  bench_count=$([ "$quick" = 1 ] && echo 20000 || echo 200000)
  for dir in read write; do
    wflag=()
    [ "$dir" = write ] && wflag=(-w)
    log "qemu-img bench 4k $dir QD16 through NBD (both servers) and through the FUSE view"
    qemu_bench "4k $dir QD16|NBD (blkdebugfs serve)" "${wflag[@]}" "$nbd_uri_bdfs" \
      >>"$qemu_bench_rows"
    qemu_bench "4k $dir QD16|NBD (nbdkit)" "${wflag[@]}" "$nbd_uri_nbdkit" \
      >>"$qemu_bench_rows"
    qemu_bench "4k $dir QD16|FUSE view (blkdebugfs mount)" "${wflag[@]}" -t none \
      -i native "${files[zero_idx]}" >>"$qemu_bench_rows"
  done
  grep -q FAILED "$qemu_bench_rows" && failed=1
else
  log "error: no nbdkit, or fio without its nbd engine: no NBD rows (bash .ci/run installs them)"
  failed=1
fi

elapsed=$((SECONDS - start))
log "load average after: $(cut -d' ' -f1-3 /proc/loadavg); measuring took ${elapsed} s"

rss_report=""
for t in "${!labels[@]}"; do
  d=${daemon[t]}
  [ -n "$d" ] || continue
  rss_report+="${labels[t]}: ${rss_before[t]} -> $(rss "${pids[d]}") KiB; "
done

# Stop the daemons now (cleanup would too) so that their shutdown is checked as well.
log "stopping the daemons"
for i in "${!mounts[@]}"; do
  stop_daemon "$i"
done

# Anything the daemons logged beyond their start and stop lines (blkdebugfs logs every
# injected error and every warning; there should be none) is shown, so that a problem
# does not hide behind a good-looking table. The delay target logs the first requests it
# delays one by one, then one summary a second (`rule 1: delayed N more request(s) ...`):
# both are counted (every request of its jobs, ramp included, should be one).
delay_log=$work/bdfs-delay.log
delay_line="INFO \\] delaying .* by $delay_latency for rule 1 \\(standing\\)"
summary_line="INFO \\] rule 1: delayed [0-9]+ more request"
delayed=$(( $(grep -Ec "$delay_line" "$delay_log" || true) + $(sed -nE \
  's/.*rule 1: delayed ([0-9]+) more request.*/\1/p' "$delay_log" | awk '{n += $1} END {print n + 0}') ))
for f in "$work"/*.log; do
  extra=$(grep -Ev "INFO \\] (serving .* at |signal 15: shutting down|unmounted )|$delay_line|$summary_line" "$f" || true)
  if [ -n "$extra" ]; then
    log "--- $(basename "$f") says:"
    printf '%s\n' "$extra" | tail -n 20 >&2
  fi
done

# ---------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------
mode=$([ "$quick" = 1 ] && echo "quick" || echo "full")
printf '\n%s mode: %d MiB image in /dev/shm, %s s per job (+%s ramp), fio direct=1, %s CPUs%s\n\n' \
  "$mode" "$size_mib" "$runtime" "$ramp" "$(nproc)" \
  "${bdfs_args[*]:+, blkdebugfs ${bdfs_args[*]}}"
labels_joined=$(printf '%s\n' "${labels[@]}")
python3 - "$results" "$labels_joined" "$qemu_idx" "$zero_idx" "$standing_idx" "$delay_idx" \
  "$delay_latency" "$delay_ms" "$delayed" "$wc_idx" "$bad_idx" <<'EOF'
import re, sys
path, labels = sys.argv[1], sys.argv[2].split("\n")
qemu, zero, standing, delay, latency, delay_ms, delayed, wc, bad = sys.argv[3:]
rows, order = {}, []
for line in open(path):
    f = line.rstrip("\n").split("\t")
    if f[0] not in order:
        order.append(f[0])
    rows[(f[0], f[1])] = f[2:]

def ratio(w, t, ref):
    a, b = rows[(w, t)], rows.get((w, ref), ["FAILED"])
    if a[0] == "FAILED" or b[0] == "FAILED" or float(b[0]) == 0:
        return "–"
    x = float(a[0]) / float(b[0])
    return f"{x:.2f}×" if x >= 0.1 else f"{x:.3f}×"  # three places: 0.004×, not 0.00×

def is_bdfs(t):
    return labels[int(t)].startswith("blkdebugfs") and t != zero

print("| workload | target | IOPS | MB/s | p99 µs | vs QEMU | vs raw | vs 0 rules |")
print("|---|---|--:|--:|--:|--:|--:|--:|")
for w in order:
    for t in range(len(labels)):
        t = str(t)
        r = rows.get((w, t))
        if r is None:
            continue
        if r[0] == "FAILED":
            print(f"| {w} | {labels[int(t)]} | FAILED | | | | | |")
            continue
        vs_zero = ratio(w, t, zero) if is_bdfs(t) else ""
        print(f"| {w} | {labels[int(t)]} | {r[0]} | {r[1]} | {r[2]} | "
              f"{ratio(w, t, qemu)} | {ratio(w, t, '0')} | {vs_zero} |")
print()
print("vs QEMU, vs raw, vs 0 rules: IOPS divided by the IOPS of the QEMU export / the raw "
      "file / blkdebugfs with 0 rules on the same workload (above 1 = faster). p99 µs: 99th "
      "percentile completion latency.")

# The two speed goals of faults.md, the measured value beside each (not judged here).
print()
got = [f"{w}: {ratio(w, standing, zero)}" for w in order if (w, standing) in rows]
print(f"{labels[int(standing)]} (never act, checked on every request) vs 0 rules, "
      f"goal 0.95× or more: " + "; ".join(got))
# Rules that no request reaches should cost nothing either: how far their ratio strays from
# 1 shows how much one job's IOPS differ from the next on this machine.
for t in range(len(labels)):
    t = str(t)
    if is_bdfs(t) and t not in (standing, delay, wc, bad):
        got = [f"{ratio(w, t, zero)}" for w in order if (w, standing) in rows]
        print(f"  noise reference, {labels[int(t)]} vs 0 rules on the same workloads: "
              + ", ".join(got))
got = []
for w in order:
    r = rows.get((w, delay))
    if r is None:
        continue
    depth = int(re.search(r"QD(\d+)", w).group(1))
    ceiling = depth * 1000 / float(delay_ms)
    iops = "FAILED" if r[0] == "FAILED" else f"{int(r[0]):,} IOPS ({float(r[0]) / ceiling:.0%})"
    got.append(f"{w}: {iops} of {ceiling:,.0f}")
print(f"{labels[int(delay)]} (standing, every request), goal: close to depth / {latency}: "
      + "; ".join(got) + f"; {delayed} requests delayed (daemon log, ramp included)")

# The write cache (faults.md §5): journaled writes, goal at least half the IOPS of 0 rules
# (no cache) on the same workload; reads never touch the journal, goal about 1.0x.
got_w = [f"{w}: {ratio(w, wc, zero)}" for w in order if (w, wc) in rows and "write" in w]
got_r = [f"{w}: {ratio(w, wc, zero)}" for w in order if (w, wc) in rows and "read" in w]
print(f"{labels[int(wc)]} vs 0 rules on the same workload, writes (goal 0.5× or more): "
      + "; ".join(got_w) + "; reads (goal about 1.0×): " + "; ".join(got_r))
# Bad sectors (faults.md §4): free outside the set.
got = [f"{w}: {ratio(w, bad, zero)}" for w in order if (w, bad) in rows]
print(f"{labels[int(bad)]} (none touched) vs 0 rules, goal about 1.0×: " + "; ".join(got))
EOF
echo
printf 'Daemon resident size before -> after all workloads: %s\n\n' "${rss_report%; }"

if [ -s "$nbd_results" ]; then
  printf 'NBD: fio --ioengine=nbd (libnbd, one connection per job), same image and settings\n\n'
  python3 - "$nbd_results" "$qemu_bench_rows" "${nbd_labels[@]}" <<'EOF'
import sys
path, qemu_rows, *labels = sys.argv[1:]
rows, order = {}, []
for line in open(path):
    f = line.rstrip("\n").split("\t")
    if f[0] not in order:
        order.append(f[0])
    rows[(f[0], f[1])] = f[2:]
print("| workload | server | IOPS | MB/s | p99 µs | vs nbdkit | goal | of ceiling |")
print("|---|---|--:|--:|--:|--:|--:|--:|")
for w in order:
    for t in ("0", "1", "2"):
        r = rows.get((w, t))
        if r is None:
            continue
        if r[0] == "FAILED":
            print(f"| {w} | {labels[int(t)]} | FAILED | | | | | |")
            continue
        vs, goal, of_ceiling = "", "", ""
        k = rows.get((w, "1"), ["FAILED"])
        c = rows.get((w, "2"), ["FAILED"])
        if t != "1" and k[0] != "FAILED" and float(k[0]) > 0:
            vs = f"{float(r[0]) / float(k[0]):.2f}×"
        if t == "0":
            goal = "1.5×" if w.startswith("4k") else "1.0×"
            if c[0] != "FAILED" and float(c[0]) > 0:
                of_ceiling = f"{float(r[0]) / float(c[0]):.2f}×"
        cells = [w, labels[int(t)], *r[:3], vs, goal, of_ceiling]
        print("| " + " | ".join(cells) + " |")
print()
print("qemu-img bench (QEMU's own client, 4 KiB requests, depth 16):")
print()
print("| workload | path | IOPS |")
print("|---|---|--:|")
for line in open(qemu_rows):
    name, iops = line.rstrip("\n").split("\t")
    w, via = name.split("|")
    print(f"| {w} | {via} | {iops} |")
EOF
  echo
fi

# explore: states per second, time to the first failure, what recording costs (its own
# script, the same binary; --quick there too).
echo
explore_args=()
[ "$quick" = 1 ] && explore_args=(--quick)
BLKDEBUGFS="$bdfs" bash "$repo/scripts/bench-explore.sh" "${explore_args[@]}" || failed=1

[ "$failed" = 0 ] || die "some jobs failed (see above)"
