#!/usr/bin/env bash
# shellcheck disable=SC2317  # cleanup and the check helpers are called via trap/"$@"
# vm-test.sh: prove that a real VM can use a blkdebugfs view as its disk, that an
# injected read error reaches the guest kernel at the right sector, and that a guest cut
# off mid-write by a power cut comes back with its fsync'd files and a clean fsck.
#
#   run 1  no rules: the guest writes a random 64 KiB pattern with O_DIRECT, reads it
#          back and compares, and does one O_DIRECT read starting at sector $SECTOR: all
#          must succeed. Afterwards the host checks the pattern is in the image file.
#   run 2  rule `event=read_aio,errno=EIO,sector=$SECTOR`: the guest's write/read-back
#          must still succeed, its read at sector $SECTOR must fail, the guest kernel must
#          log `I/O error, dev vda, sector $SECTOR op 0x0:(READ)` (and no other I/O
#          error), and blkdebugfs must log the injection on a read covering that sector.
#   run 3  a fresh ext4 (made on the host), `--write-cache` and the rule
#          `power-cut:event=flush_to_disk,skip=$POWERCUT_SKIP,mode=random` (seed 7): the
#          guest mounts it and writes files with fsync, printing each one's md5 once its
#          fsync returned, until the power goes mid-write and its next fsync fails.
#   run 4  the crash image, mounted again: the guest mounts the filesystem (replaying its
#          journal), every file run 3 reported fsync'd must have the md5 it reported, and
#          after unmounting, the guest's `e2fsck -fn` must be clean.
#   run 5  run 3's guest workload with no cut, recorded with `mount --record`, the host
#          marking each file the guest reports fsync'd; `explore --from` then checks every
#          crash state: marked files intact, full-size files as written, e2fsck -fn clean.
#   run 6  run 2 over NBD: `blkdebugfs serve` (no FUSE mount) with the same rule, the guest's
#          disk `-drive driver=nbd,server.type=unix,...,cache=none`; the same checks as
#          run 2 (its read at sector $SECTOR fails, the kernel names that sector, nothing
#          else fails, blkdebugfs logged the injection), and the pattern reached the image.
#
# The guest is a Debian kernel plus a tiny busybox initramfs built here; QEMU opens the
# view with cache=none (O_DIRECT), so every guest request reaches blkdebugfs (run 6: QEMU's
# NBD client, which has no cache of its own).
#
# Environment:
#   BLKDEBUGFS          the binary (default: target/release/blkdebugfs, built if missing)
#   VMTEST_ACCEL        kvm | tcg (default: kvm when /dev/kvm works, else tcg)
#   VMTEST_TIMEOUT      seconds allowed for one VM boot (default 120)
#   VMTEST_RULE_SECTOR  sector the run-2 rule targets (default: the sector the guest
#                       reads). Set it elsewhere (e.g. 100000, or 70016, just past
#                       QEMU's 4 KiB-aligned request) to see the run-2 checks fail.
#   VMTEST_KERNEL       a vmlinuz to boot instead of the newest /boot/vmlinuz-*
#   VMTEST_INSTALL_ONLY  1: install the packages the VM needs, then exit 0 (.ci/run)
#   VMTEST_POWERCUT_SKIP  flush_to_disk firings run 3 lets pass before the cut (default
#                       41: the guest's mount costs about 1 and each file 2, so the cut
#                       lands at the first flush of the 21st file's fsync, with its data
#                       and journal blocks unsynced; 40 cuts at a flush with only the
#                       20th file's commit block unsynced)
#
# Needs root (apt-get, FUSE mounts). Exits 0 only if every check passed; always removes
# its mount, its processes and its temporary directory.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VM_TIMEOUT="${VMTEST_TIMEOUT:-120}"

# Disk layout (512-byte sectors). The image is 64 MiB = 131072 sectors. The guest kernel's
# partition probe reads the first sectors and the last ones (GPT backup header), so both
# the pattern and the faulty sector sit well away from both ends and from each other.
IMAGE_MIB=64
PATTERN_OFFSET=$((8 * 1024 * 1024))           # byte offset of the pattern (sector 16384)
PATTERN_BYTES=$((64 * 1024))                  # 64 KiB, written as 16 x 4 KiB blocks
SECTOR=70001                                  # the sector the guest reads in both runs
RULE_SECTOR="${VMTEST_RULE_SECTOR:-$SECTOR}"  # the sector run 2's rule fails
POWERCUT_SKIP="${VMTEST_POWERCUT_SKIP:-41}"   # run 3: flush_to_disk firings before the cut
POWERCUT_FILES=40                             # run 3: files the guest writes, 64 KiB each

log() { printf '==> %s\n' "$*"; }
die() { printf 'vm-test: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get, FUSE mounts, /boot)"
[ -c /dev/fuse ] || die "/dev/fuse is missing"

T_START=$SECONDS

# ---------------------------------------------------------------------------------------
# 1. Dependencies
# ---------------------------------------------------------------------------------------

# Newest Debian kernel in /boot that comes with its config (to see how virtio is built)
# and its module tree (to copy virtio modules from). Prints nothing if there is none.
find_kernel() {
  local f ver
  for f in /boot/vmlinuz-*; do
    [ -e "$f" ] || continue
    ver="${f#/boot/vmlinuz-}"
    if [ -r "/boot/config-$ver" ] && [ -d "/lib/modules/$ver/kernel" ]; then
      printf '%s\n' "$ver"
    fi
  done | sort -V | tail -n 1
}

pkg_installed() {
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]
}

