//! NBD wire constants and small value types (fixed newstyle handshake, simple, structured and
//! extended headers). Numbers follow the protocol document `doc/proto.md` of the NBD project; every
//! value on the wire is big-endian.

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second 8 bytes the server sends, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended request (after `NBD_OPT_EXTENDED_HEADERS`).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of an extended reply chunk (after `NBD_OPT_EXTENDED_HEADERS`).
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Bytes of the server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Bytes of an option header: IHAVEOPT, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes of an option reply header: magic, option, reply type, length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Bytes of a request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_HEADER_LEN: usize = 16;
/// Bytes of a structured reply chunk header.
pub const STRUCTURED_REPLY_HEADER_LEN: usize = 20;
/// Bytes of an extended request header and of an extended reply chunk header.
pub const EXTENDED_HEADER_LEN: usize = 32;
/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES` was negotiated.
pub const EXPORT_NAME_PADDING: usize = 124;
/// Longest string (export name, description, message, context name) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Default maximum payload of one request (the protocol's interoperable maximum, 32 MiB).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;
/// Default TCP port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Handshake flags (server, 16 bits).
pub mod handshake_flags {
    /// The server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server can skip the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (32 bits).
pub mod client_flags {
    /// The client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// The client wants no zero padding after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every client flag this implementation understands.
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Transmission flags (16 bits), sent with the export size.
pub mod transmission_flags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    /// `NBD_CMD_BLOCK_STATUS` takes a payload of context ids (extended headers only; this
    /// server does not offer it).
    pub const BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;
}

/// Option numbers (client to server during the handshake).
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    /// Bit set in every error reply type.
    pub const ERROR_BIT: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERROR_BIT | 1;
    pub const ERR_POLICY: u32 = ERROR_BIT | 2;
    pub const ERR_INVALID: u32 = ERROR_BIT | 3;
    pub const ERR_PLATFORM: u32 = ERROR_BIT | 4;
    pub const ERR_TLS_REQD: u32 = ERROR_BIT | 5;
    pub const ERR_UNKNOWN: u32 = ERROR_BIT | 6;
    pub const ERR_SHUTDOWN: u32 = ERROR_BIT | 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERROR_BIT | 8;
    pub const ERR_TOO_BIG: u32 = ERROR_BIT | 9;
    pub const ERR_EXT_HEADER_REQD: u32 = ERROR_BIT | 10;

    /// A readable name for a reply type (for error messages).
    pub fn name(reply: u32) -> &'static str {
        match reply {
            ACK => "ACK",
            SERVER => "SERVER",
            INFO => "INFO",
            META_CONTEXT => "META_CONTEXT",
            ERR_UNSUP => "ERR_UNSUP (option not supported)",
            ERR_POLICY => "ERR_POLICY (refused by server policy)",
            ERR_INVALID => "ERR_INVALID (invalid option)",
            ERR_PLATFORM => "ERR_PLATFORM (not supported on this platform)",
            ERR_TLS_REQD => "ERR_TLS_REQD (TLS required)",
            ERR_UNKNOWN => "ERR_UNKNOWN (no such export)",
            ERR_SHUTDOWN => "ERR_SHUTDOWN (server shutting down)",
            ERR_BLOCK_SIZE_REQD => "ERR_BLOCK_SIZE_REQD (block size negotiation required)",
            ERR_TOO_BIG => "ERR_TOO_BIG (request too big)",
            ERR_EXT_HEADER_REQD => "ERR_EXT_HEADER_REQD (extended headers negotiated or required)",
            _ if reply & ERROR_BIT != 0 => "unknown error",
            _ => "unknown reply",
        }
    }
}

/// Information types of `NBD_REP_INFO` (and requests in `NBD_OPT_INFO`/`NBD_OPT_GO`).
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types (transmission requests).
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (16 bits, per request).
pub mod cmd_flags {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
    /// With extended headers: the length is a payload that follows the header (required for
    /// `NBD_CMD_WRITE`); without it, the length is an effect length and nothing follows.
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply flags.
pub mod reply_flags {
    /// Last chunk of a reply.
    pub const DONE: u16 = 1 << 0;
}

/// Structured reply chunk types.
pub mod reply_type {
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    /// 32-bit descriptors (without extended headers).
    pub const BLOCK_STATUS: u16 = 5;
    /// 64-bit descriptors with a descriptor count (extended headers only).
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// Bit set in every error chunk type.
    pub const ERROR_BIT: u16 = 1 << 15;
    pub const ERROR: u16 = ERROR_BIT | 1;
    pub const ERROR_OFFSET: u16 = ERROR_BIT | 2;
}

/// `base:allocation` status flags.
pub mod state {
    pub const HOLE: u32 = 1 << 0;
    pub const ZERO: u32 = 1 << 1;
}

/// The one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Context id the server assigns to `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// NBD error values (a fixed subset of Linux errno numbers).
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;

    /// Linux errno values that the protocol asks to report as another NBD error.
    const LINUX_EFBIG: i32 = 27;
    const LINUX_EROFS: i32 = 30;
    const LINUX_EDQUOT: i32 = 122;
    const LINUX_EOPNOTSUPP: i32 = 95;

    /// Maps an operating-system errno to the NBD error the protocol allows. `NBD_ENOTSUP` is
    /// reserved for `NBD_CMD_FLAG_FAST_ZERO` (which this server does not offer), so a backend's
    /// `EOPNOTSUPP` becomes `NBD_EINVAL`, as the protocol asks for unsupported requests.
    pub fn from_os(os: i32) -> u32 {
        match os {
            1 => EPERM,
            LINUX_EROFS => EPERM,
            12 => ENOMEM,
            22 | LINUX_EOPNOTSUPP => EINVAL,
            28 | LINUX_EFBIG | LINUX_EDQUOT => ENOSPC,
            75 => EOVERFLOW,
            108 => ESHUTDOWN,
            _ => EIO,
        }
    }

    /// A readable name for an NBD error value.
    pub fn name(error: u32) -> &'static str {
        match error {
            EPERM => "EPERM (operation not permitted)",
            EIO => "EIO (input/output error)",
            ENOMEM => "ENOMEM (out of memory)",
            EINVAL => "EINVAL (invalid argument)",
            ENOSPC => "ENOSPC (no space left)",
            EOVERFLOW => "EOVERFLOW (value too large)",
            ENOTSUP => "ENOTSUP (operation not supported)",
            ESHUTDOWN => "ESHUTDOWN (server shutting down)",
            _ => "unknown error",
        }
    }
}

