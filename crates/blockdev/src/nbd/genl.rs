//! Generic netlink messages for the kernel NBD client (`<linux/nbd-netlink.h>`), built and
//! parsed in safe code; [`crate::sys::netlink`] moves the bytes.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use crate::sys::netlink::NetlinkSocket;

const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;
const NLA_HDRLEN: usize = 4;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

/// Name and version of the NBD family.
pub const NBD_FAMILY: &str = "nbd";
const NBD_GENL_VERSION: u8 = 1;
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A generic netlink request under construction.
#[derive(Debug)]
pub struct Request {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Request {
    /// A request for `family` running `cmd`, asking for an acknowledgement.
    pub fn new(family: u16, cmd: u8, version: u8, seq: u32) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        Self {
            buf,
            nests: Vec::new(),
        }
    }

    /// Appends an attribute with a raw payload.
    pub fn attr(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        let len = NLA_HDRLEN + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    pub fn u32(&mut self, kind: u16, value: u32) -> &mut Self {
        self.attr(kind, &value.to_ne_bytes())
    }

    pub fn u64(&mut self, kind: u16, value: u64) -> &mut Self {
        self.attr(kind, &value.to_ne_bytes())
    }

    /// A NUL-terminated string attribute.
    pub fn string(&mut self, kind: u16, value: &str) -> &mut Self {
        let mut payload = value.as_bytes().to_vec();
        payload.push(0);
        self.attr(kind, &payload)
    }

    /// Opens a nested attribute; close it with [`Request::end_nest`].
    pub fn begin_nest(&mut self, kind: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub fn end_nest(&mut self) -> &mut Self {
        let start = self.nests.pop().expect("end_nest matches a begin_nest");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// The finished message.
    pub fn finish(mut self) -> Vec<u8> {
        assert!(self.nests.is_empty(), "every nest is closed");
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// Splits an attribute area into `(type, payload)` pairs (type without the nested flag).
pub fn parse_attrs(mut data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut attrs = Vec::new();
    while data.len() >= NLA_HDRLEN {
        let len = usize::from(u16::from_ne_bytes([data[0], data[1]]));
        let kind = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > data.len() {
            break;
        }
        attrs.push((kind, &data[NLA_HDRLEN..len]));
        data = &data[align4(len).min(data.len())..];
    }
    attrs
}

/// A reply message: its type and the attributes after the generic netlink header.
#[derive(Debug, Clone)]
pub struct Reply {
    pub kind: u16,
    pub attrs: Vec<u8>,
}

/// Splits a received datagram into messages; an error message becomes `Err` (a zero error is
/// the acknowledgement and ends the exchange: `Ok(true)`).
pub fn parse_datagram(mut data: &[u8], seq: u32, replies: &mut Vec<Reply>) -> io::Result<bool> {
    while data.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        let msg_seq = u32::from_ne_bytes(data[8..12].try_into().expect("4 bytes"));
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "truncated netlink message",
            ));
        }
        let body = &data[NLMSG_HDRLEN..len];
        data = &data[align4(len).min(data.len())..];
        if msg_seq != seq {
            continue;
        }
        match kind {
            NLMSG_ERROR => {
                let code = body
                    .get(0..4)
                    .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "short netlink error"))?;
                return if code == 0 {
                    Ok(true)
                } else {
                    Err(io::Error::from_raw_os_error(-code))
                };
            }
            NLMSG_DONE => return Ok(true),
            _ => replies.push(Reply {
                kind,
                attrs: body.get(GENL_HDRLEN..).unwrap_or_default().to_vec(),
            }),
        }
    }
    Ok(false)
}

/// A generic netlink conversation with the kernel.
#[derive(Debug)]
pub struct Genl {
    socket: NetlinkSocket,
    seq: u32,
}

impl Genl {
    pub fn open() -> io::Result<Self> {
        Ok(Self {
            socket: NetlinkSocket::generic(Duration::from_secs(30))?,
            seq: 0,
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends `request` and collects the replies up to the acknowledgement.
    pub fn call(&mut self, request: Vec<u8>, seq: u32) -> io::Result<Vec<Reply>> {
        self.socket.send(&request)?;
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 32 << 10];
        loop {
            let got = self.socket.recv(&mut buf)?;
            if parse_datagram(&buf[..got], seq, &mut replies)? {
                return Ok(replies);
            }
        }
    }

    /// The id of the generic netlink family `name` (`ENOENT` when the kernel has none).
    pub fn family(&mut self, name: &str) -> io::Result<u16> {
        let seq = self.next_seq();
        let mut request = Request::new(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, seq);
        request.string(CTRL_ATTR_FAMILY_NAME, name);
        let replies = self.call(request.finish(), seq)?;
        replies
            .iter()
            .flat_map(|reply| parse_attrs(&reply.attrs))
            .find(|(kind, payload)| *kind == CTRL_ATTR_FAMILY_ID && payload.len() >= 2)
            .map(|(_, payload)| u16::from_ne_bytes([payload[0], payload[1]]))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "family reply without an id"))
    }
}

