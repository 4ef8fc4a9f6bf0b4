//! The events a rule can be armed by (QEMU's 48 `BlkdebugEvent` names, one table shared by
//! the parser, `rules` output and log lines) and the iotypes a request-checked rule filters
//! on.

use std::fmt;

/// Defines [`Event`] with its QEMU name table in one place, so the parser, `check` output and
/// log lines can never disagree on a name.
macro_rules! events {
    ($($variant:ident => $name:literal),* $(,)?) => {
        /// A blkdebug event (QEMU's `BlkdebugEvent`, all 48 names, in QEMU's order).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Event { $($variant),* }

        impl Event {
            /// Every event, in QEMU's order.
            pub const ALL: &'static [Event] = &[$(Event::$variant),*];

            /// QEMU's name of the event.
            pub fn name(self) -> &'static str {
                match self { $(Event::$variant => $name),* }
            }
        }
    };
}

events! {
    L1Update => "l1_update",
    L1GrowAllocTable => "l1_grow_alloc_table",
    L1GrowWriteTable => "l1_grow_write_table",
    L1GrowActivateTable => "l1_grow_activate_table",
    L2Load => "l2_load",
    L2Update => "l2_update",
    L2UpdateCompressed => "l2_update_compressed",
    L2AllocCowRead => "l2_alloc_cow_read",
    L2AllocWrite => "l2_alloc_write",
    ReadAio => "read_aio",
    ReadBackingAio => "read_backing_aio",
    ReadCompressed => "read_compressed",
    WriteAio => "write_aio",
    WriteCompressed => "write_compressed",
    VmstateLoad => "vmstate_load",
    VmstateSave => "vmstate_save",
    CowRead => "cow_read",
    CowWrite => "cow_write",
    ReftableLoad => "reftable_load",
    ReftableGrow => "reftable_grow",
    ReftableUpdate => "reftable_update",
    RefblockLoad => "refblock_load",
    RefblockUpdate => "refblock_update",
    RefblockUpdatePart => "refblock_update_part",
    RefblockAlloc => "refblock_alloc",
    RefblockAllocHookup => "refblock_alloc_hookup",
    RefblockAllocWrite => "refblock_alloc_write",
    RefblockAllocWriteBlocks => "refblock_alloc_write_blocks",
    RefblockAllocWriteTable => "refblock_alloc_write_table",
    RefblockAllocSwitchTable => "refblock_alloc_switch_table",
    ClusterAlloc => "cluster_alloc",
    ClusterAllocBytes => "cluster_alloc_bytes",
    ClusterFree => "cluster_free",
    FlushToOs => "flush_to_os",
    FlushToDisk => "flush_to_disk",
    PwritevRmwHead => "pwritev_rmw_head",
    PwritevRmwAfterHead => "pwritev_rmw_after_head",
    PwritevRmwTail => "pwritev_rmw_tail",
    PwritevRmwAfterTail => "pwritev_rmw_after_tail",
    Pwritev => "pwritev",
    PwritevZero => "pwritev_zero",
    PwritevDone => "pwritev_done",
    EmptyImagePrepare => "empty_image_prepare",
    L1ShrinkWriteTable => "l1_shrink_write_table",
    L1ShrinkFreeL2Clusters => "l1_shrink_free_l2_clusters",
    CorWrite => "cor_write",
    ClusterAllocSpace => "cluster_alloc_space",
    None => "none",
}

impl Event {
    /// Looks an event up by QEMU name. Dotted names of QEMU 2.x (`l1_grow.alloc_table`) are
    /// aliases of the underscore names.
    pub fn from_name(name: &str) -> Option<Event> {
        let name = name.replace('.', "_");
        Event::ALL.iter().copied().find(|e| e.name() == name)
    }

    /// Whether a FUSE view of a raw image can ever fire this event (spec §2). Rules on other
    /// events are accepted, as QEMU does, and warned about at load.
    pub fn fires_in_fuse_view(self) -> bool {
        use Event::*;
        matches!(
            self,
            None | ReadAio
                | WriteAio
                | FlushToOs
                | FlushToDisk
                | Pwritev
                | PwritevZero
                | PwritevDone
                | PwritevRmwHead
                | PwritevRmwAfterHead
                | PwritevRmwTail
                | PwritevRmwAfterTail
        )
    }

    pub(super) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The type of an I/O request, as blkdebug's `iotype` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoType {
    Read,
    Write,
    WriteZeroes,
    Discard,
    Flush,
    BlockStatus,
}

impl IoType {
    pub const ALL: [IoType; 6] = [
        IoType::Read,
        IoType::Write,
        IoType::WriteZeroes,
        IoType::Discard,
        IoType::Flush,
        IoType::BlockStatus,
    ];

    pub fn name(self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::WriteZeroes => "write-zeroes",
            IoType::Discard => "discard",
            IoType::Flush => "flush",
            IoType::BlockStatus => "block-status",
        }
    }

    pub fn from_name(name: &str) -> Option<IoType> {
        IoType::ALL.into_iter().find(|t| t.name() == name)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for IoType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of [`IoType`]s. The default is QEMU's: everything but `block-status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoTypes(pub(super) u8);

impl IoTypes {
    pub fn only(t: IoType) -> IoTypes {
        IoTypes(t.bit())
    }

    pub fn with(self, t: IoType) -> IoTypes {
        IoTypes(self.0 | t.bit())
    }

    pub fn contains(self, t: IoType) -> bool {
        self.0 & t.bit() != 0
    }
}

impl Default for IoTypes {
    fn default() -> Self {
        let all = IoType::ALL.iter().fold(0, |acc, t| acc | t.bit());
        IoTypes(all & !IoType::BlockStatus.bit())
    }
}

impl fmt::Display for IoTypes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == IoTypes::default() {
            return f.write_str("default");
        }
        let names: Vec<&str> = IoType::ALL
            .iter()
            .filter(|t| self.contains(**t))
            .map(|t| t.name())
            .collect();
        f.write_str(&names.join("|"))
    }
}
