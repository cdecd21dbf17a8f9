use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

fn parse_all(bytes: &[u8], limits: Limits) -> (Vec<Vec<Vec<u8>>>, Result<usize, ParseError>) {
    let mut decoder = Decoder::new(limits);
    decoder.feed(bytes);
    drain(&mut decoder)
}

/// Every command available, then the decoder's state: bytes still buffered, or the error.
fn drain(decoder: &mut Decoder) -> (Vec<Vec<Vec<u8>>>, Result<usize, ParseError>) {
    let mut commands = Vec::new();
    loop {
        match decoder.next_command() {
            Ok(Some(c)) => commands.push(c),
            Ok(None) => return (commands, Ok(decoder.buffered())),
            Err(e) => return (commands, Err(e)),
        }
    }
}

/// Feeds `bytes` in the pieces `cuts` makes, draining after each; what the whole stream gave.
fn parse_split(
    bytes: &[u8],
    cuts: &[usize],
    limits: Limits,
) -> (Vec<Vec<Vec<u8>>>, Result<usize, ParseError>) {
    let mut decoder = Decoder::new(limits);
    let mut commands = Vec::new();
    let mut start = 0;
    for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
        decoder.feed(&bytes[start..cut]);
        start = cut;
        let (mut got, state) = drain(&mut decoder);
        commands.append(&mut got);
        if state.is_err() || cut == bytes.len() {
            return (commands, state);
        }
    }
    unreachable!()
}

fn args(words: &[&str]) -> Vec<Vec<u8>> {
    words.iter().map(|w| w.as_bytes().to_vec()).collect()
}

#[test]
fn array_of_bulk_strings() {
    let (commands, state) = parse_all(b"*2\r\n$3\r\nGET\r\n$3\r\nfoo\r\n", Limits::default());
    assert_eq!(commands, vec![args(&["GET", "foo"])]);
    assert_eq!(state, Ok(0));
}

#[test]
fn binary_bulk_with_crlf_inside() {
    let (commands, _) = parse_all(
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$4\r\n\r\n\0\xff\r\n",
        Limits::default(),
    );
    assert_eq!(
        commands,
        vec![vec![b"SET".to_vec(), b"k".to_vec(), b"\r\n\0\xff".to_vec()]]
    );
}

#[test]
fn pipelined_commands_and_empty_arrays() {
    let stream = b"*0\r\n*1\r\n$4\r\nPING\r\n*-1\r\n*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nPI";
    let (commands, state) = parse_all(stream, Limits::default());
    assert_eq!(commands, vec![args(&["PING"]), args(&["PING"])]);
    // The third PING is still arriving: its array header is consumed, its element is kept.
    assert_eq!(state, Ok(6));
}

#[test]
fn incomplete_command_waits() {
    let mut decoder = Decoder::new(Limits::default());
    decoder.feed(b"*2\r\n$3\r\nGE");
    assert_eq!(decoder.next_command(), Ok(None));
    decoder.feed(b"T\r\n$1");
    assert_eq!(decoder.next_command(), Ok(None));
    decoder.feed(b"\r\nk\r");
    assert_eq!(decoder.next_command(), Ok(None));
    decoder.feed(b"\n");
    assert_eq!(decoder.next_command(), Ok(Some(args(&["GET", "k"]))));
    assert_eq!(decoder.next_command(), Ok(None));
    assert_eq!(decoder.buffered(), 0);
}

/// Escapes as Redis reads them: in `"…"` an unknown escape is the byte itself and `\x` needs
/// two hex digits; in `'…'` only `\'` is one; outside quotes a backslash is itself.
#[test]
fn inline_commands() {
    let (commands, state) = parse_all(
        b"PING\r\n\r\n  set  k   v \nGET k\r\nSET \"a b\" 'c\\'d' \"\\x41\\n\"\r\n\
          SET \"a\\qb\" \"\\x4\" \"\\xzz\" \"\\x7e\" 'a\\b' b\\\r\nEXISTS",
        Limits::default(),
    );
    assert_eq!(
        commands,
        vec![
            args(&["PING"]),
            args(&["set", "k", "v"]),
            args(&["GET", "k"]),
            args(&["SET", "a b", "c'd", "A\n"]),
            args(&["SET", "aqb", "x4", "xzz", "~", "a\\b", "b\\"]),
        ]
    );
    assert_eq!(state, Ok(6));
}

