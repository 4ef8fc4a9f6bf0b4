//! Errno names: one table shared by the config parser, `check` output, log lines and the
//! demo, so `ENOSPC` and `28` always mean the same thing.

/// Every Linux errno name with its number (aliases such as `EWOULDBLOCK` included after the
/// canonical name, so number-to-name finds the canonical one first).
macro_rules! errno_table {
    ($($name:ident),* $(,)?) => {
        const TABLE: &[(&str, i32)] = &[$((stringify!($name), libc::$name)),*];
    };
}

errno_table!(
    EPERM,
    ENOENT,
    ESRCH,
    EINTR,
    EIO,
    ENXIO,
    E2BIG,
    ENOEXEC,
    EBADF,
    ECHILD,
    EAGAIN,
    ENOMEM,
    EACCES,
    EFAULT,
    ENOTBLK,
    EBUSY,
    EEXIST,
    EXDEV,
    ENODEV,
    ENOTDIR,
    EISDIR,
    EINVAL,
    ENFILE,
    EMFILE,
    ENOTTY,
    ETXTBSY,
    EFBIG,
    ENOSPC,
    ESPIPE,
    EROFS,
    EMLINK,
    EPIPE,
    EDOM,
    ERANGE,
    EDEADLK,
    ENAMETOOLONG,
    ENOLCK,
    ENOSYS,
    ENOTEMPTY,
    ELOOP,
    ENOMSG,
    EIDRM,
    ECHRNG,
    EL2NSYNC,
    EL3HLT,
    EL3RST,
    ELNRNG,
    EUNATCH,
    ENOCSI,
    EL2HLT,
    EBADE,
    EBADR,
    EXFULL,
    ENOANO,
    EBADRQC,
    EBADSLT,
    EBFONT,
    ENOSTR,
    ENODATA,
    ETIME,
    ENOSR,
    ENONET,
    ENOPKG,
    EREMOTE,
    ENOLINK,
    EADV,
    ESRMNT,
    ECOMM,
    EPROTO,
    EMULTIHOP,
    EDOTDOT,
    EBADMSG,
    EOVERFLOW,
    ENOTUNIQ,
    EBADFD,
    EREMCHG,
    ELIBACC,
    ELIBBAD,
    ELIBSCN,
    ELIBMAX,
    ELIBEXEC,
    EILSEQ,
    ERESTART,
    ESTRPIPE,
    EUSERS,
    ENOTSOCK,
    EDESTADDRREQ,
    EMSGSIZE,
    EPROTOTYPE,
    ENOPROTOOPT,
    EPROTONOSUPPORT,
    ESOCKTNOSUPPORT,
    EOPNOTSUPP,
    EPFNOSUPPORT,
    EAFNOSUPPORT,
    EADDRINUSE,
    EADDRNOTAVAIL,
    ENETDOWN,
    ENETUNREACH,
    ENETRESET,
    ECONNABORTED,
    ECONNRESET,
    ENOBUFS,
    EISCONN,
    ENOTCONN,
    ESHUTDOWN,
    ETOOMANYREFS,
    ETIMEDOUT,
    ECONNREFUSED,
    EHOSTDOWN,
    EHOSTUNREACH,
    EALREADY,
    EINPROGRESS,
    ESTALE,
    EUCLEAN,
    ENOTNAM,
    ENAVAIL,
    EISNAM,
    EREMOTEIO,
    EDQUOT,
    ENOMEDIUM,
    EMEDIUMTYPE,
    ECANCELED,
    ENOKEY,
    EKEYEXPIRED,
    EKEYREVOKED,
    EKEYREJECTED,
    EOWNERDEAD,
    ENOTRECOVERABLE,
    ERFKILL,
    EHWPOISON,
    EWOULDBLOCK,
    EDEADLOCK,
    ENOTSUP,
);

/// The largest errno a rule may inject. QEMU lets 512–999 through, which leaves FUSE clients
/// hanging in D state (the kernel's internal restart codes); we refuse them at load.
pub const MAX_INJECTABLE: i32 = 511;

/// The number for a symbolic name (`"ENOSPC"` → 28), case-sensitive like the C names.
pub fn from_name(name: &str) -> Option<i32> {
    TABLE.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// The canonical name of a number, if it has one.
pub fn name(errno: i32) -> Option<&'static str> {
    TABLE.iter().find(|(_, v)| *v == errno).map(|(n, _)| *n)
}

/// `ENOSPC (28)`, `0 (no error)` or `300` for messages and tables.
pub fn describe(errno: i32) -> String {
    match (errno, name(errno)) {
        (0, _) => "0 (no error)".to_string(),
        (_, Some(n)) => format!("{n} ({errno})"),
        (_, None) => errno.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_round_trip() {
        assert_eq!(from_name("ENOSPC"), Some(28));
        assert_eq!(from_name("EIO"), Some(5));
        assert_eq!(from_name("enospc"), None);
        assert_eq!(name(libc::EAGAIN), Some("EAGAIN"));
        assert_eq!(name(libc::EOPNOTSUPP), Some("EOPNOTSUPP"));
        assert_eq!(describe(28), "ENOSPC (28)");
        assert_eq!(describe(0), "0 (no error)");
        assert_eq!(describe(300), "300");
    }
}
