//! RESP2, Redis's wire protocol: what lets `redis-cli`, `redis-benchmark` and every Redis client
//! library talk to a raftkv node.
//!
//! * [`Decoder`] turns a byte stream into commands (arrays of bulk strings, or inline lines as
//!   typed into a telnet session), however the stream is split into reads. It is bounded by
//!   [`Limits`]: a length prefix above a limit is a [`ParseError`], and no buffer is ever sized
//!   from a length the peer claims — only from bytes the peer actually sent.
//! * [`Reply`] encodes what a server answers (simple string, error, integer, bulk, null, array);
//!   [`decode_reply`] reads one back (for clients and tests), under the same limits.
//! * [`command`] maps a decoded command to the typed [`Command`] the KV service executes, with
//!   Redis's error wording for unknown commands and wrong arity.
//! * [`server`] is the TCP front end: one event loop for every connection, handing pipelined
//!   commands to a [`server::CommandHandler`] in batches (from the loop itself when the
//!   handler never blocks, the replies coming back through a completion queue; else through
//!   a pool of worker threads).
//!
//! A [`ParseError`] means the stream is broken: the server answers
//! [`ParseError::reply`] and closes the connection, as Redis does.

pub mod auth;
pub mod command;
mod inline;
pub mod server;
pub mod session;

use std::fmt;

pub use command::{Command, CommandError};

/// How much a peer may make a [`Decoder`] hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest bulk string (a key or a value), in bytes.
    pub max_bulk_bytes: usize,
    /// Most elements in one command array.
    pub max_array_len: usize,
    /// Largest whole command (headers, bulk strings and their CRLFs), in bytes.
    pub max_frame_bytes: usize,
    /// Longest inline command line, in bytes (Redis's `PROTO_INLINE_MAX_SIZE` is 64 KiB).
    pub max_inline_bytes: usize,
    /// Deepest nesting of arrays in a reply ([`decode_reply`] only; commands are flat).
    pub max_reply_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk_bytes: 1 << 20,
            max_array_len: 1 << 16,
            max_frame_bytes: 4 << 20,
            max_inline_bytes: 64 << 10,
            max_reply_depth: 8,
        }
    }
}

/// A decoder's empty buffer keeps up to this much capacity for the next command.
const RETAINED_BUFFER_BYTES: usize = 64 << 10;

/// The longest `*<count>` or `$<len>` header line (without its type byte and CRLF) we wait for;
/// a 64-bit count needs at most 20 characters.
const MAX_HEADER_DIGITS: usize = 32;

/// Why a stream cannot be parsed. `offset` is the position in the whole stream (bytes fed to
/// the decoder since it was created) of the byte at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// A `*` header that is not a decimal integer (or a too long one).
    InvalidMultibulkLength { offset: u64 },
    /// A `$` header that is not a non-negative decimal integer (or a too long one).
    InvalidBulkLength { offset: u64 },
    /// A command array longer than [`Limits::max_array_len`].
    ArrayTooLong { len: i64, max: usize, offset: u64 },
    /// A bulk string longer than [`Limits::max_bulk_bytes`].
    BulkTooLong { len: i64, max: usize, offset: u64 },
    /// A command whose headers and bulk strings add up to more than [`Limits::max_frame_bytes`].
    FrameTooLarge { size: u64, max: usize, offset: u64 },
    /// An inline line longer than [`Limits::max_inline_bytes`] without a newline.
    InlineTooLong { max: usize, offset: u64 },
    /// An element of a command array that is not a bulk string.
    ExpectedDollar { got: u8, offset: u64 },
    /// A bulk string or header not followed by CRLF.
    MissingCrlf { offset: u64 },
    /// An inline line with a quote that is not closed (or closed and not followed by a space).
    UnbalancedQuotes { offset: u64 },
    /// A reply that does not start with one of `+ - : $ *`.
    UnknownReplyType { got: u8, offset: u64 },
    /// A reply nested deeper than [`Limits::max_reply_depth`].
    ReplyTooDeep { max: usize, offset: u64 },
}