#[test]
fn unbalanced_quotes_are_an_error() {
    for (line, at) in [
        (&b"SET \"abc\r\n"[..], 4),
        (b"SET 'abc\r\n", 4),
        (b"SET \"a\"b\r\n", 4),
        (b"PING\r\nGET 'x'y\n", 10),
    ] {
        let (_, state) = parse_all(line, Limits::default());
        assert_eq!(
            state,
            Err(ParseError::UnbalancedQuotes { offset: at }),
            "{line:?}"
        );
    }
}

#[test]
fn malformed_headers_are_errors() {
    let cases: &[(&[u8], ParseError)] = &[
        (b"*x\r\n", ParseError::InvalidMultibulkLength { offset: 0 }),
        (b"*+1\r\n", ParseError::InvalidMultibulkLength { offset: 0 }),
        (b"*01\r\n", ParseError::InvalidMultibulkLength { offset: 0 }),
        (b"*1\rx", ParseError::MissingCrlf { offset: 2 }),
        (
            b"*1\r\n$-1\r\n",
            ParseError::InvalidBulkLength { offset: 4 },
        ),
        (
            b"*1\r\n$abc\r\n",
            ParseError::InvalidBulkLength { offset: 4 },
        ),
        (
            b"*1\r\n:1\r\n",
            ParseError::ExpectedDollar {
                got: b':',
                offset: 4,
            },
        ),
        (
            b"*1\r\n$1\r\nabc\r\n",
            ParseError::MissingCrlf { offset: 9 },
        ),
        (
            b"*99999999999999999999999\r\n",
            ParseError::InvalidMultibulkLength { offset: 0 },
        ),
        (
            b"*111111111111111111111111111111111111111",
            ParseError::InvalidMultibulkLength { offset: 0 },
        ),
    ];
    for (stream, want) in cases {
        let (commands, state) = parse_all(stream, Limits::default());
        assert!(commands.is_empty(), "{stream:?}");
        assert_eq!(state.as_ref(), Err(want), "{stream:?}");
    }
}

#[test]
fn limits_refuse_before_allocating() {
    let limits = Limits {
        max_bulk_bytes: 10,
        max_array_len: 3,
        max_frame_bytes: 40,
        max_inline_bytes: 16,
        max_reply_depth: 2,
    };
    // A claimed size far above the limit is refused from the header alone.
    let (_, state) = parse_all(b"*1\r\n$9223372036854775807\r\n", limits);
    assert_eq!(
        state,
        Err(ParseError::BulkTooLong {
            len: i64::MAX,
            max: 10,
            offset: 4
        })
    );
    let (_, state) = parse_all(b"*4\r\n", limits);
    assert_eq!(
        state,
        Err(ParseError::ArrayTooLong {
            len: 4,
            max: 3,
            offset: 0
        })
    );
    // 4 (header) + 3 * (5 + 10 + 2) = 55 > 40: refused at the third element's header.
    let (_, state) = parse_all(
        b"*3\r\n$10\r\n0123456789\r\n$10\r\n0123456789\r\n$10\r\n",
        limits,
    );
    assert_eq!(
        state,
        Err(ParseError::FrameTooLarge {
            size: 55,
            max: 40,
            offset: 38
        })
    );
    let (_, state) = parse_all(b"PING 0123456789abcdef", limits);
    assert_eq!(state, Err(ParseError::InlineTooLong { max: 16, offset: 0 }));
    let (commands, _) = parse_all(b"PING 0123456789\n", limits);
    assert_eq!(commands, vec![args(&["PING", "0123456789"])]);
}

