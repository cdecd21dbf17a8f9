//! One client connection's state and the commands about the connection itself, answered
//! where the connection is served without going to the store: `HELLO`, `AUTH`, `CLIENT`,
//! `SELECT`, `ECHO`, `PING`, `COMMAND`, `CONFIG GET`, `INFO` (its local sections), `MULTI` /
//! `EXEC` / `DISCARD` and `QUIT`. Replies and error strings are Redis 7.2's.
//!
//! [`Session::process`] turns each command into a [`Slot`] of a [`Work`]: a reply known at
//! once, or a place for the store's answer to a KV command. The KV commands of one `Work`
//! (everything a client pipelined, a transaction included) go to the store as one batch
//! ([`super::server::CommandHandler::submit`] or `handle_batch`), and the slots are encoded
//! in order.

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::Instant;

use super::auth::Password;
use super::command::{Command, CommandError};
use super::{Protocol, Reply, parse_decimal};
use crate::kvapi::KvCmd;

/// The Redis release whose commands and replies this server follows (what `HELLO` and
/// `INFO` call `version`; clients pick features by it).
pub const REDIS_VERSION: &str = "7.2.0";
/// Commands one `MULTI` may queue, and the bytes of their arguments.
pub const MAX_QUEUED_COMMANDS: usize = 10_000;
pub const MAX_QUEUED_BYTES: usize = 16 << 20;

pub const NOAUTH: &str = "NOAUTH Authentication required.";
pub const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";
const NOAUTH_HELLO: &str = "NOAUTH HELLO must be called with the client already authenticated, \
otherwise the HELLO AUTH <user> <pass> option can be used to authenticate the client and \
select the RESP protocol version at the same time";
const AUTH_WITHOUT_PASSWORD: &str = "ERR AUTH <password> called without any password configured \
for the default user. Are you sure your configuration is correct?";
const BAD_NAME: &str = "ERR Client names cannot contain spaces, newlines or special characters.";

/// An answer waiting to be encoded: known now, or the store's.
#[derive(Debug)]
pub enum Slot {
    /// Encoded already.
    Ready(Vec<u8>),
    /// The answer to `Work::kv[index]`.
    Kv { index: usize, protocol: Protocol },
    /// `EXEC`: the queued commands' answers as one array.
    Exec {
        slots: Vec<Slot>,
        protocol: Protocol,
    },
    /// An operator's command (`RAFTKV.MEMBER`): the store's answer.
    Operator {
        args: Vec<Vec<u8>>,
        protocol: Protocol,
    },
    /// `INFO`: the sections rendered here, then the store's own, then the keyspace (from the
    /// answer to `Work::kv[index]`, a `DBSIZE`).
    Info {
        local: Vec<String>,
        /// The store's sections wanted: `None` for all of them.
        wanted: Option<Vec<String>>,
        keyspace: Option<usize>,
        protocol: Protocol,
    },
}

/// What a connection hands to the store in one go.
#[derive(Debug, Default)]
pub struct Work {
    pub kv: Vec<KvCmd>,
    pub slots: Vec<Slot>,
    /// Close the connection once the replies are written (`QUIT`, a broken stream).
    pub close: bool,
}

impl Work {
    /// Whether the store must be asked anything (else the replies can be written at once).
    pub fn needs_store(&self) -> bool {
        fn needs(slot: &Slot) -> bool {
            match slot {
                Slot::Ready(_) => false,
                Slot::Kv { .. } => true,
                Slot::Exec { slots, .. } => slots.iter().any(needs),
                Slot::Info { .. } => true,
                Slot::Operator { .. } => true,
            }
        }
        !self.kv.is_empty() || self.slots.iter().any(needs)
    }

    /// Whether the store is asked only the KV commands (no `INFO` section, no operator's
    /// command, which a worker runs).
    pub fn kv_only(&self) -> bool {
        fn kv_only(slot: &Slot) -> bool {
            match slot {
                Slot::Ready(_) | Slot::Kv { .. } => true,
                Slot::Exec { slots, .. } => slots.iter().all(kv_only),
                Slot::Info { .. } | Slot::Operator { .. } => false,
            }
        }
        self.slots.iter().all(kv_only)
    }

    fn ready(&mut self, reply: Reply, protocol: Protocol) {
        self.slots.push(Slot::Ready(encode(&reply, protocol)));
    }
}

fn encode(reply: &Reply, protocol: Protocol) -> Vec<u8> {
    let mut out = Vec::new();
    reply.encode_as(protocol, &mut out);
    out
}