impl ParseError {
    /// Where in the stream the fault is.
    pub fn offset(&self) -> u64 {
        match *self {
            ParseError::InvalidMultibulkLength { offset }
            | ParseError::InvalidBulkLength { offset }
            | ParseError::ArrayTooLong { offset, .. }
            | ParseError::BulkTooLong { offset, .. }
            | ParseError::FrameTooLarge { offset, .. }
            | ParseError::InlineTooLong { offset, .. }
            | ParseError::ExpectedDollar { offset, .. }
            | ParseError::MissingCrlf { offset }
            | ParseError::UnbalancedQuotes { offset }
            | ParseError::UnknownReplyType { offset, .. }
            | ParseError::ReplyTooDeep { offset, .. } => offset,
        }
    }

    /// Redis's wording of the fault, without the offset.
    fn message(&self) -> String {
        match self {
            ParseError::InvalidMultibulkLength { .. } => "invalid multibulk length".into(),
            ParseError::InvalidBulkLength { .. } => "invalid bulk length".into(),
            ParseError::ArrayTooLong { len, max, .. } => {
                format!("invalid multibulk length ({len} elements, at most {max})")
            }
            ParseError::BulkTooLong { len, max, .. } => {
                format!("invalid bulk length ({len} bytes, at most {max})")
            }
            ParseError::FrameTooLarge { size, max, .. } => {
                format!("command too large ({size} bytes or more, at most {max})")
            }
            ParseError::InlineTooLong { .. } => "too big inline request".into(),
            ParseError::ExpectedDollar { got, .. } => {
                format!("expected '$', got '{}'", char::from(*got).escape_default())
            }
            ParseError::MissingCrlf { .. } => "expected CRLF".into(),
            ParseError::UnbalancedQuotes { .. } => "unbalanced quotes in request".into(),
            ParseError::UnknownReplyType { got, .. } => {
                format!("unknown reply type '{}'", char::from(*got).escape_default())
            }
            ParseError::ReplyTooDeep { max, .. } => {
                format!("reply nested deeper than {max} arrays")
            }
        }
    }

    /// The error reply a server sends before closing the connection.
    pub fn reply(&self) -> Reply {
        Reply::Error(format!("ERR Protocol error: {}", self.message()))
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RESP protocol error at byte {}: {}",
            self.offset(),
            self.message()
        )
    }
}

impl std::error::Error for ParseError {}

/// A command being read: its array header was seen, some elements are still to come.
#[derive(Debug)]
struct PartialArray {
    remaining: usize,
    args: Vec<Vec<u8>>,
    /// Bytes of this command consumed so far (header and complete elements).
    frame_bytes: usize,
}