#[test]
fn decoder_is_poisoned_after_an_error() {
    let mut decoder = Decoder::new(Limits::default());
    decoder.feed(b"*1\r\n:1\r\n");
    let first = decoder.next_command().unwrap_err();
    decoder.feed(b"*1\r\n$4\r\nPING\r\n");
    assert_eq!(decoder.next_command(), Err(first));
}

#[test]
fn error_reply_and_display() {
    let e = ParseError::InvalidBulkLength { offset: 17 };
    assert_eq!(
        e.reply().to_bytes(),
        b"-ERR Protocol error: invalid bulk length\r\n"
    );
    assert_eq!(
        e.to_string(),
        "RESP protocol error at byte 17: invalid bulk length"
    );
    let e = ParseError::ExpectedDollar {
        got: b'\n',
        offset: 3,
    };
    assert_eq!(
        e.reply(),
        Reply::Error("ERR Protocol error: expected '$', got '\\n'".into())
    );
}

#[test]
fn reply_encoding() {
    let cases: Vec<(Reply, &[u8])> = vec![
        (Reply::ok(), b"+OK\r\n"),
        (Reply::Simple("a\r\nb".into()), b"+a  b\r\n"),
        (Reply::Error("ERR no\nway".into()), b"-ERR no way\r\n"),
        (Reply::Integer(-42), b":-42\r\n"),
        (Reply::Bulk(b"a\r\nb".to_vec()), b"$4\r\na\r\nb\r\n"),
        (Reply::Bulk(Vec::new()), b"$0\r\n\r\n"),
        (Reply::Null, b"$-1\r\n"),
        (Reply::Array(vec![]), b"*0\r\n"),
        (
            Reply::versioned(b"v".to_vec(), 3),
            b"*2\r\n$1\r\nv\r\n:3\r\n",
        ),
        (
            Reply::Array(vec![Reply::Null, Reply::Array(vec![Reply::Integer(1)])]),
            b"*2\r\n$-1\r\n*1\r\n:1\r\n",
        ),
    ];
    for (reply, wire) in cases {
        assert_eq!(reply.to_bytes(), wire, "{reply:?}");
        if !matches!(&reply, Reply::Simple(t) | Reply::Error(t) if t.contains('\n')) {
            assert_eq!(
                decode_reply(wire, &Limits::default()),
                Ok(Some((reply.clone(), wire.len()))),
                "{reply:?}"
            );
        }
        for cut in 0..wire.len() {
            assert_eq!(decode_reply(&wire[..cut], &Limits::default()), Ok(None));
        }
    }
}

#[test]
fn reply_decoding_is_bounded() {
    let limits = Limits {
        max_reply_depth: 3,
        ..Limits::default()
    };
    assert_eq!(
        decode_reply(b"*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n", &limits),
        Err(ParseError::ReplyTooDeep { max: 3, offset: 12 })
    );
    assert_eq!(
        decode_reply(b"$9999999999\r\n", &limits),
        Err(ParseError::BulkTooLong {
            len: 9999999999,
            max: 1 << 20,
            offset: 0
        })
    );
    assert_eq!(
        decode_reply(b"?x\r\n", &limits),
        Err(ParseError::UnknownReplyType {
            got: b'?',
            offset: 0
        })
    );
    assert_eq!(
        decode_reply(b"*-1\r\n", &limits),
        Ok(Some((Reply::Null, 5)))
    );
}