/// What a session needs to know of its server.
pub struct ServerView<'a> {
    pub password: Option<&'a Password>,
    pub started: Instant,
    pub port: u16,
    pub connected_clients: usize,
    pub max_clients: usize,
    /// Redis's `timeout`, in seconds (0: none).
    pub idle_timeout_secs: u64,
    pub partial_frame_timeout_secs: u64,
    pub input_bytes_held: usize,
    pub input_bytes_limit: usize,
    pub max_bulk_bytes: usize,
    pub protected_mode: bool,
    pub bind: &'a str,
    /// This connection, as the server's I/O sees it.
    pub facts: ConnFacts,
    /// `CLIENT LIST`'s lines for every other connection.
    pub other_clients: &'a dyn Fn() -> Vec<(u64, String)>,
}

/// What only the server's I/O knows of this connection (for `CLIENT INFO` / `LIST`).
pub struct ConnFacts {
    pub addr: std::net::SocketAddr,
    pub laddr: std::net::SocketAddr,
    pub fd: i32,
    pub age_secs: u64,
    pub idle_secs: u64,
    pub qbuf: usize,
    pub omem: usize,
}

/// One connection's state.
#[derive(Debug)]
pub struct Session {
    pub id: u64,
    pub protocol: Protocol,
    pub authenticated: bool,
    name: Vec<u8>,
    lib_name: Vec<u8>,
    lib_ver: Vec<u8>,
    /// `Some` between `MULTI` and `EXEC`/`DISCARD`: the queued commands.
    multi: Option<Vec<Vec<Vec<u8>>>>,
    queued_bytes: usize,
    /// A queued command was refused: `EXEC` discards the transaction.
    multi_failed: bool,
    /// The last command's name, lower case (at most 32 bytes).
    last_command: Vec<u8>,
}

/// Whether the connection goes on after a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Close,
}

/// A command about the connection, parsed.
enum Admin {
    Hello(Vec<Vec<u8>>),
    Auth(Vec<Vec<u8>>),
    Client(Vec<Vec<u8>>),
    Select(Vec<u8>),
    Echo(Vec<u8>),
    Ping(Option<Vec<u8>>),
    CommandInfo(Vec<Vec<u8>>),
    Config(Vec<Vec<u8>>),
    Info(Vec<Vec<u8>>),
    Multi,
    Exec,
    Discard,
    Quit,
}

/// A command of either kind.
enum Parsed {
    Kv(KvCmd),
    Admin(Admin),
    /// An operator's command for the store (`RAFTKV.MEMBER`), run on a worker.
    Operator(Vec<Vec<u8>>),
}

/// The table of connection commands: name, Redis arity (negative: at least).
const ADMIN_TABLE: &[(&str, i64)] = &[
    ("HELLO", -1),
    ("AUTH", -2),
    ("CLIENT", -2),
    ("SELECT", 2),
    ("ECHO", 2),
    ("COMMAND", -1),
    ("CONFIG", -2),
    ("INFO", -1),
    ("MULTI", 1),
    ("EXEC", 1),
    ("DISCARD", 1),
];

fn parse(args: Vec<Vec<u8>>) -> Result<Parsed, CommandError> {
    let Some(name) = args.first() else {
        return Err(CommandError::Unknown {
            name: String::new(),
            args: Vec::new(),
        });
    };
    let Some(&(upper, arity)) = ADMIN_TABLE
        .iter()
        .find(|(n, _)| name.eq_ignore_ascii_case(n.as_bytes()))
    else {
        // PING and QUIT are in the KV table (the store may answer them); they are answered
        // here.
        return match Command::parse(args)? {
            Command::Ping(message) => Ok(Parsed::Admin(Admin::Ping(message))),
            Command::Quit => Ok(Parsed::Admin(Admin::Quit)),
            Command::Kv(command) => Ok(Parsed::Kv(command)),
            Command::Operator(args) => Ok(Parsed::Operator(args)),
        };
    };
    let argc = args.len() as i64;
    if (arity > 0 && argc != arity) || (arity < 0 && argc < -arity) {
        return Err(CommandError::WrongArity {
            name: lower_name(upper),
        });
    }
    let mut rest: Vec<Vec<u8>> = args.into_iter().skip(1).collect();
    Ok(Parsed::Admin(match upper {
        "HELLO" => Admin::Hello(rest),
        "AUTH" => Admin::Auth(rest),
        "CLIENT" => Admin::Client(rest),
        "SELECT" => Admin::Select(rest.pop().expect("arity checked")),
        "ECHO" => Admin::Echo(rest.pop().expect("arity checked")),
        "COMMAND" => Admin::CommandInfo(rest),
        "CONFIG" => Admin::Config(rest),
        "INFO" => Admin::Info(rest),
        "MULTI" => Admin::Multi,
        "EXEC" => Admin::Exec,
        "DISCARD" => Admin::Discard,
        other => unreachable!("{other} is in the table but not mapped"),
    }))
}

