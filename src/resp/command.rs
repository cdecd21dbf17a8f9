//! The command table: which Redis commands a raftkv node serves, their arity, and the typed
//! [`Command`] each becomes. Names are case-insensitive; keys and values are binary.
//!
//! | command | arguments | reply |
//! |---|---|---|
//! | `PING` | `[message]` | `+PONG`, or the message as a bulk string |
//! | `GET` | `key` | bulk value, or nil |
//! | `SET` | `key value` (no options) | `+OK` |
//! | `DEL` | `key [key …]` | integer: keys removed |
//! | `EXISTS` | `key [key …]` | integer: keys present (a key named twice counts twice) |
//! | `INCR` | `key` | integer: the new value |
//! | `MGET` | `key [key …]` | array of bulk values or nils |
//! | `VGET` | `key` | `[value, version]`, or nil |
//! | `VSET` | `key value version` | `+OK`, `-ERRVERSION …` or `-ERRMAYBE …` |
//! | `DBSIZE` | | integer: keys in the store |
//! | `QUIT` | | `+OK`, then the server closes the connection |
//!
//! The commands about the connection itself (`HELLO`, `AUTH`, `CLIENT`, `SELECT`, `INFO`,
//! `MULTI`/`EXEC`, …) are in [`super::session`].
//!
//! `VGET` and `VSET` are the lab's versioned `Get` and `Put`: `VSET` installs the value only if
//! `version` is the key's current version (0 creates a key), and answers `ERRMAYBE` when a
//! retried put finds the version moved on and cannot tell whether its first try applied.

use std::fmt;

use super::{Reply, parse_decimal};
pub use crate::kvapi::kv::NOT_AN_INTEGER;
use crate::kvapi::{KvCmd, KvOut};

/// A command of the table: a KV command, which the store executes (the same [`KvCmd`] a
/// node's log carries), or one the connection answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Kv(KvCmd),
    Ping(Option<Vec<u8>>),
    Quit,
    /// `RAFTKV.MEMBER LIST|ADD|REMOVE ...`: an operator's membership command (the arguments
    /// after the name), run by the store's [`operator`](super::server::CommandHandler::operator).
    Operator(Vec<Vec<u8>>),
}

/// Why a well-formed RESP command is refused. The connection stays open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    /// No such command. `name` and `args` are as the client sent them (lossy UTF-8).
    Unknown { name: String, args: Vec<String> },
    /// A known command with too few or too many arguments; `name` is the lower-case command.
    WrongArity { name: &'static str },
    /// Extra arguments a command does not understand (SET's options, say).
    Syntax,
    /// An argument that must be an integer is not one, or is out of range.
    NotAnInteger,
}

impl CommandError {
    /// The error reply, in Redis's wording.
    pub fn reply(&self) -> Reply {
        Reply::Error(self.to_string())
    }
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandError::Unknown { name, args } => {
                // Redis quotes the arguments while the list is under 128 characters.
                let mut listed = String::new();
                for arg in args {
                    if listed.len() >= 128 {
                        break;
                    }
                    let room = 128 - listed.len();
                    let shown: String = arg.chars().take(room).collect();
                    listed.push_str(&format!("'{shown}' "));
                }
                let name: String = name.chars().take(128).collect();
                write!(
                    f,
                    "ERR unknown command '{name}', with args beginning with: {listed}"
                )
            }
            CommandError::WrongArity { name } => {
                write!(f, "ERR wrong number of arguments for '{name}' command")
            }
            CommandError::Syntax => f.write_str("ERR syntax error"),
            CommandError::NotAnInteger => f.write_str(NOT_AN_INTEGER),
        }
    }
}

impl std::error::Error for CommandError {}

/// How many arguments (the name included) a command takes: exactly `n`, or at least `n`.
#[derive(Clone, Copy)]
enum Arity {
    Exactly(usize),
    AtLeast(usize),
    Between(usize, usize),
}

impl Arity {
    fn admits(self, argc: usize) -> bool {
        match self {
            Arity::Exactly(n) => argc == n,
            Arity::AtLeast(n) => argc >= n,
            Arity::Between(low, high) => (low..=high).contains(&argc),
        }
    }
}

/// The table: upper-case name, lower-case name (for messages), arity.
const TABLE: &[(&str, &str, Arity)] = &[
    ("PING", "ping", Arity::Between(1, 2)),
    ("GET", "get", Arity::Exactly(2)),
    ("SET", "set", Arity::AtLeast(3)),
    ("DEL", "del", Arity::AtLeast(2)),
    ("EXISTS", "exists", Arity::AtLeast(2)),
    ("INCR", "incr", Arity::Exactly(2)),
    ("MGET", "mget", Arity::AtLeast(2)),
    ("VGET", "vget", Arity::Exactly(2)),
    ("VSET", "vset", Arity::Exactly(4)),
    ("DBSIZE", "dbsize", Arity::Exactly(1)),
    ("QUIT", "quit", Arity::Exactly(1)),
    ("RAFTKV.MEMBER", "raftkv.member", Arity::AtLeast(2)),
];

