//! Inline commands: one line of blank-separated arguments, as a person types into `telnet` or
//! `nc`. Quoting follows Redis's rules: `"…"` with `\n \r \t \b \a \\ \" \xHH` escapes, `'…'`
//! with only `\'`; a closing quote must be followed by a blank or the end of the line.

/// Splits `line` (without its line ending) into arguments; `Err(at)` gives the index of the
/// quote that is not properly closed.
pub(super) fn split_args(line: &[u8]) -> Result<Vec<Vec<u8>>, usize> {
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while i < line.len() && is_blank(line[i]) {
            i += 1;
        }
        if i == line.len() {
            return Ok(args);
        }
        let (arg, next) = match line[i] {
            b'"' => quoted(line, i, double_quote_escape)?,
            b'\'' => quoted(line, i, single_quote_escape)?,
            _ => {
                let end = line[i..]
                    .iter()
                    .position(|&b| is_blank(b))
                    .map_or(line.len(), |n| i + n);
                (line[i..end].to_vec(), end)
            }
        };
        args.push(arg);
        i = next;
    }
}

fn is_blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n' | 0x0b | 0x0c | 0)
}

/// The quote closing at `close` must end the argument.
fn closed_at(line: &[u8], open: usize, close: usize) -> Result<usize, usize> {
    match line.get(close + 1) {
        None => Ok(close + 1),
        Some(&b) if is_blank(b) => Ok(close + 1),
        Some(_) => Err(open),
    }
}

/// Decodes the escape at a backslash, if it is one: the byte it stands for and its length.
type Escape = fn(&[u8], usize) -> Option<(u8, usize)>;

/// The argument quoted from the quote at `open` to the same quote closing it; `escape(line, i)`
/// decodes the escape at the backslash `i`, if it is one: the byte it stands for and its
/// length (a backslash that starts none is itself). `Err(open)` if it is not closed.
fn quoted(line: &[u8], open: usize, escape: Escape) -> Result<(Vec<u8>, usize), usize> {
    let quote = line[open];
    let mut arg = Vec::new();
    let mut i = open + 1;
    while i < line.len() {
        let b = line[i];
        if b == quote {
            return Ok((arg, closed_at(line, open, i)?));
        }
        let (byte, len) = if b == b'\\' {
            escape(line, i).unwrap_or((b, 1))
        } else {
            (b, 1)
        };
        arg.push(byte);
        i += len;
    }
    Err(open)
}

/// Within `"…"`: `\n \r \t \b \a`, `\xHH`, and a backslash before any other byte is that byte.
fn double_quote_escape(line: &[u8], i: usize) -> Option<(u8, usize)> {
    let escaped = *line.get(i + 1)?;
    if escaped == b'x'
        && let (Some(&high), Some(&low)) = (line.get(i + 2), line.get(i + 3))
        && high.is_ascii_hexdigit()
        && low.is_ascii_hexdigit()
    {
        return Some((hex(high) << 4 | hex(low), 4));
    }
    let byte = match escaped {
        b'n' => b'\n',
        b'r' => b'\r',
        b't' => b'\t',
        b'b' => 0x08,
        b'a' => 0x07,
        other => other,
    };
    Some((byte, 2))
}

/// Within `'…'`: only `\'`.
fn single_quote_escape(line: &[u8], i: usize) -> Option<(u8, usize)> {
    (line.get(i + 1) == Some(&b'\'')).then_some((b'\'', 2))
}

fn hex(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        _ => digit - b'A' + 10,
    }
}