fn lower_name(upper: &str) -> &'static str {
    match upper {
        "HELLO" => "hello",
        "AUTH" => "auth",
        "CLIENT" => "client",
        "SELECT" => "select",
        "ECHO" => "echo",
        "COMMAND" => "command",
        "CONFIG" => "config",
        "INFO" => "info",
        "MULTI" => "multi",
        "EXEC" => "exec",
        _ => "discard",
    }
}

fn err(text: impl Into<String>) -> Reply {
    Reply::Error(text.into())
}

fn upper(arg: &[u8]) -> String {
    String::from_utf8_lossy(arg).to_ascii_uppercase()
}

fn unknown_subcommand(arg: &[u8], command: &str) -> Reply {
    err(format!(
        "ERR unknown subcommand '{}'. Try {command} HELP.",
        String::from_utf8_lossy(arg)
    ))
}

fn subcommand_arity(command: &str, sub: &str) -> Reply {
    err(format!(
        "ERR wrong number of arguments for '{command}|{sub}' command"
    ))
}

/// Redis allows in names only printable ASCII without spaces.
fn plain_word(value: &[u8]) -> bool {
    value.iter().all(|&b| (b'!'..=b'~').contains(&b))
}

impl Session {
    pub fn new(id: u64, password_required: bool) -> Session {
        Session {
            id,
            protocol: Protocol::Resp2,
            authenticated: !password_required,
            name: Vec::new(),
            lib_name: Vec::new(),
            lib_ver: Vec::new(),
            multi: None,
            queued_bytes: 0,
            multi_failed: false,
            last_command: b"NULL".to_vec(),
        }
    }

    /// Bytes held by commands queued in a transaction.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Takes one decoded command: its answer, or the place for it, goes into `work`.
    pub fn process(&mut self, args: Vec<Vec<u8>>, work: &mut Work, view: &ServerView) -> Flow {
        let protocol = self.protocol;
        if let Some(name) = args.first() {
            self.last_command.clear();
            self.last_command
                .extend(name.iter().take(32).map(u8::to_ascii_lowercase));
        }
        if self.multi.is_some() {
            return self.queue(args, work, view);
        }
        let parsed = match parse(args) {
            Ok(p) => p,
            Err(e) => {
                work.ready(e.reply(), protocol);
                return Flow::Continue;
            }
        };
        if !self.authenticated
            && !matches!(
                parsed,
                Parsed::Admin(Admin::Auth(_) | Admin::Hello(_) | Admin::Quit)
            )
        {
            work.ready(err(NOAUTH), protocol);
            return Flow::Continue;
        }
        match parsed {
            Parsed::Kv(command) => {
                work.slots.push(Slot::Kv {
                    index: work.kv.len(),
                    protocol,
                });
                work.kv.push(command);
                Flow::Continue
            }
            Parsed::Operator(args) => {
                work.slots.push(Slot::Operator { args, protocol });
                Flow::Continue
            }
            Parsed::Admin(Admin::Multi) => {
                self.multi = Some(Vec::new());
                work.ready(Reply::ok(), protocol);
                Flow::Continue
            }
            Parsed::Admin(Admin::Exec) => {
                work.ready(err("ERR EXEC without MULTI"), protocol);
                Flow::Continue
            }
            Parsed::Admin(Admin::Discard) => {
                work.ready(err("ERR DISCARD without MULTI"), protocol);
                Flow::Continue
            }
            Parsed::Admin(Admin::Quit) => {
                work.ready(Reply::ok(), protocol);
                work.close = true;
                Flow::Close
            }
            Parsed::Admin(admin) => {
                let slot = self.admin(admin, work, view);
                work.slots.push(slot);
                Flow::Continue
            }
        }
    }