install_deps() {
  local need_main=() need_qemu=() apt_opts=(-o DPkg::Lock::Timeout=300)
  local qemu_utils_ver="" bpo_suite="" tmp_sources=""

  command -v qemu-system-x86_64 >/dev/null 2>&1 || need_qemu+=(qemu-system-x86)
  # A static busybox: the initramfs has no libc. (busybox-static replaces the dynamic
  # busybox package; we do not remove packages, so refuse instead.)
  if ! pkg_installed busybox-static; then
    if pkg_installed busybox; then
      die "the dynamic busybox package is installed; replace it with busybox-static first"
    fi
    need_main+=(busybox-static)
  fi
  command -v cpio >/dev/null 2>&1 || need_main+=(cpio)
  if [ -z "${VMTEST_KERNEL:-}" ] && [ -z "$(find_kernel)" ]; then
    # The cloud flavour is the smallest Debian kernel with virtio. A linux-image package
    # needs an initramfs generator; initramfs-tools would pull udev and upgrade systemd,
    # so unless one is already installed take tiny-initramfs (no dependencies to speak
    # of; we build our own initramfs anyway).
    need_main+=(linux-image-cloud-amd64)
    if ! pkg_installed initramfs-tools && ! pkg_installed dracut \
      && ! pkg_installed tiny-initramfs; then
      need_main+=(tiny-initramfs)
    fi
  fi
  command -v modprobe >/dev/null 2>&1 || need_main+=(kmod)

  if [ "${#need_main[@]}" -eq 0 ] && [ "${#need_qemu[@]}" -eq 0 ]; then
    log "dependencies: all present, nothing to install"
    return
  fi

  # qemu-system-x86 must match the installed qemu-utils: qemu-utils 10 (the one .ci/run
  # uses for the differential test, from backports) Breaks qemu-system-common << 8.0, so
  # bookworm's own qemu-system-x86 7.2 would remove it. Take QEMU from backports then,
  # through a temporary sources list: the machine's apt configuration is left alone.
  if [ "${#need_qemu[@]}" -gt 0 ]; then
    qemu_utils_ver="$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)"
    if [[ "$qemu_utils_ver" == *~bpo* ]]; then
      local codename mirror
      # shellcheck disable=SC1091
      codename="$(. /etc/os-release && printf '%s' "$VERSION_CODENAME")"
      bpo_suite="${codename}-backports"
      # The Debian mirror the machine already uses for its own release.
      # shellcheck disable=SC2016  # $(...) here is apt's format syntax, not the shell's
      mirror="$(apt-get indextargets --format '$(RELEASE) $(REPO_URI)' 2>/dev/null \
        | awk -v s="$codename" '$1 == s { print $2; exit }')"
      [ -n "$mirror" ] || die "qemu-utils $qemu_utils_ver is from backports, but no $codename mirror is configured"
      tmp_sources="$(mktemp)"
      # shellcheck disable=SC2064  # expand now: tmp_sources is local
      trap "rm -f '$tmp_sources'" EXIT
      # Dir::Etc::sourcelist replaces /etc/apt/sources.list: keep its entries too.
      if [ -r /etc/apt/sources.list ]; then cat /etc/apt/sources.list >"$tmp_sources"; fi
      printf 'deb %s %s main\n' "$mirror" "$bpo_suite" >>"$tmp_sources"
      apt_opts+=(-o "Dir::Etc::sourcelist=$tmp_sources")
    fi
  fi

  local before after t0=$SECONDS
  before="$(dpkg-query -W -f='${Package} ${Version}\n' | sort)"
  log "installing: ${need_main[*]} ${need_qemu[*]}${bpo_suite:+ (QEMU from $bpo_suite, to match qemu-utils $qemu_utils_ver)}"
  apt-get "${apt_opts[@]}" update -qq
  # --no-remove: never remove anything (e.g. qemu-utils) to make room.
  local install=(apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends --no-remove)
  if [ "${#need_main[@]}" -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive "${install[@]}" "${need_main[@]}" >/dev/null
  fi
  if [ "${#need_qemu[@]}" -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive "${install[@]}" ${bpo_suite:+-t "$bpo_suite"} \
      "${need_qemu[@]}" >/dev/null
  fi
  if [ -n "$tmp_sources" ]; then rm -f "$tmp_sources"; trap - EXIT; fi
  after="$(dpkg-query -W -f='${Package} ${Version}\n' | sort)"
  log "installed in $((SECONDS - t0)) s (package, version):"
  comm -13 <(printf '%s\n' "$before") <(printf '%s\n' "$after") | sed 's/^/    /'
}

install_deps
# .ci/run installs the VM's packages up front (other tests use qemu-system too) this way.
if [ "${VMTEST_INSTALL_ONLY:-0}" = 1 ]; then
  exit 0
fi

# The blkdebugfs binary: $BLKDEBUGFS, or the release build (built only when missing).
BLKDEBUGFS="${BLKDEBUGFS:-$REPO_ROOT/target/release/blkdebugfs}"
if [ ! -x "$BLKDEBUGFS" ]; then
  log "building $BLKDEBUGFS (cargo build --release)"
  (cd "$REPO_ROOT" && cargo build --release)
  [ -x "$BLKDEBUGFS" ] || die "$BLKDEBUGFS missing after the build"
fi

# Kernel, and which virtio modules the initramfs must load.
if [ -n "${VMTEST_KERNEL:-}" ]; then
  KERNEL="$VMTEST_KERNEL"
  KVER="$(basename "$KERNEL")"
  KVER="${KVER#vmlinuz-}"
else
  KVER="$(find_kernel)"
  [ -n "$KVER" ] || die "no kernel in /boot after the install"
  KERNEL="/boot/vmlinuz-$KVER"
fi
[ -r "$KERNEL" ] || die "cannot read kernel $KERNEL"

# ---------------------------------------------------------------------------------------
# Cleanup: everything below is undone by this trap, on success, failure or Ctrl-C. Only
# PIDs this script started are signalled.
# ---------------------------------------------------------------------------------------
WORK=""        # temporary directory
MNT=""         # its FUSE mount point
DAEMON_PID=""  # blkdebugfs serving MNT (run 6: serving NBD on $WORK/nbd.sock)
VM_PID=""      # `timeout qemu-system-x86_64 ...` (timeout passes signals on to QEMU)

# True if PID is alive and still runs PROGRAM (guards against PID reuse).
pid_runs() {
  [ -n "$1" ] && grep -qa "$2" "/proc/$1/cmdline" 2>/dev/null
}

stop_vm() {
  if [ -n "$VM_PID" ] && kill -0 "$VM_PID" 2>/dev/null; then
    kill -TERM "$VM_PID" 2>/dev/null || true
    local i
    for i in $(seq 50); do kill -0 "$VM_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$VM_PID" 2>/dev/null || true
    wait "$VM_PID" 2>/dev/null || true
  fi
  VM_PID=""
}

# Unmount MNT and wait for its daemon to exit (it flushes the image and exits on unmount;
# SIGTERM, then SIGKILL, if it does not).
stop_mount() {
  local i
  if [ -n "$MNT" ] && mountpoint -q "$MNT"; then
    umount "$MNT" 2>/dev/null || true
  fi
  if pid_runs "$DAEMON_PID" blkdebugfs; then
    for i in $(seq 100); do pid_runs "$DAEMON_PID" blkdebugfs || break; sleep 0.1; done
    if pid_runs "$DAEMON_PID" blkdebugfs; then
      printf 'vm-test: warning: blkdebugfs (pid %s) still running 10 s after umount; SIGTERM\n' "$DAEMON_PID" >&2
      kill -TERM "$DAEMON_PID" 2>/dev/null || true
      for i in $(seq 50); do pid_runs "$DAEMON_PID" blkdebugfs || break; sleep 0.1; done
      if pid_runs "$DAEMON_PID" blkdebugfs; then kill -KILL "$DAEMON_PID" 2>/dev/null || true; fi
    fi
  fi
  DAEMON_PID=""
  # A mount whose daemon died without unmounting: detach it.
  if [ -n "$MNT" ] && mountpoint -q "$MNT"; then
    umount -l "$MNT" 2>/dev/null || true
  fi
}

# Stop `blkdebugfs serve` (run 6): SIGTERM, then SIGKILL if it has not exited in 10 s.
stop_serve() {
  local i
  if pid_runs "$DAEMON_PID" blkdebugfs; then
    kill -TERM "$DAEMON_PID" 2>/dev/null || true
    for i in $(seq 100); do pid_runs "$DAEMON_PID" blkdebugfs || break; sleep 0.1; done
    if pid_runs "$DAEMON_PID" blkdebugfs; then
      printf 'vm-test: warning: blkdebugfs serve (pid %s) still running 10 s after SIGTERM; SIGKILL\n' "$DAEMON_PID" >&2
      kill -KILL "$DAEMON_PID" 2>/dev/null || true
    fi
  fi
  DAEMON_PID=""
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_vm
  stop_mount
  # Never rm -r through a live mount: only remove WORK once MNT is gone.
  if [ -n "$WORK" ] && [ -d "$WORK" ]; then
    if [ -n "$MNT" ] && mountpoint -q "$MNT"; then
      printf 'vm-test: warning: %s is still mounted; leaving %s\n' "$MNT" "$WORK" >&2
    else
      rm -rf "$WORK"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

WORK="$(mktemp -d /tmp/vm-test.XXXXXX)"
MNT="$WORK/mnt"
mkdir "$MNT"

# ---------------------------------------------------------------------------------------
# 2. The initramfs: busybox + /init (+ virtio modules when the kernel has them as modules)
# ---------------------------------------------------------------------------------------
build_initramfs() {
  local root="$WORK/initramfs" cfg modules=() line mod dst
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,lib/modules,etc}
  cp /bin/busybox "$root/bin/busybox"
  # e2fsck for run 4, with the libraries it links (busybox has no ext4 fsck).
  local e2fsck lib
  e2fsck="$(command -v e2fsck)" || die "e2fsck is missing (e2fsprogs)"
  cp "$e2fsck" "$root/sbin/e2fsck"
  while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done < <(ldd "$e2fsck" | grep -o '/[^ ]*')
  head -c "$PATTERN_BYTES" /dev/urandom >"$WORK/pattern.bin"
  cp "$WORK/pattern.bin" "$root/pattern.bin"

  # virtio_blk (the disk) and virtio_pci (its transport) with their dependencies, in load
  # order, unless the kernel has them built in (modprobe prints `builtin NAME` then).
  cfg="/boot/config-$KVER"
  if [ -r "$cfg" ]; then
    log "kernel $KVER: $(grep -E '^CONFIG_VIRTIO(_PCI|_BLK)?=' "$cfg" | tr '\n' ' ')"
  fi
  if [ -d "/lib/modules/$KVER" ]; then
    while read -r line; do
      case "$line" in
        insmod\ *)
          mod="$(printf '%s\n' "$line" | awk '{print $2}')"
          dst="$(basename "$mod")"
          dst="${dst%.xz}"; dst="${dst%.zst}"; dst="${dst%.gz}"
          case "$mod" in  # busybox insmod wants plain .ko
            *.xz) xz -dc "$mod" >"$root/lib/modules/$dst" ;;
            *.zst) zstd -qdc "$mod" >"$root/lib/modules/$dst" ;;
            *.gz) gzip -dc "$mod" >"$root/lib/modules/$dst" ;;
            *) cp "$mod" "$root/lib/modules/$dst" ;;
          esac
          modules+=("$dst")
          ;;
      esac
    done < <(modprobe -a --show-depends -S "$KVER" virtio_pci virtio_blk | awk '!seen[$0]++')
  fi
  log "initramfs modules: ${modules[*]:-(none: virtio built in)}"

  # busybox dd has iflag/oflag=direct only when built with them; Debian's has.
  local direct_in="" direct_out=""
  if /bin/busybox dd --help 2>&1 | grep -q 'direct'; then
    direct_in="iflag=direct" direct_out="oflag=direct"
  fi

  cat >"$root/etc/vmtest.conf" <<EOF
