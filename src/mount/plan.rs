//! Plans: which events fire, which checks run and which I/O happens, in order, for each client
//! operation (spec §2). A plan is a pure function of the operation and the [`Limits`]; the
//! executor in `mount/executor.rs` walks it. Keeping the sequence as data makes the event order
//! unit-testable without FUSE and lets a request stop between steps and continue later.
//!
//! The sequences model QEMU's stack `export → raw → blkdebug → file`: the raw node fires
//! `read_aio`/`write_aio` once per `max-transfer` chunk; the blkdebug node pads to `align`
//! (firing the `pwritev_rmw_*` events around a checked read-modify-write read), fires
//! `pwritev`/`pwritev_zero`/`pwritev_done`, and checks each driver call.
//!
//! One deliberate simplification: for a padded write we check the read-modify-write read and
//! the padded write exactly as QEMU does, but we only write the client's bytes. The bytes
//! QEMU reads and writes back around them are unchanged, so the image is the same, and two
//! concurrent unaligned writes sharing an `align` block can never undo each other.

use crate::config::Limits;
use crate::engine::{Event, IoType};

/// QEMU's `MAX_BOUNCE_BUFFER`: the largest zero-filled fallback write.
const MAX_BOUNCE_BUFFER: u64 = 32768 * 512;

/// One step of a plan. Offsets are image bytes; `at` fields are offsets into the client's
/// buffer (the read reply or the write payload).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Event(Event),
    /// Check a request against the active list; on failure remember the errno and continue
    /// at step `on_fail`.
    Check {
        iotype: IoType,
        offset: u64,
        len: u64,
        on_fail: usize,
    },
    /// The checked read of a read-modify-write. QEMU ignores its failure: the rest of the
    /// padding read is skipped (continue at `on_fail`) but the write goes on and succeeds.
    RmwCheck {
        offset: u64,
        len: u64,
        on_fail: usize,
    },
    /// The check of a write-zeroes request. An injected ENOTSUP makes QEMU fall back to a
    /// write of zeroes (continue at `on_enotsup`, when the caller allows fallback); other
    /// errors continue at `on_fail`.
    ZeroesCheck {
        offset: u64,
        len: u64,
        on_fail: usize,
        on_enotsup: Option<usize>,
    },
    /// Continue at step `to`.
    Jump {
        to: usize,
    },
    /// Read image bytes into the reply buffer at `at`.
    Read {
        offset: u64,
        len: u64,
        at: usize,
    },
    /// Write the payload's bytes at `at` to the image.
    Write {
        offset: u64,
        len: u64,
        at: usize,
    },
    /// Zero a range (punch a hole when `punch`, so sparse images stay sparse).
    Zero {
        offset: u64,
        len: u64,
        punch: bool,
    },
    /// A write request of the raw node finished (successful or not): a later flush must reach
    /// the disk. QEMU counts failed writes too.
    RawWritten,
    /// A write request of the blkdebug node finished (successful or not).
    NodeWritten,
    /// Flush gate of the raw node: skip to `skip_to` unless written since the last successful
    /// flush; remember the generation so a successful flush can record it.
    RawFlushGate {
        skip_to: usize,
    },
    /// Flush gate of the blkdebug node (decides whether the flush is checked and performed).
    NodeFlushGate {
        skip_to: usize,
    },
    /// fdatasync the image; on success record the generations captured by the gates.
    Flush,
    /// Remember `errno` as the request's failure (a condition QEMU reports without a rule,
    /// e.g. ENOTSUP) and go on with the next step.
    FailWith {
        errno: i32,
    },
    /// If a failure is remembered, continue at step `to` (QEMU's loops stop at the first
    /// failed piece).
    StopIfFailed {
        to: usize,
    },
    /// The end: reply with the remembered errno, or success.
    Done,
}

/// A client operation as the image sees it (after clamping to the image size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read {
        offset: u64,
        len: u64,
    },
    Write {
        offset: u64,
        len: u64,
    },
    /// fallocate ZERO_RANGE (`punch: false`) or PUNCH_HOLE (`punch: true`).
    Zero {
        offset: u64,
        len: u64,
        punch: bool,
    },
    Flush,
    /// lseek SEEK_DATA / SEEK_HOLE from `offset`; `len` is the rest of the image.
    BlockStatus {
        offset: u64,
        len: u64,
    },
}