    /// A command between `MULTI` and `EXEC`.
    fn queue(&mut self, args: Vec<Vec<u8>>, work: &mut Work, view: &ServerView) -> Flow {
        let protocol = self.protocol;
        let name = args.first().map(|n| upper(n)).unwrap_or_default();
        match name.as_str() {
            "EXEC" | "DISCARD" | "MULTI" | "QUIT" => {}
            _ => {
                let size: usize = args.iter().map(Vec::len).sum();
                let queued = self.multi.as_mut().expect("in a transaction");
                let refusal = match parse(args.clone()) {
                    Err(e) => Some(e.reply()),
                    Ok(_) if queued.len() >= MAX_QUEUED_COMMANDS => Some(err(format!(
                        "ERR a transaction holds at most {MAX_QUEUED_COMMANDS} commands"
                    ))),
                    Ok(_) if self.queued_bytes + size > MAX_QUEUED_BYTES => Some(err(format!(
                        "ERR a transaction holds at most {MAX_QUEUED_BYTES} bytes of arguments"
                    ))),
                    Ok(_) => None,
                };
                match refusal {
                    Some(reply) => {
                        self.multi_failed = true;
                        work.ready(reply, protocol);
                    }
                    None => {
                        queued.push(args);
                        self.queued_bytes += size;
                        work.ready(Reply::Simple("QUEUED".into()), protocol);
                    }
                }
                return Flow::Continue;
            }
        }
        match name.as_str() {
            "MULTI" => {
                work.ready(err("ERR MULTI calls can not be nested"), protocol);
                Flow::Continue
            }
            "DISCARD" => {
                self.end_multi();
                work.ready(Reply::ok(), protocol);
                Flow::Continue
            }
            "QUIT" => {
                self.end_multi();
                work.ready(Reply::ok(), protocol);
                work.close = true;
                Flow::Close
            }
            _ => {
                let failed = self.multi_failed;
                let queued = self.end_multi();
                if failed {
                    work.ready(
                        err("EXECABORT Transaction discarded because of previous errors."),
                        protocol,
                    );
                    return Flow::Continue;
                }
                // Every KV command of the transaction goes into this one batch, which the
                // store runs atomically.
                let mut inner = Work::default();
                std::mem::swap(&mut inner.kv, &mut work.kv);
                for args in queued {
                    let flow = self.process(args, &mut inner, view);
                    if flow == Flow::Close {
                        inner.close = true;
                    }
                }
                std::mem::swap(&mut inner.kv, &mut work.kv);
                work.slots.push(Slot::Exec {
                    slots: inner.slots,
                    protocol,
                });
                if inner.close {
                    work.close = true;
                    return Flow::Close;
                }
                Flow::Continue
            }
        }
    }

    fn end_multi(&mut self) -> Vec<Vec<Vec<u8>>> {
        self.multi_failed = false;
        self.queued_bytes = 0;
        self.multi.take().unwrap_or_default()
    }

    fn admin(&mut self, admin: Admin, work: &mut Work, view: &ServerView) -> Slot {
        let reply = match admin {
            Admin::Hello(args) => self.hello(args, view),
            Admin::Auth(args) => self.auth(args, view),
            Admin::Client(args) => self.client(args, view),
            Admin::Select(index) => match parse_decimal(&index) {
                None => err(super::command::NOT_AN_INTEGER),
                Some(0) => Reply::ok(),
                // One database: Redis's answer with `databases 1`.
                Some(_) => err("ERR DB index is out of range"),
            },
            Admin::Echo(message) => Reply::Bulk(message),
            Admin::Ping(None) => Reply::Simple("PONG".into()),
            Admin::Ping(Some(message)) => Reply::Bulk(message),
            Admin::CommandInfo(args) => command_info(args),
            Admin::Config(args) => config(args, view),
            Admin::Info(args) => return self.info(args, work, view),
            Admin::Multi | Admin::Exec | Admin::Discard | Admin::Quit => {
                unreachable!("answered by process")
            }
        };
        // `HELLO` answers in the protocol it chose; nothing else changes it.
        Slot::Ready(encode(&reply, self.protocol))
    }