/// A readable name for a command (for logs and errors).
pub fn command_name(command: u16) -> &'static str {
    match command {
        cmd::READ => "READ",
        cmd::WRITE => "WRITE",
        cmd::DISC => "DISC",
        cmd::FLUSH => "FLUSH",
        cmd::TRIM => "TRIM",
        cmd::CACHE => "CACHE",
        cmd::WRITE_ZEROES => "WRITE_ZEROES",
        cmd::BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown command",
    }
}

/// A readable name for an option (for logs and errors).
pub fn option_name(option: u32) -> &'static str {
    match option {
        opt::EXPORT_NAME => "EXPORT_NAME",
        opt::ABORT => "ABORT",
        opt::LIST => "LIST",
        opt::STARTTLS => "STARTTLS",
        opt::INFO => "INFO",
        opt::GO => "GO",
        opt::STRUCTURED_REPLY => "STRUCTURED_REPLY",
        opt::LIST_META_CONTEXT => "LIST_META_CONTEXT",
        opt::SET_META_CONTEXT => "SET_META_CONTEXT",
        opt::EXTENDED_HEADERS => "EXTENDED_HEADERS",
        _ => "unknown option",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_map_to_the_errors_the_protocol_allows() {
        // ENOTSUP is only for fast zeroing, which this server does not offer.
        assert_eq!(errno::from_os(95), errno::EINVAL);
        assert_eq!(errno::from_os(30), errno::EPERM);
        assert_eq!(errno::from_os(122), errno::ENOSPC);
        assert_eq!(errno::from_os(108), errno::ESHUTDOWN);
        assert_eq!(errno::from_os(2), errno::EIO);
    }
}