impl Op {
    /// The name used in log lines.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Read { .. } => "read",
            Op::Write { .. } => "write",
            Op::Zero { punch: false, .. } => "zero-range",
            Op::Zero { punch: true, .. } => "punch-hole",
            Op::Flush => "flush",
            Op::BlockStatus { .. } => "lseek",
        }
    }

    /// The operation as `stats` counts it (`write-zeroes` for both zeroing calls).
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Zero { .. } => "write-zeroes",
            other => other.name(),
        }
    }

    /// The bytes the operation covers, `(offset, len)`; a flush has none, and a seek the rest
    /// of the image from its offset.
    pub fn range(&self) -> (u64, u64) {
        match *self {
            Op::Read { offset, len }
            | Op::Write { offset, len }
            | Op::Zero { offset, len, .. }
            | Op::BlockStatus { offset, len } => (offset, len),
            Op::Flush => (0, 0),
        }
    }
}

/// A plan under construction. Jump targets to the end are patched when it is finished.
struct Builder {
    steps: Vec<Step>,
    limits: Limits,
}

/// Placeholder target meaning "the final Done step".
const TO_END: usize = usize::MAX;

impl Builder {
    fn push(&mut self, s: Step) {
        self.steps.push(s);
    }

    fn align(&self) -> u64 {
        self.limits.request_alignment()
    }

    /// The blkdebug node's max transfer, or "unlimited".
    fn max_transfer(&self) -> u64 {
        match self.limits.max_transfer {
            0 => i32::MAX as u64 & !(self.align() - 1),
            n => n,
        }
    }

    /// Splits `[offset, offset+len)` into max-transfer chunks, counted from the start of the
    /// request (QEMU's `bdrv_aligned_preadv/pwritev` loops).
    fn chunks(&self, offset: u64, len: u64) -> Chunks {
        Chunks {
            at: offset,
            end: offset + len,
            max: self.max_transfer(),
        }
    }

    /// A checked read at the blkdebug node of the padded range `[ps, pe)`; only the part
    /// inside the client's `[client, client+client_len)` is copied out.
    fn node_read(&mut self, ps: u64, pe: u64, client: Option<(u64, u64, usize)>) {
        for (off, len) in self.chunks(ps, pe - ps) {
            self.push(Step::Check {
                iotype: IoType::Read,
                offset: off,
                len,
                on_fail: TO_END,
            });
            if let Some((c_off, c_len, c_at)) = client {
                let s = off.max(c_off);
                let e = (off + len).min(c_off + c_len);
                if s < e {
                    self.push(Step::Read {
                        offset: s,
                        len: e - s,
                        at: c_at + (s - c_off) as usize,
                    });
                }
            }
        }
    }

    /// `bdrv_aligned_pwritev` of the blkdebug node for an aligned range whose client part is
    /// `[c_off, c_off+c_len)` at payload offset `c_at`, or zeroes when `zero_fill`.
    fn node_pwritev(&mut self, ps: u64, pe: u64, c_off: u64, c_len: u64, data: WriteData) {
        self.push(Step::Event(Event::Pwritev));
        let done_at = self.steps.len() + 2 * self.chunks(ps, pe - ps).count();
        for (off, len) in self.chunks(ps, pe - ps) {
            self.push(Step::Check {
                iotype: IoType::Write,
                offset: off,
                len,
                on_fail: done_at,
            });
            let s = off.max(c_off);
            let e = (off + len).min(c_off + c_len);
            let io = match data {
                WriteData::Payload(c_at) if s < e => Step::Write {
                    offset: s,
                    len: e - s,
                    at: c_at + (s - c_off) as usize,
                },
                WriteData::Zeroes if s < e => Step::Zero {
                    offset: s,
                    len: e - s,
                    punch: false,
                },
                // Nothing of the client's inside this chunk: keep the step count fixed.
                _ => Step::Zero {
                    offset: s,
                    len: 0,
                    punch: false,
                },
            };
            self.push(io);
        }
        debug_assert_eq!(self.steps.len(), done_at);
        self.push(Step::Event(Event::PwritevDone));
        self.push(Step::NodeWritten);
    }