    fn hello(&mut self, args: Vec<Vec<u8>>, view: &ServerView) -> Reply {
        let mut protocol = self.protocol;
        let mut args = args.into_iter();
        if let Some(version) = args.next() {
            protocol = match parse_decimal(&version) {
                None => return err("ERR Protocol version is not an integer or out of range"),
                Some(2) => Protocol::Resp2,
                Some(3) => Protocol::Resp3,
                Some(_) => return err("NOPROTO unsupported protocol version"),
            };
        }
        let mut auth = None;
        let mut name = None;
        let rest: Vec<Vec<u8>> = args.collect();
        let mut i = 0;
        while i < rest.len() {
            let option = upper(&rest[i]);
            let left = rest.len() - i - 1;
            match option.as_str() {
                "AUTH" if left >= 2 => {
                    auth = Some((rest[i + 1].clone(), rest[i + 2].clone()));
                    i += 3;
                }
                "SETNAME" if left >= 1 => {
                    name = Some(rest[i + 1].clone());
                    i += 2;
                }
                _ => {
                    return err(format!(
                        "ERR Syntax error in HELLO option '{}'",
                        String::from_utf8_lossy(&rest[i])
                    ));
                }
            }
        }
        if let Some((user, pass)) = auth {
            if !check_user(view.password, &user, &pass) {
                return err(WRONGPASS);
            }
            self.authenticated = true;
        }
        if !self.authenticated {
            return err(NOAUTH_HELLO);
        }
        if let Some(name) = name {
            if !plain_word(&name) {
                return err(BAD_NAME);
            }
            self.name = name;
        }
        self.protocol = protocol;
        Reply::Map(vec![
            (bulk("server"), bulk("redis")),
            (bulk("version"), bulk(REDIS_VERSION)),
            (bulk("proto"), Reply::Integer(protocol.version())),
            (bulk("id"), Reply::Integer(self.id as i64)),
            (bulk("mode"), bulk("standalone")),
            (bulk("role"), bulk("master")),
            (bulk("modules"), Reply::Array(Vec::new())),
        ])
    }

    fn auth(&mut self, args: Vec<Vec<u8>>, view: &ServerView) -> Reply {
        match args.as_slice() {
            [pass] => match view.password {
                None => err(AUTH_WITHOUT_PASSWORD),
                Some(p) if p.matches(pass) => {
                    self.authenticated = true;
                    Reply::ok()
                }
                Some(_) => err(WRONGPASS),
            },
            [user, pass] => {
                if check_user(view.password, user, pass) {
                    self.authenticated = true;
                    Reply::ok()
                } else {
                    err(WRONGPASS)
                }
            }
            _ => err("ERR syntax error"),
        }
    }

    fn client(&mut self, args: Vec<Vec<u8>>, view: &ServerView) -> Reply {
        let sub = upper(&args[0]);
        let arity =
            |n: usize, name: &str| (args.len() != n).then(|| subcommand_arity("client", name));
        match sub.as_str() {
            "ID" => arity(1, "id").unwrap_or(Reply::Integer(self.id as i64)),
            "GETNAME" => arity(1, "getname").unwrap_or_else(|| {
                if self.name.is_empty() {
                    Reply::Null
                } else {
                    Reply::Bulk(self.name.clone())
                }
            }),
            "SETNAME" => arity(2, "setname").unwrap_or_else(|| {
                if plain_word(&args[1]) {
                    self.name = args[1].clone();
                    Reply::ok()
                } else {
                    err(BAD_NAME)
                }
            }),
            "SETINFO" => arity(3, "setinfo").unwrap_or_else(|| {
                let attr = upper(&args[1]);
                let value = &args[2];
                let target = match attr.as_str() {
                    "LIB-NAME" => &mut self.lib_name,
                    "LIB-VER" => &mut self.lib_ver,
                    _ => {
                        return err(format!(
                            "ERR Unrecognized option '{}'",
                            String::from_utf8_lossy(&args[1])
                        ));
                    }
                };
                if !plain_word(value) {
                    return err(format!(
                        "ERR {attr} cannot contain spaces, newlines or special characters."
                    ));
                }
                *target = value.clone();
                Reply::ok()
            }),
            "INFO" => arity(1, "info").unwrap_or_else(|| {
                Reply::Verbatim(format!("{}\n", self.describe(view.facts_of_self())))
            }),
            "LIST" => {
                if args.len() > 1 {
                    return err("ERR syntax error");
                }
                let mut lines = (view.other_clients)();
                lines.push((self.id, self.describe(view.facts_of_self())));
                lines.sort_by_key(|(id, _)| *id);
                let mut text = String::new();
                for (_, line) in lines {
                    text.push_str(&line);
                    text.push('\n');
                }
                Reply::Verbatim(text)
            }
            _ => unknown_subcommand(&args[0], "CLIENT"),
        }
    }