/// An incremental command parser: [`feed`](Self::feed) it bytes as they arrive, then take
/// commands with [`next_command`](Self::next_command) until it returns `Ok(None)`.
///
/// After an error the decoder is poisoned: every later call returns the same error.
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`.
    pos: usize,
    /// Stream offset of `buf[pos]`.
    consumed: u64,
    partial: Option<PartialArray>,
    poisoned: Option<ParseError>,
}

/// What reading a `*` or `$` header found.
enum Header {
    /// Not all of it has arrived.
    Incomplete,
    /// The value and the header's length including the type byte and CRLF.
    Value(i64, usize),
}

impl Decoder {
    pub fn new(limits: Limits) -> Decoder {
        Decoder {
            limits,
            buf: Vec::new(),
            pos: 0,
            consumed: 0,
            partial: None,
            poisoned: None,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Changes the limits for what is read from now on (a command already being read keeps
    /// the size it was admitted with, and is checked against the new limits as it goes on).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Whether part of a command has arrived and the rest has not.
    pub fn mid_command(&self) -> bool {
        self.partial.is_some() || self.buffered() > 0
    }

    /// Memory this decoder holds for input: its buffer and the arguments of a command being
    /// read.
    pub fn held_bytes(&self) -> usize {
        self.buf.capacity() + self.partial.as_ref().map_or(0, |p| p.frame_bytes)
    }

    /// Gives back the memory of a buffer that is empty now (it grew for a large command).
    pub fn release_if_empty(&mut self) {
        if self.pos == self.buf.len() && self.buf.capacity() > RETAINED_BUFFER_BYTES {
            self.buf = Vec::new();
            self.pos = 0;
        }
    }

    /// Appends bytes read from the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos >= 4096 && self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes fed and not yet consumed by a complete command (at most one command's worth
    /// plus what followed it in the same reads, since every limit is checked as soon as the
    /// bytes that break it arrive).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next complete command, `Ok(None)` if more bytes are needed. Empty commands (`*0`,
    /// `*-1`, blank inline lines) are skipped, as Redis does.
    pub fn next_command(&mut self) -> Result<Option<Vec<Vec<u8>>>, ParseError> {
        if let Some(e) = &self.poisoned {
            return Err(e.clone());
        }
        let result = self.parse();
        if let Err(e) = &result {
            self.poisoned = Some(e.clone());
        }
        result
    }

    fn offset_of(&self, index: usize) -> u64 {
        self.consumed + (index - self.pos) as u64
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
        self.consumed += n as u64;
    }

    fn parse(&mut self) -> Result<Option<Vec<Vec<u8>>>, ParseError> {
        loop {
            if self.partial.is_none() {
                let Some(&first) = self.buf.get(self.pos) else {
                    return Ok(None);
                };
                if first != b'*' {
                    match self.parse_inline()? {
                        None => return Ok(None),
                        Some(args) if args.is_empty() => continue,
                        Some(args) => return Ok(Some(args)),
                    }
                }
                let (count, header_len) =
                    match read_header(&self.buf[self.pos..], self.consumed, true)? {
                        Header::Incomplete => return Ok(None),
                        Header::Value(count, len) => (count, len),
                    };
                if count > self.limits.max_array_len as i64 {
                    return Err(ParseError::ArrayTooLong {
                        len: count,
                        max: self.limits.max_array_len,
                        offset: self.consumed,
                    });
                }
                self.consume(header_len);
                if count <= 0 {
                    continue;
                }
                self.partial = Some(PartialArray {
                    remaining: count as usize,
                    // Never sized from the claimed count beyond a small start.
                    args: Vec::with_capacity((count as usize).min(16)),
                    frame_bytes: header_len,
                });
            }
            return self.parse_elements();
        }
    }

    /// Reads the elements of the current array that have fully arrived; the command when all
    /// have.
    fn parse_elements(&mut self) -> Result<Option<Vec<Vec<u8>>>, ParseError> {
        loop {
            let partial = self.partial.as_ref().expect("an array is being read");
            if partial.remaining == 0 {
                let done = self.partial.take().expect("an array is being read");
                return Ok(Some(done.args));
            }
            let frame_bytes = partial.frame_bytes;
            let Some(&first) = self.buf.get(self.pos) else {
                return Ok(None);
            };
            if first != b'$' {
                return Err(ParseError::ExpectedDollar {
                    got: first,
                    offset: self.consumed,
                });
            }
            let (len, header_len) = match read_header(&self.buf[self.pos..], self.consumed, false)?
            {
                Header::Incomplete => return Ok(None),
                Header::Value(len, header_len) => (len, header_len),
            };
            if len > self.limits.max_bulk_bytes as i64 {
                return Err(ParseError::BulkTooLong {
                    len,
                    max: self.limits.max_bulk_bytes,
                    offset: self.consumed,
                });
            }
            let len = len as usize;
            let element_bytes = header_len + len + 2;
            if frame_bytes + element_bytes > self.limits.max_frame_bytes {
                return Err(ParseError::FrameTooLarge {
                    size: (frame_bytes + element_bytes) as u64,
                    max: self.limits.max_frame_bytes,
                    offset: self.consumed,
                });
            }
            let body_start = self.pos + header_len;
            let body_end = body_start + len;
            if self.buf.len() < body_end + 2 {
                return Ok(None);
            }
            if &self.buf[body_end..body_end + 2] != b"\r\n" {
                return Err(ParseError::MissingCrlf {
                    offset: self.offset_of(body_end),
                });
            }
            let arg = self.buf[body_start..body_end].to_vec();
            self.consume(element_bytes);
            let partial = self.partial.as_mut().expect("an array is being read");
            partial.args.push(arg);
            partial.remaining -= 1;
            partial.frame_bytes += element_bytes;
        }
    }

    /// An inline command: one line, arguments separated by blanks, optionally quoted.
    fn parse_inline(&mut self) -> Result<Option<Vec<Vec<u8>>>, ParseError> {
        let rest = &self.buf[self.pos..];
        let Some(newline) = rest.iter().position(|&b| b == b'\n') else {
            if rest.len() > self.limits.max_inline_bytes {
                return Err(ParseError::InlineTooLong {
                    max: self.limits.max_inline_bytes,
                    offset: self.consumed,
                });
            }
            return Ok(None);
        };
        if newline > self.limits.max_inline_bytes {
            return Err(ParseError::InlineTooLong {
                max: self.limits.max_inline_bytes,
                offset: self.consumed,
            });
        }
        let mut line = &rest[..newline];
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        let args = inline::split_args(line).map_err(|at| ParseError::UnbalancedQuotes {
            offset: self.consumed + at as u64,
        })?;
        self.consume(newline + 1);
        Ok(Some(args))
    }
}

/// Reads a `*<n>\r\n` or `$<n>\r\n` header at the start of `bytes` (whose first byte is the
/// type byte, at stream offset `offset`).
fn read_header(bytes: &[u8], offset: u64, multibulk: bool) -> Result<Header, ParseError> {
    let invalid = || {
        if multibulk {
            ParseError::InvalidMultibulkLength { offset }
        } else {
            ParseError::InvalidBulkLength { offset }
        }
    };
    let digits_area = &bytes[1..bytes.len().min(1 + MAX_HEADER_DIGITS + 1)];
    let Some(cr) = digits_area.iter().position(|&b| b == b'\r') else {
        if digits_area.len() > MAX_HEADER_DIGITS {
            return Err(invalid());
        }
        return Ok(Header::Incomplete);
    };
    let Some(&after_cr) = bytes.get(1 + cr + 1) else {
        return Ok(Header::Incomplete);
    };
    if after_cr != b'\n' {
        return Err(ParseError::MissingCrlf {
            offset: offset + 1 + cr as u64,
        });
    }
    let value = parse_decimal(&digits_area[..cr]).ok_or_else(invalid)?;
    if !multibulk && value < 0 {
        return Err(invalid());
    }
    Ok(Header::Value(value, 1 + cr + 2))
}

/// A strict decimal `i64`: optional `-`, digits, no `+`, no leading zeros, no overflow.
pub(crate) fn parse_decimal(digits: &[u8]) -> Option<i64> {
    let (negative, body) = match digits.split_first() {
        Some((b'-', body)) => (true, body),
        _ => (false, digits),
    };
    if body.is_empty() || (body.len() > 1 && body[0] == b'0') || (negative && body == b"0") {
        return None;
    }
    let mut value: i64 = 0;
    for &b in body {
        if !b.is_ascii_digit() {
            return None;
        }
        let digit = i64::from(b - b'0');
        value = if negative {
            value.checked_mul(10)?.checked_sub(digit)?
        } else {
            value.checked_mul(10)?.checked_add(digit)?
        };
    }
    Some(value)
}

/// A server's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`. CR and LF in the text are sent as spaces.
    Simple(String),
    /// `-ERR …`: the first word is the error code. CR and LF are sent as spaces.
    Error(String),
    /// `:42`.
    Integer(i64),
    /// `$3\r\nfoo`.
    Bulk(Vec<u8>),
    /// `$-1`: the nil of RESP2 (a missing key).
    Null,
    /// `*2\r\n…`.
    Array(Vec<Reply>),
    /// A map: `%2\r\n` then key, value, key, value in RESP3; a flat array of keys and values
    /// in RESP2 (how Redis answers `HELLO` and `CONFIG GET` to each).
    Map(Vec<(Reply, Reply)>),
    /// Text meant for a person (`INFO`, `CLIENT INFO`): a verbatim string `=` with the
    /// `txt` format in RESP3, a bulk string in RESP2.
    Verbatim(String),
}