    /// QEMU's read-modify-write read (`bdrv_padding_rmw_read`) for the padded range
    /// `[ps, pe)` with `head`/`tail` padding bytes. QEMU ignores a failure of this read: it
    /// only cuts the padding read short (no `after_*` event, no tail read).
    fn rmw_read(&mut self, ps: u64, pe: u64, head: u64, tail: u64) {
        let start = self.steps.len();
        let align = self.align();
        let sum = pe - ps;
        let buf_len = if sum > align && head > 0 && tail > 0 {
            2 * align
        } else {
            align
        };
        let merge = sum == buf_len;
        if head > 0 || merge {
            let n = if merge { buf_len } else { align };
            if head > 0 {
                self.push(Step::Event(Event::PwritevRmwHead));
            }
            if merge && tail > 0 {
                self.push(Step::Event(Event::PwritevRmwTail));
            }
            self.rmw_checks(ps, ps + n);
            if head > 0 {
                self.push(Step::Event(Event::PwritevRmwAfterHead));
            }
            if merge && tail > 0 {
                self.push(Step::Event(Event::PwritevRmwAfterTail));
            }
        }
        if tail > 0 && !merge {
            self.push(Step::Event(Event::PwritevRmwTail));
            self.rmw_checks(pe - align, pe);
            self.push(Step::Event(Event::PwritevRmwAfterTail));
        }
        let after = self.steps.len();
        for s in &mut self.steps[start..] {
            if let Step::RmwCheck { on_fail, .. } = s {
                *on_fail = after;
            }
        }
    }

    /// The checks of one padding read, split by max-transfer like any node read.
    fn rmw_checks(&mut self, start: u64, end: u64) {
        for (offset, len) in self.chunks(start, end - start) {
            self.push(Step::RmwCheck {
                offset,
                len,
                on_fail: TO_END,
            });
        }
    }

    /// `bdrv_co_do_pwrite_zeroes` of the blkdebug node: split by the write-zeroes alignment
    /// and limit; pieces smaller than the alignment fall back to checked writes of zeroes
    /// (or fail with ENOTSUP when the caller forbids fallback, as punch-hole does).
    fn node_write_zeroes(&mut self, offset: u64, len: u64, punch: bool) {
        let l = self.limits;
        let alignment = l.opt_write_zero.max(self.align());
        let mwz_raw = if l.max_write_zero == 0 {
            i32::MAX as u64
        } else {
            l.max_write_zero
        };
        let max_write_zeroes = mwz_raw / alignment * alignment;
        let max_transfer = match l.max_transfer {
            0 => MAX_BOUNCE_BUFFER,
            n => n.min(MAX_BOUNCE_BUFFER),
        };
        let mut head = offset % alignment;
        let tail = (offset + len) % alignment;
        let (mut off, mut bytes) = (offset, len);
        while bytes > 0 {
            let mut num = bytes;
            if head != 0 {
                num = bytes.min(max_transfer).min(alignment - head);
                head = (head + num) % alignment;
            } else if tail != 0 && num > alignment {
                num -= tail;
            }
            num = num.min(max_write_zeroes);
            if num < alignment {
                if punch {
                    self.push(Step::FailWith {
                        errno: libc::EOPNOTSUPP,
                    });
                    return;
                }
                num = num.min(max_transfer);
                self.push(Step::Check {
                    iotype: IoType::Write,
                    offset: off,
                    len: num,
                    on_fail: TO_END,
                });
                self.push(Step::Zero {
                    offset: off,
                    len: num,
                    punch: false,
                });
            } else {
                // [i] check, [i+1] zero, [i+2] jump past the fallback, [i+3..] fallback.
                let i = self.steps.len();
                let fallback = (!punch).then(|| num.min(max_transfer));
                self.push(Step::ZeroesCheck {
                    offset: off,
                    len: num,
                    on_fail: TO_END,
                    on_enotsup: fallback.map(|_| i + 3),
                });
                self.push(Step::Zero {
                    offset: off,
                    len: num,
                    punch,
                });
                self.push(Step::Jump {
                    to: i + if fallback.is_some() { 5 } else { 3 },
                });
                if let Some(n) = fallback {
                    // QEMU falls back to writing zeroes, checked as a write. (For pieces over
                    // 16 MiB QEMU would re-ask write-zeroes per bounce buffer; we do not.)
                    self.push(Step::Check {
                        iotype: IoType::Write,
                        offset: off,
                        len: n,
                        on_fail: TO_END,
                    });
                    self.push(Step::Zero {
                        offset: off,
                        len: num,
                        punch: false,
                    });
                }
            }
            off += num;
            bytes -= num;
        }
    }