    /// The line `CLIENT INFO` and `CLIENT LIST` show for this connection.
    pub fn describe(&self, facts: &ConnFacts) -> String {
        let multi = self.multi.as_ref().map_or(-1, |q| q.len() as i64);
        format!(
            "id={} addr={} laddr={} fd={} name={} age={} idle={} flags={} db=0 sub=0 psub=0 \
             ssub=0 multi={multi} qbuf={} obl=0 oll=0 omem={} cmd={} user=default \
             lib-name={} lib-ver={} resp={}",
            self.id,
            facts.addr,
            facts.laddr,
            facts.fd,
            String::from_utf8_lossy(&self.name),
            facts.age_secs,
            facts.idle_secs,
            if self.multi.is_some() { "x" } else { "N" },
            facts.qbuf,
            facts.omem,
            String::from_utf8_lossy(&self.last_command),
            String::from_utf8_lossy(&self.lib_name),
            String::from_utf8_lossy(&self.lib_ver),
            self.protocol.version(),
        )
    }

    fn info(&self, args: Vec<Vec<u8>>, work: &mut Work, view: &ServerView) -> Slot {
        let wanted: Vec<String> = args
            .iter()
            .map(|a| String::from_utf8_lossy(a).to_ascii_lowercase())
            .collect();
        let all = wanted.is_empty()
            || wanted
                .iter()
                .any(|w| matches!(w.as_str(), "default" | "all" | "everything"));
        let want = |name: &str| all || wanted.iter().any(|w| w == name);
        let mut local = Vec::new();
        if want("server") {
            let uptime = view.started.elapsed().as_secs();
            local.push(format!(
                "# Server\r\nredis_version:{REDIS_VERSION}\r\nraftkv_version:{}\r\n\
                 redis_mode:standalone\r\narch_bits:{}\r\nmultiplexing_api:epoll\r\n\
                 process_id:{}\r\ntcp_port:{}\r\nuptime_in_seconds:{uptime}\r\n\
                 uptime_in_days:{}\r\n",
                env!("CARGO_PKG_VERSION"),
                usize::BITS,
                std::process::id(),
                view.port,
                uptime / 86_400,
            ));
        }
        if want("clients") {
            local.push(format!(
                "# Clients\r\nconnected_clients:{}\r\nmaxclients:{}\r\ntimeout:{}\r\n\
                 partial_frame_timeout:{}\r\nclient_input_bytes:{}\r\n\
                 client_input_bytes_limit:{}\r\nblocked_clients:0\r\n",
                view.connected_clients,
                view.max_clients,
                view.idle_timeout_secs,
                view.partial_frame_timeout_secs,
                view.input_bytes_held,
                view.input_bytes_limit,
            ));
        }
        let keyspace = want("keyspace").then(|| {
            let index = work.kv.len();
            work.kv.push(KvCmd::DbSize);
            index
        });
        Slot::Info {
            local,
            wanted: (!all).then_some(wanted),
            keyspace,
            protocol: self.protocol,
        }
    }
}

impl ServerView<'_> {
    fn facts_of_self(&self) -> &ConnFacts {
        &self.facts
    }
}

fn bulk(text: &str) -> Reply {
    Reply::Bulk(text.as_bytes().to_vec())
}

/// `AUTH user pass`: only the `default` user exists; without a password it takes any.
fn check_user(password: Option<&Password>, user: &[u8], pass: &[u8]) -> bool {
    let default = user == b"default";
    match password {
        None => default,
        // Compare the password even for another user, so the time does not tell.
        Some(p) => p.matches(pass) & default,
    }
}

/// `CONFIG GET`: what clients and benchmarks read. Values describe raftkv in Redis's terms:
/// every write is durable before it is acknowledged (`appendonly yes`, `appendfsync
/// always`), there are no RDB snapshots to configure (`save ""`) and one database.
fn config(args: Vec<Vec<u8>>, view: &ServerView) -> Reply {
    let sub = upper(&args[0]);
    match sub.as_str() {
        "GET" => {
            if args.len() < 2 {
                return subcommand_arity("config", "get");
            }
            let params: Vec<(&str, String)> = vec![
                ("appendfsync", "always".into()),
                ("appendonly", "yes".into()),
                ("bind", view.bind.to_string()),
                ("databases", "1".into()),
                ("maxclients", view.max_clients.to_string()),
                ("port", view.port.to_string()),
                ("proto-max-bulk-len", view.max_bulk_bytes.to_string()),
                (
                    "protected-mode",
                    if view.protected_mode { "yes" } else { "no" }.into(),
                ),
                ("save", String::new()),
                ("timeout", view.idle_timeout_secs.to_string()),
            ];
            let pairs = params
                .into_iter()
                .filter(|(name, _)| {
                    args[1..]
                        .iter()
                        .any(|p| glob_match(&p.to_ascii_lowercase(), name.as_bytes()))
                })
                .map(|(name, value)| (bulk(name), Reply::Bulk(value.into_bytes())))
                .collect();
            Reply::Map(pairs)
        }
        "SET" | "REWRITE" | "RESETSTAT" => err(format!(
            "ERR CONFIG {sub} is not supported: settings are given on the command line of \
             `raftkv serve`"
        )),
        _ => unknown_subcommand(&args[0], "CONFIG"),
    }
}

