//! The framing guard: reads the raw request byte stream of one client connection before the
//! HTTP library does, and refuses a request whose framing is ambiguous.
//!
//! An HTTP library resolves ambiguity silently: hyper, given both `Content-Length` and
//! `Transfer-Encoding: chunked`, drops the length and reads chunks, so the request reaches the
//! proxy looking clean. Some other server behind or in front may have read it the other way
//! (request smuggling). The guard refuses such a request before the library sees any of it.
//!
//! It follows the stream message by message: it holds back the bytes of a head until the head
//! is complete, parses it with `httparse` (the parser hyper uses), judges its framing, then
//! lets the body through while counting it (`Content-Length` bytes, or chunk by chunk with
//! `httparse::parse_chunk_size`) to know where the next head starts. Bytes are released only
//! once judged; on a refusal, nothing from the refused head on is released.
//!
//! ```text
//!  socket bytes ─► HeadGuard::feed(data, &mut out) ─► out: bytes for the HTTP library
//!                                  └─► Err(Refusal) : answer it with its status, close
//! ```

use crate::hygiene::Refusal;
use http::StatusCode;

/// Most header fields a head may have (hyper's default too).
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (size plus extensions) accepted.
pub const MAX_CHUNK_LINE: usize = 1024;

const TOO_LARGE: Refusal = Refusal {
    status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
    reason: "request header too large",
};

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Collecting a head (held back).
    Head,
    /// Inside a body of known length: this many bytes left.
    Fixed(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Inside chunk data: this many bytes left.
    ChunkData(u64),
    /// The CR (0) or LF (1) after chunk data.
    ChunkEnd(u8),
    /// Reading trailer fields after the last chunk; `true` at the start of a line.
    Trailers { line_start: bool },
    /// After a bodiless head asking to upgrade ([`is_upgrade`]): what follows is either the
    /// tunnel's first bytes or (if the upgrade is declined) nothing the connection will read;
    /// held back unjudged, at most `max_head` bytes of it.
    Upgrade,
}

/// Follows one connection's request stream; see the module documentation.
#[derive(Debug, Clone)]
pub struct HeadGuard {
    max_head: usize,
    state: State,
    /// Held-back head bytes, or the current chunk-size line, or the trailer section so far.
    pending: Vec<u8>,
    /// Heads judged so far.
    heads: u64,
}

impl HeadGuard {
    /// A guard refusing heads longer than `max_head` bytes with 431.
    #[must_use]
    pub fn new(max_head: usize) -> Self {
        Self {
            max_head,
            state: State::Head,
            pending: Vec::new(),
            heads: 0,
        }
    }

    /// Request heads judged clean so far.
    #[must_use]
    pub fn heads(&self) -> u64 {
        self.heads
    }

    /// Whether the guard is between messages or in a head (not in a body). After a refusal:
    /// whether it refused a head, which may be answered, rather than a body already on its
    /// way, which can only be cut.
    #[must_use]
    pub fn at_head(&self) -> bool {
        self.state == State::Head
    }

    /// Whether the last head asked to upgrade: the bytes after it are held back for the
    /// tunnel ([`take_held`](Self::take_held)) and the connection must not be read further.
    #[must_use]
    pub fn upgrading(&self) -> bool {
        self.state == State::Upgrade
    }

    /// The bytes held back after an upgrade head, for the tunnel.
    pub fn take_held(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }

    /// Feeds the next bytes read from the client; appends to `out` those that may go on.
    ///
    /// # Errors
    /// A [`Refusal`] (400, 405 or 431) for a head that must not be processed; `out` then holds
    /// everything released before it. The connection must not be read further.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), Refusal> {
        let mut carry = self.step(data, out)?;
        while let Some(rest) = carry {
            carry = self.step(&rest, out)?;
        }
        Ok(())
    }

    /// Consumes `data` up to the end of the next complete head; returns what follows it.
    fn step(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<Option<Vec<u8>>, Refusal> {
        while !data.is_empty() {
            match self.state {
                State::Upgrade => {
                    if self.pending.len() + data.len() > self.max_head {
                        return Err(Refusal::bad("too much data before the upgrade's answer"));
                    }
                    self.pending.extend_from_slice(data);
                    data = &[];
                }
                State::Head => {
                    if self.pending.is_empty() {
                        // Empty lines before a request line (RFC 9112 §2.2 lets a server
                        // skip them; hyper does): released, so that a head's end is only
                        // looked for after its first line has started.
                        let skip = data
                            .iter()
                            .take_while(|&&b| b == b'\r' || b == b'\n')
                            .count();
                        out.extend_from_slice(&data[..skip]);
                        data = &data[skip..];
                        if data.is_empty() {
                            continue;
                        }
                    }
                    let scan_from = self.pending.len().saturating_sub(3);
                    self.pending.extend_from_slice(data);
                    data = &[];
                    // A head must end within max_head bytes, however the bytes arrive.
                    match head_end(&self.pending[scan_from..]) {
                        Some(end) if scan_from + end > self.max_head => return Err(TOO_LARGE),
                        Some(_) => {}
                        None if self.pending.len() > self.max_head => return Err(TOO_LARGE),
                        None => continue,
                    }
                    let (len, next) = judge(&self.pending, self.max_head)?;
                    self.heads += 1;
                    let rest = self.pending.split_off(len);
                    out.append(&mut self.pending);
                    self.state = next;
                    return Ok(Some(rest));
                }
                State::Fixed(left) => {
                    let n = take(data.len(), left);
                    out.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    self.state = match left - n as u64 {
                        0 => State::Head,
                        left => State::Fixed(left),
                    };
                }
                State::ChunkData(left) => {
                    let n = take(data.len(), left);
                    out.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    self.state = match left - n as u64 {
                        0 => State::ChunkEnd(0),
                        left => State::ChunkData(left),
                    };
                }
                State::ChunkEnd(seen) => {
                    let want = if seen == 0 { b'\r' } else { b'\n' };
                    if data[0] != want {
                        return Err(Refusal::bad("chunk data not followed by CRLF"));
                    }
                    out.push(data[0]);
                    data = &data[1..];
                    self.state = if seen == 0 {
                        State::ChunkEnd(1)
                    } else {
                        State::ChunkSize
                    };
                }
                State::ChunkSize => {
                    // Up to the line's end, but never past the line limit, so that the bytes
                    // released before a refusal do not depend on read sizes.
                    let line = data
                        .iter()
                        .position(|&b| b == b'\n')
                        .map_or(data.len(), |e| e + 1);
                    let take = line.min(MAX_CHUNK_LINE - self.pending.len());
                    self.pending.extend_from_slice(&data[..take]);
                    out.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if take < line {
                        return Err(Refusal::bad("chunk-size line too long"));
                    }
                    if self.pending.last() != Some(&b'\n') {
                        continue;
                    }
                    let size = match httparse::parse_chunk_size(&self.pending) {
                        Ok(httparse::Status::Complete((_, size))) => size,
                        _ => return Err(Refusal::bad("bad chunk size")),
                    };
                    self.pending.clear();
                    self.state = if size == 0 {
                        State::Trailers { line_start: true }
                    } else {
                        State::ChunkData(size)
                    };
                }
                State::Trailers { line_start } => {
                    let b = data[0];
                    out.push(b);
                    data = &data[1..];
                    self.pending.push(b);
                    if self.pending.len() > self.max_head {
                        return Err(TOO_LARGE);
                    }
                    self.state = match b {
                        b'\n' if line_start => {
                            self.pending.clear();
                            State::Head
                        }
                        b'\n' => State::Trailers { line_start: true },
                        b'\r' if line_start => State::Trailers { line_start: true },
                        _ => State::Trailers { line_start: false },
                    };
                }
            }
        }
        Ok(None)
    }
}