    /// Ends a raw-node write request that began at step `start`: appends `RawWritten` and
    /// points the request's "to the end" failures at it, because QEMU's raw node counts the
    /// write however it ended.
    fn raw_written_since(&mut self, start: usize) {
        let at = self.steps.len();
        for s in &mut self.steps[start..] {
            if let Step::Check { on_fail: to, .. }
            | Step::StopIfFailed { to }
            | Step::ZeroesCheck { on_fail: to, .. } = s
                && *to == TO_END
            {
                *to = at;
            }
        }
        self.push(Step::RawWritten);
    }

    /// Finishes the plan: appends `Done` and points every "to the end" jump at it. Jumps that
    /// must still run `pwritev_done` were given explicit targets.
    fn finish(mut self) -> Vec<Step> {
        let end = self.steps.len();
        self.steps.push(Step::Done);
        for s in &mut self.steps {
            match s {
                Step::Check { on_fail: to, .. }
                | Step::StopIfFailed { to }
                | Step::ZeroesCheck { on_fail: to, .. }
                    if *to == TO_END =>
                {
                    *to = end
                }
                Step::RawFlushGate { skip_to } | Step::NodeFlushGate { skip_to }
                    if *skip_to == TO_END =>
                {
                    *skip_to = end
                }
                _ => {}
            }
        }
        self.steps
    }
}

#[derive(Clone, Copy)]
enum WriteData {
    Payload(usize),
    Zeroes,
}

/// Padding of `[offset, offset+len)` to `align`: `(padded start, padded end, head, tail)`.
fn pad(offset: u64, len: u64, align: u64) -> (u64, u64, u64, u64) {
    let head = offset % align;
    let end = offset + len;
    let tail = match end % align {
        0 => 0,
        t => align - t,
    };
    (offset - head, end + tail, head, tail)
}

/// The pieces of `max` bytes at most that a range is cut into, in order. An iterator, not a
/// list: a plan is built for every request, and allocations there are contended between
/// the threads that serve requests.
struct Chunks {
    at: u64,
    end: u64,
    max: u64,
}

impl Iterator for Chunks {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        if self.at >= self.end {
            return None;
        }
        let n = (self.end - self.at).min(self.max);
        let chunk = (self.at, n);
        self.at += n;
        Some(chunk)
    }
}