/// Redis's glob subset for `CONFIG GET`: `*` and `?`.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|skip| glob_match(rest, &text[skip..])),
        Some((b'?', rest)) => !text.is_empty() && glob_match(rest, &text[1..]),
        Some((c, rest)) => text.first() == Some(c) && glob_match(rest, &text[1..]),
    }
}

/// What `COMMAND` says of each command: name, arity, flags, first key, last key, key step,
/// ACL categories, summary, since, group.
struct CommandDoc {
    name: &'static str,
    arity: i64,
    flags: Vec<&'static str>,
    keys: (i64, i64, i64),
    categories: Vec<&'static str>,
    summary: &'static str,
    since: &'static str,
    group: &'static str,
}

/// One command a line: name | arity | flags (`-` for none) | first last step | ACL
/// categories | group | summary. Every command is documented as since 1.0.0.
const DOC_TABLE: &str = "
    auth | -2 | noscript loading stale fast no_auth | 0 0 0 | @fast @connection | connection | Authenticates the connection.
    client | -2 | - | 0 0 0 | @slow @connection | connection | A container for client connection commands.
    command | -1 | loading stale | 0 0 0 | @slow @connection | server | Returns detailed information about all commands.
    config | -2 | - | 0 0 0 | @slow | server | A container for server configuration commands.
    dbsize | 1 | readonly fast | 0 0 0 | @keyspace @read @fast | server | Returns the number of keys in the database.
    del | -2 | write | 1 -1 1 | @keyspace @write @slow | generic | Deletes one or more keys.
    discard | 1 | noscript loading stale fast | 0 0 0 | @fast @transaction | transactions | Discards a transaction.
    echo | 2 | fast | 0 0 0 | @fast @connection | connection | Returns the given string.
    exec | 1 | noscript loading stale | 0 0 0 | @slow @transaction | transactions | Executes all commands in a transaction.
    exists | -2 | readonly fast | 1 -1 1 | @keyspace @read @fast | generic | Determines whether one or more keys exist.
    get | 2 | readonly fast | 1 1 1 | @read @string @fast | string | Returns the string value of a key.
    hello | -1 | noscript loading stale fast no_auth | 0 0 0 | @fast @connection | connection | Handshakes with the Redis server.
    incr | 2 | write denyoom fast | 1 1 1 | @write @string @fast | string | Increments the integer value of a key by one.
    info | -1 | loading stale | 0 0 0 | @slow @dangerous | server | Returns information and statistics about the server.
    mget | -2 | readonly fast | 1 -1 1 | @read @string @fast | string | Atomically returns the string values of one or more keys.
    multi | 1 | noscript loading stale fast | 0 0 0 | @fast @transaction | transactions | Starts a transaction.
    ping | -1 | fast | 0 0 0 | @fast @connection | connection | Returns the server's liveliness response.
    quit | -1 | noscript loading stale fast no_auth | 0 0 0 | @fast @connection | connection | Closes the connection.
    select | 2 | loading stale fast | 0 0 0 | @fast @connection | connection | Changes the selected database (only 0 exists).
    set | -3 | write denyoom | 1 1 1 | @write @string @slow | string | Sets the string value of a key.
    vget | 2 | readonly fast | 1 1 1 | @read @fast | raftkv | Returns a key's value and version (raftkv).
    vset | 4 | write | 1 1 1 | @write @slow | raftkv | Sets a key's value if its version is the given one (raftkv).
";

/// The parsed [`DOC_TABLE`], built once.
fn docs() -> &'static [CommandDoc] {
    static DOCS: OnceLock<Vec<CommandDoc>> = OnceLock::new();
    DOCS.get_or_init(|| {
        DOC_TABLE
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .map(parse_doc_line)
            .collect()
    })
}