MODULES="${modules[*]}"
SECTOR=$SECTOR
PATTERN_BLOCKS=$((PATTERN_BYTES / 4096))
PATTERN_SEEK=$((PATTERN_OFFSET / 4096))
POWERCUT_FILES=$POWERCUT_FILES
DIRECT_IN="$direct_in"
DIRECT_OUT="$direct_out"
EOF

  # The guest's test. Every result is a line starting with VMTEST, which the host greps.
  cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
. /etc/vmtest.conf
# SeaBIOS leaves the cursor after "Booting from ROM..."; start our lines on a fresh one.
echo
# The accelerator probe boots with `vmtest.probe`: prove the kernel runs, then stop.
if grep -q vmtest.probe /proc/cmdline; then
  echo "VMTEST probe ok"
  poweroff -f
fi

for m in $MODULES; do
  insmod "/lib/modules/$m" || echo "VMTEST insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done

# Run 3: write files with fsync on the host-made ext4 until the power goes. A file's md5
# is printed only once its fsync returned: those are the files that must survive.
if grep -q vmtest.mode=powercut /proc/cmdline; then
  mkdir -p /mnt
  if mount -t ext4 -o errors=remount-ro /dev/vda /mnt 2>/tmp/err; then
    i=1
    while [ "$i" -le "$POWERCUT_FILES" ]; do
      if dd if=/dev/urandom of="/mnt/f$i" bs=4096 count=16 conv=fsync 2>/tmp/err; then
        echo "VMTEST synced f$i $(md5sum <"/mnt/f$i" | cut -d' ' -f1)"
      else
        echo "VMTEST write f$i failed: $(tail -n 1 /tmp/err)"
        break
      fi
      i=$((i + 1))
    done
  else
    echo "VMTEST mount failed: $(tail -n 1 /tmp/err)"
  fi
  echo "VMTEST done"
  poweroff -f