/// Builds the plan for one client operation.
pub fn plan(op: Op, limits: Limits) -> Vec<Step> {
    let mut b = Builder {
        // Room for a plain read or write's steps (about a dozen) without growing.
        steps: Vec::with_capacity(16),
        limits,
    };
    let align = b.align();
    match op {
        Op::Read { offset, len } => {
            for (c_off, c_len) in b.chunks(offset, len) {
                b.push(Step::Event(Event::ReadAio));
                let (ps, pe, _, _) = pad(c_off, c_len, align);
                b.node_read(ps, pe, Some((c_off, c_len, (c_off - offset) as usize)));
            }
        }
        Op::Write { offset, len } => {
            // Each raw chunk is its own write at the blkdebug node; a failure ends the loop.
            for (c_off, c_len) in b.chunks(offset, len) {
                let start = b.steps.len();
                b.push(Step::Event(Event::WriteAio));
                let (ps, pe, head, tail) = pad(c_off, c_len, align);
                if head > 0 || tail > 0 {
                    b.rmw_read(ps, pe, head, tail);
                }
                let data = WriteData::Payload((c_off - offset) as usize);
                b.node_pwritev(ps, pe, c_off, c_len, data);
                b.raw_written_since(start);
                b.push(Step::StopIfFailed { to: TO_END });
            }
        }
        Op::Zero { offset, len, punch } => {
            zero_plan(&mut b, offset, len, punch);
            b.raw_written_since(0);
        }
        Op::Flush => {
            b.push(Step::Event(Event::FlushToOs));
            // Raw node: flush_to_disk fires only if written since the last good flush.
            b.push(Step::RawFlushGate {
                skip_to: b.steps.len() + 2,
            });
            b.push(Step::Event(Event::FlushToDisk));
            // The blkdebug node: the flush is checked and performed only if it was written.
            b.push(Step::NodeFlushGate { skip_to: TO_END });
            b.push(Step::Check {
                iotype: IoType::Flush,
                offset: 0,
                len: 0,
                on_fail: TO_END,
            });
            b.push(Step::Flush);
        }
        Op::BlockStatus { offset, len } => {
            // The block layer aligns the query down to the request alignment.
            let start = offset - offset % align;
            b.push(Step::Check {
                iotype: IoType::BlockStatus,
                offset: start,
                len: len + (offset - start),
                on_fail: TO_END,
            });
        }
    }
    b.finish()
}

