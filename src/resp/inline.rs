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
            b'"' => double_quoted(line, i)?,
            b'\'' => single_quoted(line, i)?,
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

fn double_quoted(line: &[u8], open: usize) -> Result<(Vec<u8>, usize), usize> {
    let mut arg = Vec::new();
    let mut i = open + 1;
    while i < line.len() {
        match line[i] {
            b'"' => return Ok((arg, closed_at(line, open, i)?)),
            b'\\' if i + 1 < line.len() => {
                let escaped = line[i + 1];
                if escaped == b'x'
                    && i + 3 < line.len()
                    && line[i + 2].is_ascii_hexdigit()
                    && line[i + 3].is_ascii_hexdigit()
                {
                    arg.push(hex(line[i + 2]) << 4 | hex(line[i + 3]));
                    i += 4;
                    continue;
                }
                arg.push(match escaped {
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    b'b' => 0x08,
                    b'a' => 0x07,
                    other => other,
                });
                i += 2;
            }
            b => {
                arg.push(b);
                i += 1;
            }
        }
    }
    Err(open)
}

fn single_quoted(line: &[u8], open: usize) -> Result<(Vec<u8>, usize), usize> {
    let mut arg = Vec::new();
    let mut i = open + 1;
    while i < line.len() {
        match line[i] {
            b'\'' => return Ok((arg, closed_at(line, open, i)?)),
            b'\\' if line.get(i + 1) == Some(&b'\'') => {
                arg.push(b'\'');
                i += 2;
            }
            b => {
                arg.push(b);
                i += 1;
            }
        }
    }
    Err(open)
}

fn hex(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        _ => digit - b'A' + 10,
    }
}
