//! Recognises images that are not raw disks. blkdebugfs serves the image file's bytes as
//! they are (QEMU's `raw` over `file`), so on a qcow2 or other formatted image a rule's
//! `sector` names a byte of the *file*, not of the guest's disk. A mount of such an image
//! is allowed (testing how a program handles a corrupted qcow2 file is a use), but warned
//! about, with the way to translate offsets.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Format names and the magic bytes at the start of the file that identify them.
const MAGICS: &[(&str, &[u8])] = &[
    ("qcow2", b"QFI\xfb"),
    ("QED", b"QED\0"),
    ("VMDK", b"KDMV"),
    ("VMDK (descriptor)", b"# Disk DescriptorFile"),
    ("VHDX", b"vhdxfile"),
    ("LUKS", b"LUKS\xba\xbe"),
    ("VHD (fixed or dynamic)", b"conectix"),
];

/// The VDI signature sits at byte 64.
const VDI_SIGNATURE: (u64, [u8; 4]) = (64, [0x7f, 0x10, 0xda, 0xbe]);

/// The format `head` (the image's first bytes) and `tail` (its last 512) reveal, if any.
fn detect(head: &[u8], tail: &[u8]) -> Option<&'static str> {
    if let Some((name, _)) = MAGICS.iter().find(|(_, magic)| head.starts_with(magic)) {
        return Some(name);
    }
    let (at, sig) = VDI_SIGNATURE;
    if head.get(at as usize..at as usize + 4) == Some(&sig[..]) {
        return Some("VDI");
    }
    // A fixed VHD has its footer (cookie "conectix") in the last 512 bytes only.
    if tail.starts_with(b"conectix") {
        return Some("VHD (fixed)");
    }
    None
}

/// A warning for a formatted (non-raw) image, or `None` for anything else.
pub fn sniff(image: &File, path: &Path) -> Option<String> {
    let mut head = [0u8; 512];
    let n = image.read_at(&mut head, 0).ok()?;
    let size = image.metadata().ok()?.len();
    let mut tail = [0u8; 512];
    let t = if size >= 512 {
        image.read_at(&mut tail, size - 512).unwrap_or(0)
    } else {
        0
    };
    let format = detect(&head[..n], &tail[..t])?;
    Some(format!(
        "{} looks like a {format} image, but it is served as raw bytes: a rule's sector is a \
         sector of the file, not of the guest's disk (`qemu-img map --output=json {}` maps \
         guest offsets to file offsets)",
        path.display(),
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_told_by_their_magic_and_raw_is_not_warned_about() {
        assert_eq!(detect(b"QFI\xfb\0\0\0\x03", b""), Some("qcow2"));
        assert_eq!(detect(b"KDMV....", b""), Some("VMDK"));
        let mut vdi = vec![0u8; 128];
        vdi[64..68].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        assert_eq!(detect(&vdi, b""), Some("VDI"));
        assert_eq!(detect(&[0u8; 512], b"conectix\0\0"), Some("VHD (fixed)"));
        // A raw disk with an MBR, and an empty one.
        let mut mbr = vec![0u8; 512];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        assert_eq!(detect(&mbr, &[0u8; 512]), None);
        assert_eq!(detect(b"", b""), None);
    }
}