fi
# Run 4: the crash image. Mounting replays the journal, as after any crash; then the files'
# md5s, and e2fsck of the unmounted filesystem.
if grep -q vmtest.mode=check /proc/cmdline; then
  mkdir -p /mnt
  if mount -t ext4 /dev/vda /mnt 2>/tmp/err; then
    echo "VMTEST mounted"
    for f in /mnt/f*; do
      [ -f "$f" ] && echo "VMTEST file ${f#/mnt/} $(md5sum <"$f" | cut -d' ' -f1)"
    done
    umount /mnt && echo "VMTEST unmounted"
  else
    echo "VMTEST mount failed: $(tail -n 1 /tmp/err)"
  fi
  e2fsck -fn /dev/vda >/tmp/fsck 2>&1
  rc=$?
  sed 's/^/VMTEST fsck| /' /tmp/fsck
  echo "VMTEST fsck exit $rc"
  echo "VMTEST done"
  poweroff -f
fi

if [ -b /dev/vda ]; then
  echo "VMTEST disk vda $(cat /sys/block/vda/size) sectors"

  # Write the pattern (O_DIRECT), then flush: QEMU turns the flush into fdatasync.
  if dd if=/pattern.bin of=/dev/vda bs=4096 seek="$PATTERN_SEEK" count="$PATTERN_BLOCKS" \
      conv=notrunc $DIRECT_OUT 2>/tmp/err && sync; then
    echo "VMTEST write ok"
  else
    echo "VMTEST write failed: $(tail -n 3 /tmp/err | tr '\n' ' ')"
  fi
  # Read it back (O_DIRECT, so from the disk, not the page cache) and compare. Drop
  # the page cache first in case busybox fell back to buffered I/O.
  echo 3 >/proc/sys/vm/drop_caches
  if dd if=/dev/vda of=/tmp/readback bs=4096 skip="$PATTERN_SEEK" count="$PATTERN_BLOCKS" \
      $DIRECT_IN 2>/tmp/err && cmp /tmp/readback /pattern.bin >/tmp/err 2>&1; then
    echo "VMTEST read ok"
  else
    echo "VMTEST read failed: $(tail -n 3 /tmp/err | tr '\n' ' ')"
  fi
  # The read a rule targets: one O_DIRECT request starting exactly at SECTOR, so the
  # kernel's error line names SECTOR. It is 4 KiB, not 512 bytes: busybox dd's malloc'd
  # 512-byte buffer is not 512-aligned, the guest kernel refuses that O_DIRECT read (EINVAL)
  # and busybox silently retries it through the page cache. Even at 4 KiB (and at 1 MiB)
  # that retry still happens in some runs; the host's checks accept its page-cache form
  # (see IOERR_S below).
  if dd if=/dev/vda of=/dev/null bs=4096 count=1 skip="$((SECTOR * 512))" \
      iflag=skip_bytes${DIRECT_IN:+,direct} 2>/tmp/err; then
    echo "VMTEST sector $SECTOR read ok"
  else
    echo "VMTEST sector $SECTOR read failed: $(head -n 1 /tmp/err)"
  fi