fn parse_doc_line(line: &'static str) -> CommandDoc {
    let fields: Vec<&'static str> = line.splitn(7, " | ").collect();
    let number = |text: &str| -> i64 {
        text.parse()
            .unwrap_or_else(|_| panic!("DOC_TABLE: bad number {text:?} in {line:?}"))
    };
    let [name, arity, flags, keys, categories, group, summary] = fields[..] else {
        panic!("DOC_TABLE: expected 7 fields in {line:?}");
    };
    let keys: Vec<i64> = keys.split(' ').map(number).collect();
    let [first, last, step] = keys[..] else {
        panic!("DOC_TABLE: expected three key positions in {line:?}");
    };
    CommandDoc {
        name,
        arity: number(arity),
        flags: flags.split(' ').filter(|f| *f != "-").collect(),
        keys: (first, last, step),
        categories: categories.split(' ').collect(),
        summary,
        since: "1.0.0",
        group,
    }
}

fn find_doc(name: &[u8]) -> Option<&'static CommandDoc> {
    docs()
        .iter()
        .find(|d| name.eq_ignore_ascii_case(d.name.as_bytes()))
}

fn simple_list(items: &[&str]) -> Reply {
    Reply::Array(items.iter().map(|i| Reply::Simple((*i).into())).collect())
}

fn info_entry(d: &CommandDoc) -> Reply {
    Reply::Array(vec![
        bulk(d.name),
        Reply::Integer(d.arity),
        simple_list(&d.flags),
        Reply::Integer(d.keys.0),
        Reply::Integer(d.keys.1),
        Reply::Integer(d.keys.2),
        simple_list(&d.categories),
        Reply::Array(Vec::new()),
        Reply::Array(Vec::new()),
        Reply::Array(Vec::new()),
    ])
}

fn docs_entry(d: &CommandDoc) -> Reply {
    Reply::Map(vec![
        (bulk("summary"), bulk(d.summary)),
        (bulk("since"), bulk(d.since)),
        (bulk("group"), bulk(d.group)),
    ])
}

fn command_info(args: Vec<Vec<u8>>) -> Reply {
    let Some(sub) = args.first() else {
        return Reply::Array(docs().iter().map(info_entry).collect());
    };
    let names = &args[1..];
    match upper(sub).as_str() {
        "COUNT" if names.is_empty() => Reply::Integer(docs().len() as i64),
        "COUNT" => subcommand_arity("command", "count"),
        "LIST" => Reply::Array(docs().iter().map(|d| bulk(d.name)).collect()),
        "INFO" if names.is_empty() => Reply::Array(docs().iter().map(info_entry).collect()),
        "INFO" => Reply::Array(
            names
                .iter()
                .map(|n| find_doc(n).map_or(Reply::Null, info_entry))
                .collect(),
        ),
        "DOCS" => {
            let chosen: Vec<&CommandDoc> = if names.is_empty() {
                docs().iter().collect()
            } else {
                names.iter().filter_map(|n| find_doc(n)).collect()
            };
            Reply::Map(
                chosen
                    .into_iter()
                    .map(|d| (bulk(d.name), docs_entry(d)))
                    .collect(),
            )
        }
        _ => unknown_subcommand(sub, "COMMAND"),
    }
}

/// Renders an `INFO` reply: the local sections, the store's, then the keyspace.
pub fn render_info(
    local: Vec<String>,
    store: Vec<String>,
    keyspace: Option<Result<i64, String>>,
) -> String {
    let mut sections = local;
    sections.extend(store);
    if let Some(keys) = keyspace {
        let mut text = String::from("# Keyspace\r\n");
        match keys {
            // Redis lists only databases that hold keys.
            Ok(0) => {}
            Ok(n) => {
                let _ = write!(text, "db0:keys={n},expires=0,avg_ttl=0\r\n");
            }
            Err(e) => {
                let _ = write!(text, "unavailable:{e}\r\n");
            }
        }
        sections.push(text);
    }
    sections.join("\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_command_parses_once_in_order() {
        let names: Vec<&str> = docs().iter().map(|d| d.name).collect();
        assert_eq!(names.len(), DOC_TABLE.trim().lines().count());
        assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
        let set = find_doc(b"SET").expect("SET is documented");
        assert_eq!((set.arity, set.keys), (-3, (1, 1, 1)));
        assert_eq!(set.flags, ["write", "denyoom"]);
        assert!(find_doc(b"client").expect("CLIENT").flags.is_empty());
    }
}
