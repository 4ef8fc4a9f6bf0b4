#!/usr/bin/env bash
# Benchmark `blkdebugfs explore` (spec/explore.md, issue 17's speed goals):
#
#   scripts/bench-explore.sh            # full run: about 1 minute
#   scripts/bench-explore.sh --quick    # CI smoke run: about 15 s
#
# 1. States per second: a 64 MiB ext4 image, a workload of fsync'd updates (many epochs),
#    and a trivial check (`test -s config`; explore mounts, checks, unmounts and runs
#    `e2fsck -fn` around it), with --jobs 1 and --jobs 2. Goal: at least 15 states/s with
#    --jobs 2. Where the time goes: the mean time a state spends in its check (mount, check,
#    unmount, fsck, from --report) against the wall time per state.
# 2. Time to the first failure: the unsafe rename (write a temp file, rename it over
#    `config`, no fsync) on ext4 noauto_da_alloc,commit=1, with --stop-at-first, from
#    start to report, workload (which sleeps 2 s for ext4's commit) and mkfs included.
#    Goal: within 5 s.
# 3. What recording costs: fio 4k random writes QD16 (an fsync every 64) on a mount with
#    --write-cache, then on one with --record (which adds the write's bytes and first
#    before-images to a recording). Goal: --record at least half the IOPS (at most 2x).
#
# The images live in /dev/shm (this machine kind pages disk files out within seconds).
# Nothing here judges a number: the goals are printed beside them. Needs root, /dev/fuse,
# e2fsprogs, fio. Everything it starts, mounts or creates is removed on exit.
set -eu
quick=0
[ "${1:-}" = "--quick" ] && quick=1
cd "$(dirname "$0")/.."
if [ -z "${BLKDEBUGFS:-}" ]; then
  cargo build --release --quiet
  BLKDEBUGFS=$PWD/target/release/blkdebugfs
fi
PATH=$(dirname "$BLKDEBUGFS"):$PATH
export PATH

work=$(mktemp -d /dev/shm/bench-explore.XXXXXX)
mounted=""
cleanup() {
  for m in $mounted; do
    umount "$m" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
say() { echo "$@" >&2; }

truncate -s 64M "$work/disk.img"
cat > "$work/setup.sh" <<'EOF'
set -e
mkfs.ext4 -q -F "$BLKDEBUGFS_DEV"
m=$(mktemp -d); mount "$BLKDEBUGFS_DEV" "$m"; echo "version 0" > "$m/config"; umount "$m"; rmdir "$m"
EOF
updates=24
[ "$quick" = 1 ] && updates=6
cat > "$work/safe.sh" <<EOF
set -e
for i in \$(seq 1 $updates); do
  echo "version \$i" > config.tmp; sync config.tmp; mv config.tmp config; sync .
  echo "mark \$i" > "\$BLKDEBUGFS_MNT/.control"
done
EOF
cat > "$work/unsafe.sh" <<'EOF'
set -e
for i in 1 2 3 4 5; do echo "version $i" > config.tmp; mv config.tmp config; done
sleep 2
EOF

say "recording the fsync'd updates..."
blkdebugfs explore "$work/disk.img" --fs ext4 --setup "sh $work/setup.sh" \
  --workload "sh $work/safe.sh" --check 'test -s config' --record "$work/rec" \
  --seed 1 --jobs 2 >/dev/null

echo "## explore"
echo
echo "| what | result | goal |"
echo "|---|---|---|"
for jobs in 1 2; do
  start=$(date +%s.%N)
  blkdebugfs explore --from "$work/rec" --fs ext4 --check 'test -s config' --seed 1 \
    --jobs "$jobs" --report "$work/r$jobs.jsonl" >/dev/null
  end=$(date +%s.%N)
  python3 - "$work/r$jobs.jsonl" "$start" "$end" "$jobs" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
states = [r for r in rows if "state" in r]
wall = float(sys.argv[3]) - float(sys.argv[2])
jobs = int(sys.argv[4])
mean = sum(r["seconds"] for r in states) / max(len(states), 1)
goal = "at least 15/s" if jobs == 2 else ""
print(f"| states/s, --jobs {jobs} (trivial check, 64 MiB ext4) | {len(states)/wall:.1f} "
      f"({len(states)} states in {wall:.2f} s, the whole command; a state's check: mount, "
      f"test, unmount, e2fsck -fn = {mean*1000:.0f} ms mean) | {goal} |")
EOF
done

start=$(date +%s.%N)
set +e
blkdebugfs explore "$work/disk.img" --fs ext4:noauto_da_alloc,commit=1 \
  --setup "sh $work/setup.sh" --workload "sh $work/unsafe.sh" \
  --check 'test -s config' --stop-at-first --jobs 2 --seed 1 >"$work/unsafe.out"
rc=$?
set -e
end=$(date +%s.%N)
python3 - "$start" "$end" "$rc" <<'EOF'
import sys
wall = float(sys.argv[2]) - float(sys.argv[1])
found = "found" if sys.argv[3] == "1" else f"NOT found (exit {sys.argv[3]})"
print(f"| unsafe rename: start to first failure, workload included | {wall:.2f} s ({found}; "
      f"the workload sleeps 2 s for ext4's commit) | within 5 s |")
EOF

runtime=8
[ "$quick" = 1 ] && runtime=2
fio_iops() {
  fio --name=w --filename="$1" --rw=randwrite --bs=4k --ioengine=libaio --iodepth=16 \
    --direct=1 --fsync=64 --time_based --runtime="$runtime" --size=48M \
    --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["write"]["iops"]))'
}
truncate -s 64M "$work/plain.img"
declare -A iops
for mode in write-cache record; do
  mkdir -p "$work/mnt-$mode"
  args=(--write-cache)
  [ "$mode" = record ] && args=(--record "$work/rec-fio")
  blkdebugfs mount "$work/plain.img" "$work/mnt-$mode" "${args[@]}" --daemonize --force-share
  mounted="$mounted $work/mnt-$mode"
  iops[$mode]=$(fio_iops "$work/mnt-$mode/plain.img")
  umount "$work/mnt-$mode"
done
python3 - "${iops[write-cache]}" "${iops[record]}" <<'EOF'
import sys
wc, rec = int(sys.argv[1]), int(sys.argv[2])
print(f"| recording: 4k random writes QD16, fsync every 64 | --record {rec} IOPS, "
      f"--write-cache {wc} IOPS ({wc/max(rec,1):.2f}x the cost) | at most 2x |")
EOF