else
  echo "VMTEST no /dev/vda"
fi
echo "VMTEST done"
poweroff -f
EOF
  chmod 0755 "$root/init"
  (cd "$root" && find . | cpio -o -H newc --quiet) | gzip -1 >"$WORK/initramfs.gz"
}
build_initramfs

# ---------------------------------------------------------------------------------------
# 3. Accelerator: KVM when /dev/kvm is there and really runs this guest, else TCG.
# ---------------------------------------------------------------------------------------
# Opening /dev/kvm, and even creating a VM, is not enough: under nested virtualization
# (seen on a Firecracker host) KVM can stop the guest early in boot ("KVM internal
# error. Suberror: 1 / emulation failure" with -cpu host, a silent hang without it) and
# QEMU then sits there until the timeout. So boot the real kernel and initramfs once with
# `vmtest.probe` (the init powers off at once) and use KVM only if that prints its
# marker within 10 s; a working KVM takes ~1-2 s. A KVM internal error ends it early.
kvm_works() {
  local probe="$WORK/kvm-probe.log" i
  [ -c /dev/kvm ] && [ -r /dev/kvm ] && [ -w /dev/kvm ] || return 1
  timeout -k 2 20 qemu-system-x86_64 -nographic -no-reboot -m 256 -smp 1 -nic none \
    -enable-kvm -cpu host -kernel "$KERNEL" -initrd "$WORK/initramfs.gz" \
    -append 'console=ttyS0 panic=-1 quiet vmtest.probe' </dev/null >"$probe" 2>&1 &
  VM_PID=$!
  for i in $(seq 100); do
    kill -0 "$VM_PID" 2>/dev/null || break
    grep -aq 'KVM internal error' "$probe" && break
    sleep 0.1
  done
  stop_vm
  if grep -aq 'VMTEST probe ok' "$probe"; then
    return 0
  fi
  log "KVM does not boot this guest (probe after ${i}00 ms: $(grep -a -m 1 -o 'KVM internal error.*' "$probe" | tr -d '\r' || echo 'no output')); using TCG"
  return 1
}
ACCEL="${VMTEST_ACCEL:-}"
if [ -z "$ACCEL" ]; then
  if kvm_works; then ACCEL=kvm; else ACCEL=tcg; fi
fi
case "$ACCEL" in
  kvm) ACCEL_ARGS=(-enable-kvm -cpu host) ;;
  tcg) ACCEL_ARGS=(-accel tcg) ;;
  *) die "VMTEST_ACCEL must be kvm or tcg" ;;
esac
log "qemu: $(qemu-system-x86_64 --version | head -n 1); accelerator: $ACCEL; kernel: $KERNEL"

# ---------------------------------------------------------------------------------------
# 4. The runs
# ---------------------------------------------------------------------------------------
IMAGE="$WORK/disk.img"
VIEW="$MNT/disk.img"
truncate -s "${IMAGE_MIB}M" "$IMAGE"

# mount_view LOGFILE [blkdebugfs mount options...]
mount_view() {
  local logf="$1"
  shift
  "$BLKDEBUGFS" mount "$@" --daemonize --pidfile "$WORK/blkdebugfs.pid" \
    --log-file "$logf" "$IMAGE" "$MNT"
  DAEMON_PID="$(cat "$WORK/blkdebugfs.pid")"
  [ -e "$VIEW" ] || die "blkdebugfs mounted, but $VIEW does not exist"
}

# boot_vm CONSOLE_LOG [KERNEL_ARGS]: boot the guest on the view, with KERNEL_ARGS (e.g.
# vmtest.mode=check) appended to its command line; sets VM_RC (124 = timed out).
boot_vm() {
  local console="$1" t0=$SECONDS
  # In the background, waited on with `wait`: bash runs its INT/TERM traps at once then,
  # where a foreground child would delay Ctrl-C until QEMU exits.
  timeout -k 5 "$VM_TIMEOUT" qemu-system-x86_64 -nographic -no-reboot -m 256 -smp 1 \
    -nic none "${ACCEL_ARGS[@]}" \
    -kernel "$KERNEL" -initrd "$WORK/initramfs.gz" \
    -append "console=ttyS0 panic=-1 quiet${2:+ $2}" \
    -drive "${DRIVE:-file=$VIEW,format=raw,cache=none,if=virtio}" \
    </dev/null >"$console" 2>&1 &
  VM_PID=$!
  VM_RC=0
  wait "$VM_PID" || VM_RC=$?
  VM_PID=""
  # Drop carriage returns and SeaBIOS's terminal escapes, so lines start with their text.
  sed -E $'s/\r$//; s/\x1b(\\[[0-9;?]*[A-Za-z]|c)//g' "$console" >"$console.txt"
  log "VM exited with status $VM_RC after $((SECONDS - t0)) s; console:"
  sed 's/^/    | /' "$console.txt"
}