/// Whether header fields (name, value) ask to switch protocols: a `Connection` field with the
/// token `upgrade` and an `Upgrade` field. The guard and [`crate::hygiene::upgrade_requested`]
/// use this one rule, so the guard holds back exactly what the gateway may tunnel.
pub fn is_upgrade<'a>(fields: impl Iterator<Item = (&'a str, &'a [u8])>) -> bool {
    let (mut connection, mut upgrade) = (false, false);
    for (name, value) in fields {
        if name.eq_ignore_ascii_case("connection") {
            connection |= value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    connection && upgrade
}

fn take(available: usize, left: u64) -> usize {
    usize::try_from(left).map_or(available, |left| available.min(left))
}

/// Where the first empty line (`\n\n` or `\n\r\n`) in `bytes` ends, if there is one.
fn head_end(bytes: &[u8]) -> Option<usize> {
    (1..bytes.len()).find_map(|i| {
        if bytes[i] != b'\n' {
            return None;
        }
        let lf_lf = bytes[i - 1] == b'\n';
        let lf_cr_lf = i >= 2 && bytes[i - 1] == b'\r' && bytes[i - 2] == b'\n';
        (lf_lf || lf_cr_lf).then_some(i + 1)
    })
}

/// Parses the complete head at the start of `bytes`; returns its length and the state its
/// framing leads to. `bytes` holds an empty line after a started request line, so a head
/// that `httparse` still finds incomplete is malformed.
fn judge(bytes: &[u8], max_head: usize) -> Result<(usize, State), Refusal> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Err(Refusal::bad("malformed request head")),
        Err(httparse::Error::TooManyHeaders) => return Err(TOO_LARGE),
        Err(_) => return Err(Refusal::bad("malformed request head")),
    };
    if len > max_head {
        return Err(TOO_LARGE);
    }
    if req.method == Some("CONNECT") {
        return Err(Refusal {
            status: StatusCode::METHOD_NOT_ALLOWED,
            reason: "CONNECT is not proxied",
        });
    }
    let mut length: Option<u64> = None;
    let mut codings: Vec<&[u8]> = Vec::new();
    for field in req.headers.iter() {
        if field.name.eq_ignore_ascii_case("content-length") {
            for item in field.value.split(|&b| b == b',') {
                let item = item.trim_ascii();
                let n = std::str::from_utf8(item)
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or(Refusal::bad("bad Content-Length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(Refusal::bad("differing Content-Length values"));
                }
                length = Some(n);
            }
        } else if field.name.eq_ignore_ascii_case("transfer-encoding") {
            codings.extend(field.value.split(|&b| b == b',').map(<[u8]>::trim_ascii));
        }
    }
    if codings.is_empty() {
        let next = match length {
            None | Some(0) if is_upgrade(req.headers.iter().map(|f| (f.name, f.value))) => {
                State::Upgrade
            }
            None | Some(0) => State::Head,
            Some(n) => State::Fixed(n),
        };
        return Ok((len, next));
    }
    if length.is_some() {
        return Err(Refusal::bad("both Content-Length and Transfer-Encoding"));
    }
    if req.version != Some(1) {
        return Err(Refusal::bad("Transfer-Encoding in HTTP/1.0"));
    }
    match codings.last() {
        Some(last) if last.eq_ignore_ascii_case(b"chunked") => Ok((len, State::ChunkSize)),
        _ => Err(Refusal::bad("Transfer-Encoding not ending in chunked")),
    }
}