#[test]
fn commands_parse_to_the_table() {
    use crate::kvapi::KvCmd;
    let ok = |words: &[&str]| Command::parse(args(words));
    let kv = |words: &[&str]| match Command::parse(args(words)) {
        Ok(Command::Kv(c)) => Ok(c),
        Ok(other) => panic!("{words:?}: not a KV command: {other:?}"),
        Err(e) => Err(e),
    };
    assert_eq!(ok(&["ping"]), Ok(Command::Ping(None)));
    assert_eq!(ok(&["PING", "hi"]), Ok(Command::Ping(Some(b"hi".to_vec()))));
    assert_eq!(kv(&["get", "k"]), Ok(KvCmd::Get(b"k".to_vec())));
    assert_eq!(
        kv(&["SeT", "k", "v"]),
        Ok(KvCmd::Set {
            key: b"k".to_vec(),
            value: b"v".to_vec()
        })
    );
    assert_eq!(kv(&["DEL", "a", "b"]), Ok(KvCmd::Del(args(&["a", "b"]))));
    assert_eq!(kv(&["exists", "a"]), Ok(KvCmd::Exists(args(&["a"]))));
    assert_eq!(kv(&["INCR", "n"]), Ok(KvCmd::Incr(b"n".to_vec())));
    assert_eq!(
        kv(&["MGET", "a", "b", "c"]),
        Ok(KvCmd::MGet(args(&["a", "b", "c"])))
    );
    assert_eq!(kv(&["VGET", "k"]), Ok(KvCmd::VGet(b"k".to_vec())));
    assert_eq!(kv(&["dbsize"]), Ok(KvCmd::DbSize));
    assert_eq!(
        kv(&["VSET", "k", "v", "18446744073709551615"]),
        Err(CommandError::NotAnInteger)
    );
    assert_eq!(
        kv(&["VSET", "k", "v", "7"]),
        Ok(KvCmd::VSet {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            version: 7
        })
    );
    assert_eq!(ok(&["quit"]), Ok(Command::Quit));
    for command in [
        Command::Ping(None),
        Command::Quit,
        Command::Kv(KvCmd::Set {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
        }),
        Command::Kv(KvCmd::MGet(args(&["a", "b"]))),
        Command::Kv(KvCmd::VSet {
            key: b"k".to_vec(),
            value: b"".to_vec(),
            version: 0,
        }),
        Command::Kv(KvCmd::DbSize),
    ] {
        assert_eq!(Command::parse(command.to_args()), Ok(command.clone()));
    }
    assert!(ok(&["SET", "k", "v"]).unwrap().is_write());
    assert!(!ok(&["MGET", "k"]).unwrap().is_write());
}

#[test]
fn command_errors_use_redis_wording() {
    let err = |words: &[&str]| Command::parse(args(words)).unwrap_err().to_string();
    // Redis names the command in lower case, however it was sent.
    for (words, name) in [
        (&["GET"][..], "get"),
        (&["get", "a", "b"], "get"),
        (&["PING", "a", "b"], "ping"),
        (&["MGET"], "mget"),
        (&["VSET", "k", "v"], "vset"),
    ] {
        assert_eq!(
            err(words),
            format!("ERR wrong number of arguments for '{name}' command")
        );
    }
    assert_eq!(err(&["SET", "k", "v", "EX", "10"]), "ERR syntax error");
    assert_eq!(
        err(&["VSET", "k", "v", "-1"]),
        "ERR value is not an integer or out of range"
    );
    assert_eq!(
        err(&["FLUSHALL", "a", "b"]),
        "ERR unknown command 'FLUSHALL', with args beginning with: 'a' 'b' "
    );
    assert_eq!(
        err(&["nope"]),
        "ERR unknown command 'nope', with args beginning with: "
    );
    let long = "x".repeat(300);
    let message = err(&["nope", &long, "tail"]);
    assert_eq!(
        message,
        format!(
            "ERR unknown command 'nope', with args beginning with: '{}' ",
            "x".repeat(128)
        )
    );
    assert_eq!(
        Command::parse(Vec::new()).unwrap_err().reply(),
        Reply::Error("ERR unknown command '', with args beginning with: ".into())
    );
}