RESULTS=()
FAILED=0
check() {  # check DESCRIPTION COMMAND...
  local what="$1"
  shift
  if "$@"; then
    RESULTS+=("PASS  $what")
  else
    RESULTS+=("FAIL  $what")
    FAILED=1
  fi
}
# Markers are matched anywhere in a line: a kernel message may share the line.
has() { grep -aqE "$2" "$1"; }
lacks() { ! grep -aqE "$2" "$1"; }
# no_other_io_errors CONSOLE: no kernel I/O error line except the expected one.
no_other_io_errors() {
  [ "$({ grep -a 'I/O error' "$1" || true; } | grep -acvE "$IOERR_S |$IOERR_PAGE" || true)" -eq 0 ]
}
# injected_at LOG BYTE: the daemon logged an injected EIO on a read covering BYTE.
injected_at() {
  local off len
  while read -r off len; do
    if [ "$off" -le "$2" ] && [ "$2" -lt $((off + len)) ]; then return 0; fi
  done < <(sed -nE 's/.*injecting EIO \(5\) into read at offset ([0-9]+), ([0-9]+) bytes.*/\1 \2/p' "$1")
  return 1
}
show_daemon_log() {
  log "blkdebugfs log:"
  sed 's/^/    | /' "$1"
}

# The kernel logs `I/O error, dev vda, sector N op 0x0:(READ) flags ...` for a failed read.
# Sometimes (2 runs in 8, under load too) busybox dd retries the failed O_DIRECT read through
# the page cache; then the kernel names the first sector of the 4 KiB page holding SECTOR and
# adds a "Buffer I/O error ... async page read" line for that page. Either form is the
# guest seeing the injected error at SECTOR's page; nothing else may fail.
PAGE_SECTOR=$((SECTOR / 8 * 8))
IOERR_S="I/O error, dev vda, sector ($SECTOR|$PAGE_SECTOR) op 0x0:\(READ\)"
IOERR_PAGE="Buffer I/O error on dev vda, logical block $((SECTOR / 8)), async page read"

# Run 1: no rules.
log "run 1: no rules"
mount_view "$WORK/run1.log"
boot_vm "$WORK/run1.console"
stop_mount
show_daemon_log "$WORK/run1.log"
C1="$WORK/run1.console.txt"
check "run 1: VM powered off by itself (status 0)" test "$VM_RC" -eq 0
check "run 1: guest sees /dev/vda" has "$C1" 'VMTEST disk vda [0-9]+ sectors'
check "run 1: guest write ok" has "$C1" 'VMTEST write ok'
check "run 1: guest read-back matches" has "$C1" 'VMTEST read ok'
check "run 1: guest reads sector $SECTOR" has "$C1" "VMTEST sector $SECTOR read ok"
check "run 1: guest done" has "$C1" 'VMTEST done'
check "run 1: no I/O error in the guest kernel log" lacks "$C1" 'I/O error'
check "run 1: blkdebugfs injected nothing" lacks "$WORK/run1.log" 'injecting'
# The daemon has exited (and flushed): the bytes must be in the image file itself.
check "run 1: pattern is in the image file at byte $PATTERN_OFFSET" \
  cmp <(dd if="$IMAGE" bs=4096 skip=$((PATTERN_OFFSET / 4096)) \
    count=$((PATTERN_BYTES / 4096)) status=none) "$WORK/pattern.bin"

# Run 2: a read rule on RULE_SECTOR (normally the sector the guest reads).
log "run 2: --inject-error event=read_aio,errno=EIO,sector=$RULE_SECTOR"
mount_view "$WORK/run2.log" --inject-error "event=read_aio,errno=EIO,sector=$RULE_SECTOR"
boot_vm "$WORK/run2.console"
stop_mount
show_daemon_log "$WORK/run2.log"
C2="$WORK/run2.console.txt"
check "run 2: VM powered off by itself (status 0)" test "$VM_RC" -eq 0
check "run 2: guest write ok" has "$C2" 'VMTEST write ok'
check "run 2: guest read-back matches" has "$C2" 'VMTEST read ok'
check "run 2: guest's read of sector $SECTOR fails" has "$C2" "VMTEST sector $SECTOR read failed"
check "run 2: guest done" has "$C2" 'VMTEST done'
check "run 2: guest kernel logs '${IOERR_S//\\/}'" has "$C2" "$IOERR_S "
check "run 2: no other I/O error in the guest kernel log" no_other_io_errors "$C2"
check "run 2: blkdebugfs logged EIO injected into a read of byte $((SECTOR * 512))" \
  injected_at "$WORK/run2.log" $((SECTOR * 512))