/// The protocol a connection speaks, chosen by `HELLO` (RESP2 until then).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Resp2,
    Resp3,
}

impl Protocol {
    /// The number `HELLO` takes and answers.
    pub fn version(self) -> i64 {
        match self {
            Protocol::Resp2 => 2,
            Protocol::Resp3 => 3,
        }
    }
}

impl Reply {
    pub fn ok() -> Reply {
        Reply::Simple("OK".into())
    }

    /// Appends the RESP2 wire form to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.encode_as(Protocol::Resp2, out);
    }

    /// Appends the wire form in `protocol` to `out`.
    pub fn encode_as(&self, protocol: Protocol, out: &mut Vec<u8>) {
        let resp3 = protocol == Protocol::Resp3;
        match self {
            Reply::Simple(text) => encode_line(out, b'+', text),
            Reply::Error(text) => encode_line(out, b'-', text),
            Reply::Integer(n) => {
                out.push(b':');
                out.extend_from_slice(n.to_string().as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Reply::Bulk(bytes) => {
                out.push(b'$');
                out.extend_from_slice(bytes.len().to_string().as_bytes());
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(bytes);
                out.extend_from_slice(b"\r\n");
            }
            Reply::Null if resp3 => out.extend_from_slice(b"_\r\n"),
            Reply::Null => out.extend_from_slice(b"$-1\r\n"),
            Reply::Array(items) => {
                encode_header(out, b'*', items.len());
                for item in items {
                    item.encode_as(protocol, out);
                }
            }
            Reply::Map(pairs) => {
                if resp3 {
                    encode_header(out, b'%', pairs.len());
                } else {
                    encode_header(out, b'*', pairs.len() * 2);
                }
                for (key, value) in pairs {
                    key.encode_as(protocol, out);
                    value.encode_as(protocol, out);
                }
            }
            Reply::Verbatim(text) if resp3 => {
                encode_header(out, b'=', text.len() + 4);
                out.extend_from_slice(b"txt:");
                out.extend_from_slice(text.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Reply::Verbatim(text) => Reply::Bulk(text.as_bytes().to_vec()).encode_as(protocol, out),
        }
    }

    /// The wire form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

pub(crate) fn encode_header(out: &mut Vec<u8>, kind: u8, len: usize) {
    out.push(kind);
    out.extend_from_slice(len.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn encode_line(out: &mut Vec<u8>, kind: u8, text: &str) {
    out.push(kind);
    out.extend(
        text.bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
}

/// The wire form of a command as clients send it: an array of bulk strings.
pub fn encode_command<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out = Vec::new();
    Reply::Array(
        args.iter()
            .map(|a| Reply::Bulk(a.as_ref().to_vec()))
            .collect(),
    )
    .encode(&mut out);
    out
}

/// Reads one reply from the start of `bytes`: the reply and the bytes it took, `Ok(None)` if
/// it has not fully arrived. Bulk strings and arrays obey `limits` (arrays by
/// `max_array_len`, nesting by `max_reply_depth`); offsets in errors are within `bytes`.
pub fn decode_reply(bytes: &[u8], limits: &Limits) -> Result<Option<(Reply, usize)>, ParseError> {
    decode_reply_at(bytes, 0, limits, 0)
}

/// The element count and header length of the map or array reply at `start`, `None` while
/// incomplete; one nested `depth + 1` levels deep is refused past the limit.
fn aggregate_header(
    bytes: &[u8],
    start: usize,
    limits: &Limits,
    depth: usize,
) -> Result<Option<(i64, usize)>, ParseError> {
    let offset = start as u64;
    if depth >= limits.max_reply_depth {
        return Err(ParseError::ReplyTooDeep {
            max: limits.max_reply_depth,
            offset,
        });
    }
    Ok(match read_header(&bytes[start..], offset, true)? {
        Header::Incomplete => None,
        Header::Value(count, header_len) => Some((count, header_len)),
    })
}

fn decode_reply_at(
    bytes: &[u8],
    start: usize,
    limits: &Limits,
    depth: usize,
) -> Result<Option<(Reply, usize)>, ParseError> {
    let offset = start as u64;
    let Some(&kind) = bytes.get(start) else {
        return Ok(None);
    };
    match kind {
        b'+' | b'-' | b':' => {
            let rest = &bytes[start + 1..];
            let Some(cr) = rest.iter().position(|&b| b == b'\r') else {
                if rest.len() > limits.max_inline_bytes {
                    return Err(ParseError::InlineTooLong {
                        max: limits.max_inline_bytes,
                        offset,
                    });
                }
                return Ok(None);
            };
            let Some(&lf) = rest.get(cr + 1) else {
                return Ok(None);
            };
            if lf != b'\n' {
                return Err(ParseError::MissingCrlf {
                    offset: offset + 1 + cr as u64,
                });
            }
            let line = &rest[..cr];
            let end = start + 1 + cr + 2;
            let reply = match kind {
                b'+' => Reply::Simple(String::from_utf8_lossy(line).into_owned()),
                b'-' => Reply::Error(String::from_utf8_lossy(line).into_owned()),
                _ => Reply::Integer(
                    parse_decimal(line).ok_or(ParseError::InvalidBulkLength { offset })?,
                ),
            };
            Ok(Some((reply, end - start)))
        }
        b'_' => match bytes.get(start + 1..start + 3) {
            None => Ok(None),
            Some(b"\r\n") => Ok(Some((Reply::Null, 3))),
            Some(_) => Err(ParseError::MissingCrlf { offset: offset + 1 }),
        },
        b'=' => match decode_reply_at(&[b"$", &bytes[start + 1..]].concat(), 0, limits, depth)? {
            None => Ok(None),
            Some((Reply::Bulk(body), used)) => {
                // A verbatim string is `<3-letter format>:` then the text.
                let text = body
                    .get(4..)
                    .ok_or(ParseError::InvalidBulkLength { offset })?;
                Ok(Some((
                    Reply::Verbatim(String::from_utf8_lossy(text).into_owned()),
                    used,
                )))
            }
            Some(_) => Err(ParseError::InvalidBulkLength { offset }),
        },
        b'%' => {
            let Some((count, header_len)) = aggregate_header(bytes, start, limits, depth)? else {
                return Ok(None);
            };
            if count < 0 || count > limits.max_array_len as i64 / 2 {
                return Err(ParseError::InvalidMultibulkLength { offset });
            }
            let mut at = start + header_len;
            let mut pairs = Vec::with_capacity((count as usize).min(16));
            for _ in 0..count {
                let Some((key, used)) = decode_reply_at(bytes, at, limits, depth + 1)? else {
                    return Ok(None);
                };
                at += used;
                let Some((value, used)) = decode_reply_at(bytes, at, limits, depth + 1)? else {
                    return Ok(None);
                };
                at += used;
                pairs.push((key, value));
            }
            Ok(Some((Reply::Map(pairs), at - start)))
        }
        b'$' => {
            let (len, header_len) = match read_header(&bytes[start..], offset, false) {
                Ok(Header::Incomplete) => return Ok(None),
                Ok(Header::Value(len, header_len)) => (len, header_len),
                // `$-1` is the nil reply.
                Err(ParseError::InvalidBulkLength { .. })
                    if bytes[start..].starts_with(b"$-1\r\n") =>
                {
                    return Ok(Some((Reply::Null, 5)));
                }
                Err(e) => return Err(e),
            };
            if len > limits.max_bulk_bytes as i64 {
                return Err(ParseError::BulkTooLong {
                    len,
                    max: limits.max_bulk_bytes,
                    offset,
                });
            }
            let body_start = start + header_len;
            let body_end = body_start + len as usize;
            if bytes.len() < body_end + 2 {
                return Ok(None);
            }
            if &bytes[body_end..body_end + 2] != b"\r\n" {
                return Err(ParseError::MissingCrlf {
                    offset: body_end as u64,
                });
            }
            Ok(Some((
                Reply::Bulk(bytes[body_start..body_end].to_vec()),
                body_end + 2 - start,
            )))
        }
        b'*' => {
            let Some((count, header_len)) = aggregate_header(bytes, start, limits, depth)? else {
                return Ok(None);
            };
            if count == -1 {
                return Ok(Some((Reply::Null, header_len)));
            }
            if count < 0 {
                return Err(ParseError::InvalidMultibulkLength { offset });
            }
            if count > limits.max_array_len as i64 {
                return Err(ParseError::ArrayTooLong {
                    len: count,
                    max: limits.max_array_len,
                    offset,
                });
            }
            let mut at = start + header_len;
            let mut items = Vec::with_capacity((count as usize).min(16));
            for _ in 0..count {
                match decode_reply_at(bytes, at, limits, depth + 1)? {
                    None => return Ok(None),
                    Some((item, used)) => {
                        items.push(item);
                        at += used;
                    }
                }
            }
            Ok(Some((Reply::Array(items), at - start)))
        }
        other => Err(ParseError::UnknownReplyType { got: other, offset }),
    }
}

#[cfg(test)]
mod tests;