/// What `NBD_CMD_CONNECT` configures.
#[derive(Debug, Clone)]
pub struct Connect<'a> {
    /// A specific device, or `None` to let the kernel pick a free one (race-free).
    pub index: Option<u32>,
    pub sockets: &'a [RawFd],
    pub size: u64,
    pub block_size: u64,
    pub timeout: Duration,
    pub server_flags: u64,
}

/// The kernel NBD client's netlink interface.
#[derive(Debug)]
pub struct NbdNetlink {
    genl: Genl,
    family: u16,
}

impl NbdNetlink {
    /// Resolves the `nbd` family (`ENOENT` when the module is not loaded).
    pub fn open() -> io::Result<Self> {
        let mut genl = Genl::open()?;
        let family = genl.family(NBD_FAMILY)?;
        Ok(Self { genl, family })
    }

    /// Connects a device; returns its index.
    pub fn connect(&mut self, connect: &Connect<'_>) -> io::Result<u32> {
        let seq = self.genl.next_seq();
        let request = connect_request(self.family, seq, connect);
        let replies = self.genl.call(request, seq)?;
        replies
            .iter()
            .filter(|reply| reply.kind == self.family)
            .flat_map(|reply| parse_attrs(&reply.attrs))
            .find(|(kind, payload)| *kind == NBD_ATTR_INDEX && payload.len() >= 4)
            .map(|(_, p)| u32::from_ne_bytes([p[0], p[1], p[2], p[3]]))
            .or(connect.index)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "connect reply without an index"))
    }

    /// Disconnects device `index`.
    pub fn disconnect(&mut self, index: u32) -> io::Result<()> {
        let seq = self.genl.next_seq();
        let mut request = Request::new(self.family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, seq);
        request.u32(NBD_ATTR_INDEX, index);
        self.genl.call(request.finish(), seq).map(drop)
    }
}

/// Builds `NBD_CMD_CONNECT`.
pub fn connect_request(family: u16, seq: u32, connect: &Connect<'_>) -> Vec<u8> {
    let mut request = Request::new(family, NBD_CMD_CONNECT, NBD_GENL_VERSION, seq);
    if let Some(index) = connect.index {
        request.u32(NBD_ATTR_INDEX, index);
    }
    request
        .u64(NBD_ATTR_SIZE_BYTES, connect.size)
        .u64(NBD_ATTR_BLOCK_SIZE_BYTES, connect.block_size)
        .u64(NBD_ATTR_TIMEOUT, connect.timeout.as_secs().max(1))
        .u64(NBD_ATTR_SERVER_FLAGS, connect.server_flags)
        .begin_nest(NBD_ATTR_SOCKETS);
    for &fd in connect.sockets {
        request
            .begin_nest(NBD_SOCK_ITEM)
            .u32(NBD_SOCK_FD, fd as u32)
            .end_nest();
    }
    request.end_nest();
    request.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_request_nests_sockets() {
        let connect = Connect {
            index: None,
            sockets: &[7, 9],
            size: 1 << 20,
            block_size: 4096,
            timeout: Duration::from_secs(30),
            server_flags: 0x10d,
        };
        let msg = connect_request(0x20, 5, &connect);
        assert_eq!(
            u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize,
            msg.len()
        );
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), 0x20);
        assert_eq!(msg[16], NBD_CMD_CONNECT);
        let attrs = parse_attrs(&msg[NLMSG_HDRLEN + GENL_HDRLEN..]);
        let kinds: Vec<u16> = attrs.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            kinds,
            [
                NBD_ATTR_SIZE_BYTES,
                NBD_ATTR_BLOCK_SIZE_BYTES,
                NBD_ATTR_TIMEOUT,
                NBD_ATTR_SERVER_FLAGS,
                NBD_ATTR_SOCKETS
            ]
        );
        assert_eq!(attrs[0].1, (1u64 << 20).to_ne_bytes());
        let items = parse_attrs(attrs[4].1);
        assert_eq!(items.len(), 2);
        let fds: Vec<u32> = items
            .iter()
            .map(|(kind, payload)| {
                assert_eq!(*kind, NBD_SOCK_ITEM);
                let inner = parse_attrs(payload);
                assert_eq!(inner[0].0, NBD_SOCK_FD);
                u32::from_ne_bytes(inner[0].1.try_into().unwrap())
            })
            .collect();
        assert_eq!(fds, [7, 9]);
    }

    #[test]
    fn error_message_becomes_os_error() {
        let mut datagram = Vec::new();
        datagram.extend_from_slice(&36u32.to_ne_bytes());
        datagram.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        datagram.extend_from_slice(&0u16.to_ne_bytes());
        datagram.extend_from_slice(&3u32.to_ne_bytes());
        datagram.extend_from_slice(&0u32.to_ne_bytes());
        datagram.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        datagram.extend_from_slice(&[0u8; 16]);
        let err = parse_datagram(&datagram, 3, &mut Vec::new()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        // Other sequence numbers are not ours.
        assert!(!parse_datagram(&datagram, 4, &mut Vec::new()).unwrap());
    }
}