# Run 3: a fresh ext4, the write cache, and a seeded random power cut at a flush.
log "run 3: ext4, --write-cache, power-cut:event=flush_to_disk,skip=$POWERCUT_SKIP,mode=random"
rm -f "$IMAGE"
truncate -s "${IMAGE_MIB}M" "$IMAGE"
# Inode tables and journal zeroed now: no lazy-init thread writing (and flushing) in the guest.
mkfs.ext4 -q -F -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 "$IMAGE"
mount_view "$WORK/run3.log" --write-cache --seed 7 --trace "$WORK/run3.trace" \
  --rule "power-cut:event=flush_to_disk,skip=$POWERCUT_SKIP,once=on,mode=random"
boot_vm "$WORK/run3.console" vmtest.mode=powercut
stop_mount
show_daemon_log "$WORK/run3.log"
C3="$WORK/run3.console.txt"
SYNCED="$WORK/run3.synced"
{ grep -aoE 'VMTEST synced f[0-9]+ [0-9a-f]{32}' "$C3" || true; } | awk '{print $3, $4}' >"$SYNCED"
log "run 3: $(wc -l <"$SYNCED") file(s) reported fsync'd; the cut:"
{ grep -a '"action":"power-cut"' "$WORK/run3.trace" || true; } | sed 's/^/    | /'
check "run 3: VM powered off by itself (status 0)" test "$VM_RC" -eq 0
check "run 3: guest mounted the ext4" lacks "$C3" 'VMTEST mount failed'
check "run 3: some files were fsync'd before the cut" test -s "$SYNCED"
check "run 3: the cut failed a later fsync (mid-write)" has "$C3" 'VMTEST write f[0-9]+ failed'
check "run 3: blkdebugfs logged the cut by rule 1" \
  has "$WORK/run3.log" 'power cut \(random, seed 7\): .* by rule 1'
check "run 3: the trace lists the cut" has "$WORK/run3.trace" '"action":"power-cut"'

# Run 4: the crash image (the image file as the cut left it), booted again.
log "run 4: the crash image of run 3"
mount_view "$WORK/run4.log"
boot_vm "$WORK/run4.console" vmtest.mode=check
stop_mount
show_daemon_log "$WORK/run4.log"
C4="$WORK/run4.console.txt"
# every_synced_file_intact: each `NAME MD5` of run 3 is a `VMTEST file NAME MD5` line now.
every_synced_file_intact() {
  local name sum ok=0
  while read -r name sum; do
    if ! grep -aqE "VMTEST file $name $sum" "$C4"; then
      printf 'vm-test: %s (md5 %s) did not survive the cut\n' "$name" "$sum" >&2
      ok=1
    fi
  done <"$SYNCED"
  return "$ok"
}
check "run 4: VM powered off by itself (status 0)" test "$VM_RC" -eq 0
check "run 4: guest mounted the crash image (journal replayed)" has "$C4" 'VMTEST mounted'
check "run 4: every file fsync'd in run 3 is there with its md5" every_synced_file_intact
check "run 4: guest unmounted it" has "$C4" 'VMTEST unmounted'
check "run 4: no I/O error in the guest kernel log" lacks "$C4" 'I/O error'
check "run 4: guest e2fsck -fn is clean (exit 0)" has "$C4" 'VMTEST fsck exit 0'

# Run 5: the same guest workload (no cut), recorded with `mount --record`; the host marks
# each file the guest reports fsync'd (`ctl mark`, recorded after the fsync returned), and
# `explore --from` checks every crash state of the run: each marked file has its md5, every
# full-size file has the md5 the guest reported (ext4's data=ordered), and e2fsck -fn is
# clean.
log "run 5: ext4, mount --record, the guest writes fsync'd files; explore --from checks every crash state"
rm -f "$IMAGE"
truncate -s "${IMAGE_MIB}M" "$IMAGE"
mkfs.ext4 -q -F -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 "$IMAGE"
REC5="$WORK/rec5"
mount_view "$WORK/run5.log" --record "$REC5"
: >"$WORK/run5.console"
# The marker reads the console as QEMU writes it; its own process group, ended by PID.
setsid bash -c 'tail -n +1 -F "$1" 2>/dev/null |
  grep --line-buffered -aoE "VMTEST synced f[0-9]+ [0-9a-f]{32}" |
  while read -r _ _ name sum; do "$2" ctl "$3" mark "$name $sum" >/dev/null; done' \
  marker "$WORK/run5.console" "$BLKDEBUGFS" "$MNT" &
MARKER_PID=$!
boot_vm "$WORK/run5.console" vmtest.mode=powercut
C5="$WORK/run5.console.txt"
SYNCED5="$WORK/run5.synced"
{ grep -aoE 'VMTEST synced f[0-9]+ [0-9a-f]{32}' "$C5" || true; } | awk '{print $3, $4}' >"$SYNCED5"
# Wait until the marker has marked every file the guest reported.
marks_recorded() { "$BLKDEBUGFS" ctl "$MNT" record status | grep -oE '[0-9]+ marks' | cut -d' ' -f1; }
for _ in $(seq 100); do
  [ "$(marks_recorded)" -ge "$(wc -l <"$SYNCED5")" ] && break
  sleep 0.1
