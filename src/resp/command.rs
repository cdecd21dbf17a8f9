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

/// A command the KV service executes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ping(Option<Vec<u8>>),
    Get(Vec<u8>),
    Set {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Del(Vec<Vec<u8>>),
    Exists(Vec<Vec<u8>>),
    Incr(Vec<u8>),
    MGet(Vec<Vec<u8>>),
    VGet(Vec<u8>),
    VSet {
        key: Vec<u8>,
        value: Vec<u8>,
        version: u64,
    },
    /// `DBSIZE`: how many keys the store holds.
    DbSize,
    Quit,
    /// `RAFTKV.MEMBER LIST|ADD|REMOVE ...`: the operator's membership commands (the
    /// arguments after the name), answered by the node (`node::members`).
    Member(Vec<Vec<u8>>),
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

/// Redis's text for a value that is not an integer (also what INCR on such a value answers).
pub const NOT_AN_INTEGER: &str = "ERR value is not an integer or out of range";

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
        let command = match upper {
            "PING" => Command::Ping(rest.pop()),
            "GET" => Command::Get(take_one(rest)),
            "SET" => {
                if rest.len() > 2 {
                    return Err(CommandError::Syntax);
                }
                let value = rest.pop().expect("arity checked");
                let key = rest.pop().expect("arity checked");
                Command::Set { key, value }
            }
            "DEL" => Command::Del(rest),
            "EXISTS" => Command::Exists(rest),
            "INCR" => Command::Incr(take_one(rest)),
            "MGET" => Command::MGet(rest),
            "VGET" => Command::VGet(take_one(rest)),
            "VSET" => {
                let version = parse_decimal(&rest[2])
                    .and_then(|v| u64::try_from(v).ok())
                    .ok_or(CommandError::NotAnInteger)?;
                rest.truncate(2);
                let value = rest.pop().expect("arity checked");
                let key = rest.pop().expect("arity checked");
                Command::VSet {
                    key,
                    value,
                    version,
                }
            }
            "DBSIZE" => Command::DbSize,
            "QUIT" => Command::Quit,
            "RAFTKV.MEMBER" => Command::Member(rest),
            other => unreachable!("command {other} is in the table but not mapped"),
        };
        Ok(command)
    }

    /// The lower-case command name.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Ping(_) => "ping",
            Command::Get(_) => "get",
            Command::Set { .. } => "set",
            Command::Del(_) => "del",
            Command::Exists(_) => "exists",
            Command::Incr(_) => "incr",
            Command::MGet(_) => "mget",
            Command::VGet(_) => "vget",
            Command::VSet { .. } => "vset",
            Command::DbSize => "dbsize",
            Command::Quit => "quit",
            Command::Member(_) => "raftkv.member",
        }
    }

    /// Whether the command changes the store (and so must be applied exactly once).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Command::Set { .. } | Command::Del(_) | Command::Incr(_) | Command::VSet { .. }
        )
    }

    /// The command as a client sends it (name first), e.g. for [`super::encode_command`].
    pub fn to_args(&self) -> Vec<Vec<u8>> {
        let mut args = vec![self.name().to_ascii_uppercase().into_bytes()];
        match self {
            Command::Ping(message) => args.extend(message.iter().cloned()),
            Command::Get(key) | Command::Incr(key) | Command::VGet(key) => args.push(key.clone()),
            Command::Set { key, value } => args.extend([key.clone(), value.clone()]),
            Command::Del(keys) | Command::Exists(keys) | Command::MGet(keys) => {
                args.extend(keys.iter().cloned())
            }
            Command::VSet {
                key,
                value,
                version,
            } => args.extend([key.clone(), value.clone(), version.to_string().into_bytes()]),
            Command::DbSize | Command::Quit => {}
            Command::Member(rest) => args.extend(rest.iter().cloned()),
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