/// `bdrv_co_do_zero_pwritev` of the blkdebug node: partial blocks at the edges are
/// read-modify-written as ordinary writes, the aligned middle is a write-zeroes request.
fn zero_plan(b: &mut Builder, offset: u64, len: u64, punch: bool) {
    let align = b.align();
    if punch && (!offset.is_multiple_of(align) || !len.is_multiple_of(align)) {
        // A request that may not fall back (punch-hole) cannot be padded: QEMU refuses it
        // with ENOTSUP before any event.
        b.push(Step::FailWith {
            errno: libc::EOPNOTSUPP,
        });
        return;
    }
    let (ps, pe, head, tail) = pad(offset, len, align);
    let (mut off, mut bytes) = (offset, len);
    if head > 0 || tail > 0 {
        b.rmw_read(ps, pe, head, tail);
        let sum = pe - ps;
        let buf_len = if sum > align && head > 0 && tail > 0 {
            2 * align
        } else {
            align
        };
        let merge = sum == buf_len;
        if head > 0 || merge {
            let write_bytes = if merge { buf_len } else { align };
            b.node_pwritev(ps, ps + write_bytes, offset, len, WriteData::Zeroes);
            if merge {
                return;
            }
            b.push(Step::StopIfFailed { to: TO_END });
            let consumed = write_bytes - head;
            off += consumed;
            bytes -= consumed;
        }
    }
    if bytes >= align {
        let aligned = bytes / align * align;
        b.push(Step::Event(Event::PwritevZero));
        let start = b.steps.len();
        b.node_write_zeroes(off, aligned, punch);
        // A failed write-zeroes piece still ends with pwritev_done.
        let done_at = b.steps.len();
        for s in &mut b.steps[start..] {
            if let Step::Check { on_fail, .. } | Step::ZeroesCheck { on_fail, .. } = s {
                *on_fail = done_at;
            }
        }
        b.push(Step::Event(Event::PwritevDone));
        b.push(Step::NodeWritten);
        b.push(Step::StopIfFailed { to: TO_END });
        off += aligned;
        bytes -= aligned;
    }
    if bytes > 0 {
        b.node_pwritev(off, off + align, off, bytes, WriteData::Zeroes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Event::*;

    fn events(op: Op, limits: Limits) -> Vec<Event> {
        plan(op, limits)
            .into_iter()
            .filter_map(|s| match s {
                Step::Event(e) => Some(e),
                _ => Option::None,
            })
            .collect()
    }

    fn checks(op: Op, limits: Limits) -> Vec<(IoType, u64, u64)> {
        plan(op, limits)
            .into_iter()
            .filter_map(|s| match s {
                Step::Check {
                    iotype,
                    offset,
                    len,
                    ..
                } => Some((iotype, offset, len)),
                Step::RmwCheck { offset, len, .. } => Some((IoType::Read, offset, len)),
                Step::ZeroesCheck { offset, len, .. } => Some((IoType::WriteZeroes, offset, len)),
                _ => Option::None,
            })
            .collect()
    }

    fn aligned(align: u64) -> Limits {
        Limits {
            align,
            ..Limits::default()
        }
    }

    #[test]
    fn read_fires_read_aio_then_checks() {
        let op = Op::Read {
            offset: 4096,
            len: 4096,
        };
        assert_eq!(events(op, Limits::default()), vec![ReadAio]);
        assert_eq!(
            plan(op, Limits::default()),
            vec![
                Step::Event(ReadAio),
                Step::Check {
                    iotype: IoType::Read,
                    offset: 4096,
                    len: 4096,
                    on_fail: 3
                },
                Step::Read {
                    offset: 4096,
                    len: 4096,
                    at: 0
                },
                Step::Done,
            ]
        );
    }

    #[test]
    fn write_fires_write_aio_pwritev_check_pwritev_done() {
        let op = Op::Write {
            offset: 0,
            len: 512,
        };
        let p = plan(op, Limits::default());
        assert_eq!(
            p,
            vec![
                Step::Event(WriteAio),
                Step::Event(Pwritev),
                // A failed check still runs pwritev_done.
                Step::Check {
                    iotype: IoType::Write,
                    offset: 0,
                    len: 512,
                    on_fail: 4
                },
                Step::Write {
                    offset: 0,
                    len: 512,
                    at: 0
                },
                Step::Event(PwritevDone),
                Step::NodeWritten,
                Step::RawWritten,
                Step::StopIfFailed { to: 8 },
                Step::Done,
            ]
        );
    }

    #[test]
    fn max_transfer_splits_with_events_per_chunk() {
        let l = Limits {
            max_transfer: 4096,
            ..Limits::default()
        };
        let read = Op::Read {
            offset: 0,
            len: 12288,
        };
        assert_eq!(events(read, l), vec![ReadAio, ReadAio, ReadAio]);
        assert_eq!(
            checks(read, l),
            vec![
                (IoType::Read, 0, 4096),
                (IoType::Read, 4096, 4096),
                (IoType::Read, 8192, 4096)
            ]
        );
        let write = Op::Write {
            offset: 0,
            len: 8192,
        };
        assert_eq!(
            events(write, l),
            vec![
                WriteAio,
                Pwritev,
                PwritevDone,
                WriteAio,
                Pwritev,
                PwritevDone
            ]
        );
    }

    #[test]
    fn unaligned_write_read_modify_writes_in_qemu_order() {
        let l = aligned(4096);
        // Head only.
        let head = Op::Write {
            offset: 512,
            len: 8192 - 512,
        };
        assert_eq!(
            events(head, l),
            vec![
                WriteAio,
                PwritevRmwHead,
                PwritevRmwAfterHead,
                Pwritev,
                PwritevDone
            ]
        );
        assert_eq!(
            checks(head, l),
            vec![(IoType::Read, 0, 4096), (IoType::Write, 0, 8192)]
        );
        // Head and tail in one block: one merged read.
        let one = Op::Write {
            offset: 512,
            len: 512,
        };
        assert_eq!(
            events(one, l),
            vec![
                WriteAio,
                PwritevRmwHead,
                PwritevRmwTail,
                PwritevRmwAfterHead,
                PwritevRmwAfterTail,
                Pwritev,
                PwritevDone
            ]
        );
        assert_eq!(checks(one, l)[0], (IoType::Read, 0, 4096));
        // Head and tail in two adjacent blocks: still one merged read of both.
        let two = Op::Write {
            offset: 512,
            len: 4096,
        };
        assert_eq!(checks(two, l)[0], (IoType::Read, 0, 8192));
        // Separated by whole blocks: two reads, head then tail.
        let far = Op::Write {
            offset: 512,
            len: 8192,
        };
        assert_eq!(
            events(far, l),
            vec![
                WriteAio,
                PwritevRmwHead,
                PwritevRmwAfterHead,
                PwritevRmwTail,
                PwritevRmwAfterTail,
                Pwritev,
                PwritevDone
            ]
        );
        assert_eq!(
            checks(far, l),
            vec![
                (IoType::Read, 0, 4096),
                (IoType::Read, 8192, 4096),
                (IoType::Write, 0, 12288)
            ]
        );
    }

    #[test]
    fn zero_range_is_write_zeroes_with_pwritev_zero() {
        let op = Op::Zero {
            offset: 0,
            len: 8192,
            punch: true,
        };
        assert_eq!(
            events(op, Limits::default()),
            vec![PwritevZero, PwritevDone]
        );
        assert_eq!(
            checks(op, Limits::default()),
            vec![(IoType::WriteZeroes, 0, 8192)]
        );
    }

    #[test]
    fn small_zero_writes_fall_back_to_checked_writes() {
        let l = Limits {
            opt_write_zero: 8192,
            ..Limits::default()
        };
        let op = Op::Zero {
            offset: 4096,
            len: 12288,
            punch: false,
        };
        // The last check is the fallback taken only when a rule injects ENOTSUP.
        assert_eq!(
            checks(op, l),
            vec![
                (IoType::Write, 4096, 4096),
                (IoType::WriteZeroes, 8192, 8192),
                (IoType::Write, 8192, 8192)
            ]
        );
        let punch = Op::Zero {
            offset: 4096,
            len: 12288,
            punch: true,
        };
        assert!(plan(punch, l).contains(&Step::FailWith {
            errno: libc::EOPNOTSUPP
        }));
    }

    #[test]
    fn unaligned_punch_is_refused_before_any_event() {
        let op = Op::Zero {
            offset: 100,
            len: 200,
            punch: true,
        };
        assert_eq!(events(op, aligned(4096)), vec![]);
        assert_eq!(
            plan(op, aligned(4096))[0],
            Step::FailWith {
                errno: libc::EOPNOTSUPP
            }
        );
    }

    #[test]
    fn a_failed_rmw_read_skips_the_rest_of_the_padding_read_only() {
        let far = plan(
            Op::Write {
                offset: 512,
                len: 8192,
            },
            aligned(4096),
        );
        let Step::RmwCheck { on_fail, .. } = far[2] else {
            panic!("{far:?}")
        };
        // Straight to pwritev: no after_head, no tail read; the write goes on.
        assert_eq!(far[on_fail], Step::Event(Pwritev));
    }

    #[test]
    fn flush_fires_flush_to_os_then_gated_flush_to_disk() {
        assert_eq!(
            events(Op::Flush, Limits::default()),
            vec![FlushToOs, FlushToDisk]
        );
        assert_eq!(
            checks(Op::Flush, Limits::default()),
            vec![(IoType::Flush, 0, 0)]
        );
    }

    #[test]
    fn seek_checks_block_status_without_events() {
        let op = Op::BlockStatus {
            offset: 512,
            len: 1024,
        };
        assert_eq!(events(op, Limits::default()), vec![]);
        assert_eq!(
            checks(op, Limits::default()),
            vec![(IoType::BlockStatus, 512, 1024)]
        );
    }

    /// The read buffer is not zeroed (it comes from a pool), so every successful read plan
    /// must write each byte of the client's range exactly once.
    #[test]
    fn read_plans_cover_every_client_byte_exactly_once() {
        for (align, max_transfer) in [(1, 0), (512, 0), (4096, 0), (512, 4096), (4096, 8192)] {
            let limits = Limits {
                align,
                max_transfer,
                ..Limits::default()
            };
            for offset in [0u64, 1, 511, 512, 4095, 4097, 10_000] {
                for len in [1u64, 100, 512, 4096, 5000, 20_000] {
                    let mut seen = vec![0u8; len as usize];
                    for step in plan(Op::Read { offset, len }, limits) {
                        if let Step::Read {
                            offset: o,
                            len: l,
                            at,
                        } = step
                        {
                            assert_eq!(o - offset, at as u64);
                            seen[at..at + l as usize].iter_mut().for_each(|c| *c += 1);
                        }
                    }
                    assert!(
                        seen.iter().all(|&c| c == 1),
                        "align {align} max_transfer {max_transfer}: read {offset}+{len}"
                    );
                }
            }
        }
    }
}