impl Command {
    /// Maps a decoded command (name first) to a [`Command`].
    pub fn parse(args: Vec<Vec<u8>>) -> Result<Command, CommandError> {
        let mut args = args.into_iter();
        let Some(name) = args.next() else {
            return Err(CommandError::Unknown {
                name: String::new(),
                args: Vec::new(),
            });
        };
        let mut rest: Vec<Vec<u8>> = args.collect();
        let Some(&(upper, lower, arity)) = TABLE
            .iter()
            .find(|(upper, _, _)| name.eq_ignore_ascii_case(upper.as_bytes()))
        else {
            return Err(CommandError::Unknown {
                name: String::from_utf8_lossy(&name).into_owned(),
                args: rest
                    .iter()
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect(),
            });
        };
        if !arity.admits(rest.len() + 1) {
            return Err(CommandError::WrongArity { name: lower });
        }
        let kv = match upper {
            "PING" => return Ok(Command::Ping(rest.pop())),
            "QUIT" => return Ok(Command::Quit),
            "RAFTKV.MEMBER" => return Ok(Command::Operator(rest)),
            "GET" => KvCmd::Get(take_one(rest)),
            "SET" => {
                if rest.len() > 2 {
                    return Err(CommandError::Syntax);
                }
                let value = rest.pop().expect("arity checked");
                let key = rest.pop().expect("arity checked");
                KvCmd::Set { key, value }
            }
            "DEL" => KvCmd::Del(rest),
            "EXISTS" => KvCmd::Exists(rest),
            "INCR" => KvCmd::Incr(take_one(rest)),
            "MGET" => KvCmd::MGet(rest),
            "VGET" => KvCmd::VGet(take_one(rest)),
            "VSET" => {
                let version = parse_decimal(&rest[2])
                    .and_then(|v| u64::try_from(v).ok())
                    .ok_or(CommandError::NotAnInteger)?;
                rest.truncate(2);
                let value = rest.pop().expect("arity checked");
                let key = rest.pop().expect("arity checked");
                KvCmd::VSet {
                    key,
                    value,
                    version,
                }
            }
            "DBSIZE" => KvCmd::DbSize,
            other => unreachable!("command {other} is in the table but not mapped"),
        };
        Ok(Command::Kv(kv))
    }

    /// The lower-case command name.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Ping(_) => "ping",
            Command::Quit => "quit",
            Command::Operator(_) => "raftkv.member",
            Command::Kv(kv) => match kv {
                KvCmd::Get(_) => "get",
                KvCmd::Set { .. } => "set",
                KvCmd::Del(_) => "del",
                KvCmd::Exists(_) => "exists",
                KvCmd::Incr(_) => "incr",
                KvCmd::MGet(_) => "mget",
                KvCmd::VGet(_) => "vget",
                KvCmd::VSet { .. } => "vset",
                KvCmd::DbSize => "dbsize",
            },
        }
    }

    /// Whether the command changes the store (and so must be applied exactly once).
    pub fn is_write(&self) -> bool {
        matches!(self, Command::Kv(kv) if kv.is_write())
    }

    /// The command as a client sends it (name first), e.g. for [`super::encode_command`].
    pub fn to_args(&self) -> Vec<Vec<u8>> {
        let mut args = vec![self.name().to_ascii_uppercase().into_bytes()];
        match self {
            Command::Ping(message) => args.extend(message.iter().cloned()),
            Command::Quit => {}
            Command::Operator(rest) => args.extend(rest.iter().cloned()),
            Command::Kv(kv) => match kv {
                KvCmd::Get(key) | KvCmd::Incr(key) | KvCmd::VGet(key) => args.push(key.clone()),
                KvCmd::Set { key, value } => args.extend([key.clone(), value.clone()]),
                KvCmd::Del(keys) | KvCmd::Exists(keys) | KvCmd::MGet(keys) => {
                    args.extend(keys.iter().cloned())
                }
                KvCmd::VSet {
                    key,
                    value,
                    version,
                } => args.extend([key.clone(), value.clone(), version.to_string().into_bytes()]),
                KvCmd::DbSize => {}
            },
        }
        args
    }
}

fn take_one(mut rest: Vec<Vec<u8>>) -> Vec<u8> {
    rest.pop().expect("arity checked")
}

/// Replies for the versioned commands, so every node words them alike.
impl Reply {
    /// `VGET`'s answer for a present key.
    pub fn versioned(value: Vec<u8>, version: u64) -> Reply {
        Reply::Array(vec![
            Reply::Bulk(value),
            Reply::Integer(i64::try_from(version).unwrap_or(i64::MAX)),
        ])
    }

    /// `VSET` with a version that is not the key's (the lab's `ErrVersion`).
    pub fn err_version() -> Reply {
        Reply::Error("ERRVERSION version does not match".into())
    }

    /// `VSET` retried after a lost reply, whose first try may or may not have applied (the
    /// lab's `ErrMaybe`).
    pub fn err_maybe() -> Reply {
        Reply::Error("ERRMAYBE the put may or may not have been applied".into())
    }
}

/// A KV command's result as the client port answers it.
impl From<KvOut> for Reply {
    fn from(out: KvOut) -> Reply {
        match out {
            KvOut::Ok => Reply::ok(),
            KvOut::Null => Reply::Null,
            KvOut::Bulk(v) => Reply::Bulk(v),
            KvOut::Int(n) => Reply::Integer(n),
            KvOut::Array(items) => Reply::Array(items.into_iter().map(Reply::from).collect()),
            KvOut::Versioned(v, version) => Reply::versioned(v, version),
            KvOut::ErrVersion => Reply::err_version(),
            KvOut::ErrNoKey => Reply::Error("ERRNOKEY no such key".into()),
            KvOut::Err(e) => Reply::Error(e),
        }
    }
}