done
MARKS5="$(marks_recorded)"
kill -- -"$MARKER_PID" 2>/dev/null || true
wait "$MARKER_PID" 2>/dev/null || true
stop_mount
show_daemon_log "$WORK/run5.log"
# The check, in the mounted crash state: marked files intact, full-size files as written.
{
  echo 'while read -r name sum; do'
  echo '  [ "$(md5sum <"$name" 2>/dev/null | cut -d" " -f1)" = "$sum" ] ||'
  echo '    { echo "$name was marked fsync'"'"'d but is missing or changed"; exit 1; }'
  echo 'done <"$BLKDEBUGFS_MARKS"'
  echo 'while read -r name sum; do'
  echo '  [ -f "$name" ] && [ "$(stat -c %s "$name")" = 65536 ] || continue'
  echo '  [ "$(md5sum <"$name" | cut -d" " -f1)" = "$sum" ] ||'
  echo '    { echo "$name is full-size but not what the guest wrote"; exit 1; }'
  echo "done <\"$SYNCED5\""
} >"$WORK/check5.sh"
# --physical-sector 4096: the disk tears whole 4 KiB blocks, as a 4Kn or 512e disk does.
# With the default 512 explore finds what such a disk would do to ext4: a torn write of
# block 0 (the mount's superblock update) leaves a 1 KiB superblock half new, whose
# checksum then fails, and the kernel refuses to mount it (e2fsck -fy mends it from a
# backup superblock).
EXPLORE5_RC=0
"$BLKDEBUGFS" explore --from "$REC5" --fs ext4 --check "sh $WORK/check5.sh" --jobs 2 \
  --seed 5 --per-epoch 8 --physical-sector 4096 --report "$WORK/run5.jsonl" \
  >"$WORK/run5.explore" 2>&1 || EXPLORE5_RC=$?
log "run 5: explore (exit $EXPLORE5_RC):"
tail -n 5 "$WORK/run5.explore" | sed 's/^/    | /'
STATES5="$(grep -c '"state"' "$WORK/run5.jsonl" 2>/dev/null || echo 0)"
check "run 5: VM powered off by itself (status 0)" test "$VM_RC" -eq 0
check "run 5: the guest fsync'd all $POWERCUT_FILES files" test "$(wc -l <"$SYNCED5")" -eq "$POWERCUT_FILES"
check "run 5: the recording holds a mark per file ($MARKS5)" test "$MARKS5" -eq "$POWERCUT_FILES"
check "run 5: explore checked crash states ($STATES5)" test "$STATES5" -gt "$POWERCUT_FILES"
check "run 5: no crash state lost a marked file, tore a file or failed e2fsck -fn" test "$EXPLORE5_RC" -eq 0

# Run 6: run 2 over NBD. No FUSE mount: `blkdebugfs serve` on a unix socket with run 2's
# rule, and QEMU's NBD client as the guest's disk.
log "run 6: blkdebugfs serve --inject-error event=read_aio,errno=EIO,sector=$RULE_SECTOR; -drive driver=nbd"
rm -f "$IMAGE"
truncate -s "${IMAGE_MIB}M" "$IMAGE"
NBD_SOCK="$WORK/nbd.sock"
"$BLKDEBUGFS" serve "$IMAGE" --listen "unix:$NBD_SOCK" --export vmtest \
  --inject-error "event=read_aio,errno=EIO,sector=$RULE_SECTOR" \
  --daemonize --pidfile "$WORK/blkdebugfs.pid" --log-file "$WORK/run6.log"
DAEMON_PID="$(cat "$WORK/blkdebugfs.pid")"
[ -S "$NBD_SOCK" ] || die "blkdebugfs serve started, but $NBD_SOCK is not a socket"
DRIVE="driver=nbd,server.type=unix,server.path=$NBD_SOCK,export=vmtest,cache=none,if=virtio" \
  boot_vm "$WORK/run6.console"
stop_serve
show_daemon_log "$WORK/run6.log"
C6="$WORK/run6.console.txt"
check "run 6: VM powered off by itself (status 0)" test "$VM_RC" -eq 0
check "run 6: guest sees /dev/vda over NBD" has "$C6" 'VMTEST disk vda [0-9]+ sectors'
check "run 6: guest write ok" has "$C6" 'VMTEST write ok'
check "run 6: guest read-back matches" has "$C6" 'VMTEST read ok'
check "run 6: guest's read of sector $SECTOR fails" has "$C6" "VMTEST sector $SECTOR read failed"
check "run 6: guest done" has "$C6" 'VMTEST done'
check "run 6: guest kernel logs '${IOERR_S//\\/}'" has "$C6" "$IOERR_S "
check "run 6: no other I/O error in the guest kernel log" no_other_io_errors "$C6"
check "run 6: blkdebugfs logged EIO injected into a read of byte $((SECTOR * 512))" \
  injected_at "$WORK/run6.log" $((SECTOR * 512))
check "run 6: blkdebugfs logged the guest's NBD connection" has "$WORK/run6.log" "NBD connection [0-9]+ from"
check "run 6: pattern is in the image file at byte $PATTERN_OFFSET" \
  cmp <(dd if="$IMAGE" bs=4096 skip=$((PATTERN_OFFSET / 4096)) \
    count=$((PATTERN_BYTES / 4096)) status=none) "$WORK/pattern.bin"

# ---------------------------------------------------------------------------------------
# 5. Summary
# ---------------------------------------------------------------------------------------
echo
echo "vm-test summary ($ACCEL, $((SECONDS - T_START)) s):"
printf '  %s\n' "${RESULTS[@]}"
if [ "$FAILED" -eq 0 ]; then
  echo "vm-test: PASS"
else
  echo "vm-test: FAIL"
fi
exit "$FAILED"