/// A random stream of valid commands (arrays, inline lines, empty ones) and what it holds.
fn random_valid_stream(rng: &mut StdRng, commands: usize) -> (Vec<u8>, Vec<Vec<Vec<u8>>>) {
    let mut stream = Vec::new();
    let mut expected = Vec::new();
    for _ in 0..commands {
        match rng.gen_range(0..10) {
            0 => stream.extend_from_slice(if rng.gen_bool(0.5) {
                b"*0\r\n"
            } else {
                b"\r\n"
            }),
            1..=3 => {
                // Inline: plain words and double-quoted binary arguments.
                let argc = rng.gen_range(1..5);
                let mut line = Vec::new();
                let mut command = Vec::new();
                for i in 0..argc {
                    if i > 0 {
                        line.extend(std::iter::repeat_n(b' ', rng.gen_range(1..3)));
                    }
                    let len = rng.gen_range(0..12);
                    let arg: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
                    line.push(b'"');
                    for &b in &arg {
                        if b.is_ascii_alphanumeric() {
                            line.push(b);
                        } else {
                            line.extend_from_slice(format!("\\x{b:02x}").as_bytes());
                        }
                    }
                    line.push(b'"');
                    command.push(arg);
                }
                line.extend_from_slice(if rng.gen_bool(0.5) { b"\r\n" } else { b"\n" });
                stream.extend_from_slice(&line);
                expected.push(command);
            }
            _ => {
                let argc = rng.gen_range(1..6);
                let command: Vec<Vec<u8>> = (0..argc)
                    .map(|_| {
                        let len = rng.gen_range(0..40);
                        (0..len).map(|_| rng.r#gen()).collect()
                    })
                    .collect();
                stream.extend_from_slice(&encode_command(&command));
                expected.push(command);
            }
        }
    }
    (stream, expected)
}

fn random_cuts(rng: &mut StdRng, len: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = match rng.gen_range(0..3) {
        // Every byte on its own.
        0 => (1..len).collect(),
        _ => (0..rng.gen_range(0..20))
            .map(|_| rng.gen_range(0..=len))
            .collect(),
    };
    cuts.sort_unstable();
    cuts
}

#[test]
fn random_splits_of_valid_streams_parse_identically() {
    let mut rng = StdRng::seed_from_u64(0x5e5b);
    for round in 0..500 {
        let count = rng.gen_range(1..12);
        let (stream, expected) = random_valid_stream(&mut rng, count);
        let whole = parse_all(&stream, Limits::default());
        assert_eq!(whole, (expected.clone(), Ok(0)), "round {round}");
        let cuts = random_cuts(&mut rng, stream.len());
        assert_eq!(
            parse_split(&stream, &cuts, Limits::default()),
            whole,
            "round {round}, cuts {cuts:?}"
        );
    }
}

#[test]
fn random_bytes_never_panic_and_parse_identically_however_split() {
    let small = Limits {
        max_bulk_bytes: 32,
        max_array_len: 6,
        max_frame_bytes: 120,
        max_inline_bytes: 48,
        max_reply_depth: 4,
    };
    let mut rng = StdRng::seed_from_u64(0xbad_b17e5);
    for round in 0..3000 {
        // Valid commands with bytes flipped, inserted or cut, or plain noise.
        let mut stream = if rng.gen_bool(0.7) {
            let count = rng.gen_range(1..6);
            random_valid_stream(&mut rng, count).0
        } else {
            let len = rng.gen_range(0..200);
            (0..len)
                .map(|_| match rng.gen_range(0..4) {
                    0 => b"*$\r\n-0123456789\"' "[rng.gen_range(0..18)],
                    _ => rng.r#gen(),
                })
                .collect()
        };
        for _ in 0..rng.gen_range(0..4) {
            if stream.is_empty() {
                break;
            }
            let at = rng.gen_range(0..stream.len());
            match rng.gen_range(0..3) {
                0 => stream[at] = rng.r#gen(),
                1 => stream.insert(at, b"*$\r\n9"[rng.gen_range(0..5)]),
                _ => {
                    stream.remove(at);
                }
            }
        }
        let limits = if rng.gen_bool(0.5) {
            small
        } else {
            Limits::default()
        };
        let whole = parse_all(&stream, limits);
        let cuts = random_cuts(&mut rng, stream.len());
        assert_eq!(
            parse_split(&stream, &cuts, limits),
            whole,
            "round {round}, stream {stream:?}, cuts {cuts:?}"
        );
        for reply_end in [stream.len(), stream.len() / 2] {
            let _ = decode_reply(&stream[..reply_end], &limits);
        }
    }
}
