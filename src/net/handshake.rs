//! The peer handshake: before a connection between two nodes carries a single frame, each end
//! proves it holds the cluster's secret, and both learn which node is at the other end.
//!
//! ```text
//!  dialler (node c)                                    listener (node s)
//!  hello:     "RKVP" 2 | c | s | nonce_c | cluster id ─►  cluster id ours? s is us? c a peer?
//!          ◄─ challenge: "RKVP" 2 | s | nonce_s | proof_s
//!  proof_s right?
//!  proof:     proof_c ───────────────────────────────►  proof_c right? → frames flow
//!
//!  proof_x = HMAC-SHA256(secret, "raftkv peer v1 " role_x | cluster id | c | s | nonce_c | nonce_s)
//! ```
//!
//! Both nonces are fresh random 32 bytes, so a recorded proof is worth nothing on another
//! connection; the role in the MAC keeps a listener's proof from being replayed as a
//! dialler's. Node ids are big-endian u64, the cluster id at most 255 bytes. Every read has a
//! deadline (the whole handshake: [`HANDSHAKE_TIMEOUT`]) and a fixed size: nothing from an
//! unauthenticated peer is decoded as a frame, and it can make the listener hold no more
//! than [`MAX_HELLO_BYTES`].
//!
//! This authenticates the start of a connection; it does not encrypt, and it does not protect
//! the frames that follow from someone who can rewrite TCP traffic between the nodes (run
//! peer links on a private network, or in a tunnel).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// How long a connection may take to authenticate, from accept (or connect) to the last byte.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);
/// The shortest secret taken (bytes).
pub const MIN_SECRET_BYTES: usize = 16;
/// The longest cluster id (bytes).
pub const MAX_CLUSTER_ID_BYTES: usize = 255;

const MAGIC: &[u8; 4] = b"RKVP";
/// The version of the peer protocol: the handshake and every message after it. Raised with
/// any change to a message's encoding, so that nodes of builds that cannot understand each
/// other refuse to talk, naming both versions, instead of failing to decode. 2: an
/// AppendEntries reply carries `held_index`.
pub const VERSION: u8 = 2;
const NONCE_BYTES: usize = 32;
const MAC_BYTES: usize = 32;
/// magic, version, dialler id, listener id, nonce, cluster id length.
const HELLO_FIXED: usize = 4 + 1 + 8 + 8 + NONCE_BYTES + 1;
/// The most a listener reads from a peer that has not authenticated.
pub const MAX_HELLO_BYTES: usize = HELLO_FIXED + MAX_CLUSTER_ID_BYTES + MAC_BYTES;
const CHALLENGE_BYTES: usize = 4 + 1 + 8 + NONCE_BYTES + MAC_BYTES;

type HmacSha256 = Hmac<Sha256>;

/// What one node proves itself with: the cluster's secret, the cluster's id and its own
/// node id (1-based, as on the command line), and how many nodes the cluster has.
#[derive(Clone)]
pub struct PeerAuth {
    secret: Arc<[u8]>,
    cluster_id: Arc<[u8]>,
    node_id: u64,
    nodes: u64,
    /// Which diallers are members now (membership changes: a node removed from the
    /// configuration is refused even though it holds the secret); `None`: every node id.
    members: Option<MemberCheck>,
}

/// What the listener's configuration says of a dialler that proved itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    Member,
    /// Not in the listener's current configuration, which may not be committed yet.
    NotMember,
    /// Not in the listener's committed configuration (the entry at `index`): removed for
    /// good (unless added again later). The server then tells it so
    /// ([`RemoteError::NotMember`](super::RemoteError)) instead of closing.
    Removed {
        index: u64,
    },
}

/// What a node id is to the listener's current configuration.
pub type MemberCheck = Arc<dyn Fn(u64) -> Membership + Send + Sync>;

impl fmt::Debug for PeerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret.
        write!(
            f,
            "PeerAuth {{ cluster: {:?}, node: {} of {} }}",
            String::from_utf8_lossy(&self.cluster_id),
            self.node_id,
            self.nodes
        )
    }
}

impl PeerAuth {
    /// Node `node_id` (of `1..=nodes`) of cluster `cluster_id`, holding `secret`.
    pub fn new(
        secret: &[u8],
        cluster_id: &[u8],
        node_id: u64,
        nodes: u64,
    ) -> Result<PeerAuth, String> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "the peer secret has {} bytes; at least {MIN_SECRET_BYTES} are needed",
                secret.len()
            ));
        }
        if cluster_id.len() > MAX_CLUSTER_ID_BYTES {
            return Err(format!(
                "the cluster id has {} bytes; at most {MAX_CLUSTER_ID_BYTES}",
                cluster_id.len()
            ));
        }
        if node_id == 0 || node_id > nodes {
            return Err(format!("node {node_id} is not one of 1..={nodes}"));
        }
        Ok(PeerAuth {
            secret: secret.into(),
            cluster_id: cluster_id.into(),
            node_id,
            nodes,
            members: None,
        })
    }

    /// As a listener, accepts only the diallers `members` says are members (checked once
    /// they have proved themselves).
    pub fn with_member_check(mut self, members: MemberCheck) -> PeerAuth {
        self.members = Some(members);
        self
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    fn proof(&self, role: &str, dialler: u64, listener: u64, nonces: (&[u8], &[u8])) -> Vec<u8> {
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes any key");
        self.feed(&mut mac, role, dialler, listener, nonces);
        mac.finalize().into_bytes().to_vec()
    }

    fn verify(
        &self,
        role: &str,
        dialler: u64,
        listener: u64,
        nonces: (&[u8], &[u8]),
        proof: &[u8],
    ) -> bool {
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes any key");
        self.feed(&mut mac, role, dialler, listener, nonces);
        // Constant time.
        mac.verify_slice(proof).is_ok()
    }

    fn feed(
        &self,
        mac: &mut HmacSha256,
        role: &str,
        dialler: u64,
        listener: u64,
        (nonce_d, nonce_l): (&[u8], &[u8]),
    ) {
        mac.update(b"raftkv peer v1 ");
        mac.update(role.as_bytes());
        mac.update(&[self.cluster_id.len() as u8]);
        mac.update(&self.cluster_id);
        mac.update(&dialler.to_be_bytes());
        mac.update(&listener.to_be_bytes());
        mac.update(nonce_d);
        mac.update(nonce_l);
    }
}

/// Why a handshake failed. Names what the other end claimed, for the log line.
#[derive(Debug)]
pub enum HandshakeError {
    Io(io::Error),
    /// The deadline passed first.
    Timeout,
    /// The other end closed before the handshake was done (on the dialling side: the
    /// listener refused us — another secret, cluster id or node id).
    Closed,
    /// Not this protocol.
    NotPeer,
    /// This protocol, another version of it (a node of another raftkv build).
    Version {
        ours: u8,
        theirs: u8,
    },
    /// Another cluster.
    Cluster {
        ours: String,
        theirs: String,
    },
    /// The dialler claims an id that is not another node of the cluster.
    UnknownNode {
        claimed: u64,
    },
    /// The dialler wants another node than this one, or the listener is another node than
    /// the one dialled.
    WrongNode {
        expected: u64,
        claimed: u64,
    },
    /// The other end does not hold the secret.
    BadProof {
        claimed: u64,
    },
    /// The dialler proved itself but is not a member of the listener's configuration (a
    /// removed node); `removed_at`: the index of the listener's committed configuration
    /// without it, if that is why.
    NotMember {
        claimed: u64,
        removed_at: Option<u64>,
    },
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::Io(e) => write!(f, "handshake: {e}"),
            HandshakeError::Timeout => write!(
                f,
                "handshake not done within {HANDSHAKE_TIMEOUT:?}"
            ),
            HandshakeError::Closed => f.write_str(
                "closed during the handshake (another secret, cluster id or node id at the other end?)",
            ),
            HandshakeError::NotPeer => f.write_str("not a raftkv peer handshake"),
            HandshakeError::Version { ours, theirs } => write!(
                f,
                "peer protocol version {theirs}, this node speaks {ours} (a node of another raftkv build)"
            ),
            HandshakeError::Cluster { ours, theirs } => {
                write!(f, "cluster id mismatch: ours {ours:?}, theirs {theirs:?}")
            }
            HandshakeError::NotMember {
                claimed,
                removed_at: None,
            } => {
                write!(f, "node {claimed} is not a member of this node's configuration")
            }
            HandshakeError::NotMember {
                claimed,
                removed_at: Some(index),
            } => write!(
                f,
                "node {claimed} is not a member of this node's committed configuration (entry {index})"
            ),
            HandshakeError::UnknownNode { claimed } => {
                write!(f, "claims to be node {claimed}, not another node of this cluster")
            }
            HandshakeError::WrongNode { expected, claimed } => {
                write!(f, "node {claimed} answered where node {expected} was expected")
            }
            HandshakeError::BadProof { claimed } => {
                write!(f, "claims to be node {claimed} but does not hold the peer secret")
            }
        }
    }
}

impl std::error::Error for HandshakeError {}

/// What is left of the handshake's time, as a socket timeout; none left is a timeout.
fn time_left(deadline: Instant) -> Result<Duration, HandshakeError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(HandshakeError::Timeout);
    }
    Ok(left)
}

/// A socket error, where a timeout of the socket is the handshake's.
fn io_error(e: io::Error) -> HandshakeError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HandshakeError::Timeout,
        _ => HandshakeError::Io(e),
    }
}

/// Reads exactly `buf.len()` bytes before `deadline`.
fn read_full(
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
) -> Result<(), HandshakeError> {
    let mut got = 0;
    while got < buf.len() {
        stream
            .set_read_timeout(Some(time_left(deadline)?))
            .map_err(HandshakeError::Io)?;
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Err(HandshakeError::Closed),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(e)),
        }
    }
    Ok(())
}

fn write_all(stream: &mut TcpStream, buf: &[u8], deadline: Instant) -> Result<(), HandshakeError> {
    stream
        .set_write_timeout(Some(time_left(deadline)?))
        .map_err(HandshakeError::Io)?;
    stream.write_all(buf).map_err(io_error)
}

fn nonce() -> [u8; NONCE_BYTES] {
    let mut n = [0u8; NONCE_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The magic and version that open a hello or a challenge.
fn check_version(opening: &[u8]) -> Result<(), HandshakeError> {
    if &opening[..4] != MAGIC {
        return Err(HandshakeError::NotPeer);
    }
    if opening[4] != VERSION {
        return Err(HandshakeError::Version {
            ours: VERSION,
            theirs: opening[4],
        });
    }
    Ok(())
}

/// The listener's side, on a freshly accepted connection. Returns the dialler's node id once
/// it has proved itself; the stream's timeouts are cleared again.
pub fn accept(
    stream: &mut TcpStream,
    auth: &PeerAuth,
    deadline: Instant,
) -> Result<u64, HandshakeError> {
    let mut hello = [0u8; HELLO_FIXED];
    read_full(stream, &mut hello, deadline)?;
    check_version(&hello)?;
    let dialler = u64_at(&hello, 5);
    let listener = u64_at(&hello, 13);
    let nonce_d = &hello[21..21 + NONCE_BYTES];
    let mut cluster = vec![0u8; hello[HELLO_FIXED - 1] as usize];
    read_full(stream, &mut cluster, deadline)?;
    if *cluster != *auth.cluster_id {
        return Err(HandshakeError::Cluster {
            ours: String::from_utf8_lossy(&auth.cluster_id).into_owned(),
            theirs: String::from_utf8_lossy(&cluster).into_owned(),
        });
    }
    if listener != auth.node_id {
        return Err(HandshakeError::WrongNode {
            expected: auth.node_id,
            claimed: listener,
        });
    }
    if dialler == 0 || dialler > auth.nodes || dialler == auth.node_id {
        return Err(HandshakeError::UnknownNode { claimed: dialler });
    }
    let nonce_l = nonce();
    let mut challenge = Vec::with_capacity(CHALLENGE_BYTES);
    challenge.extend_from_slice(MAGIC);
    challenge.push(VERSION);
    challenge.extend_from_slice(&auth.node_id.to_be_bytes());
    challenge.extend_from_slice(&nonce_l);
    challenge.extend_from_slice(&auth.proof("listener", dialler, listener, (nonce_d, &nonce_l)));
    write_all(stream, &challenge, deadline)?;
    let mut proof = [0u8; MAC_BYTES];
    read_full(stream, &mut proof, deadline)?;
    if !auth.verify("dialler", dialler, listener, (nonce_d, &nonce_l), &proof) {
        return Err(HandshakeError::BadProof { claimed: dialler });
    }
    let verdict = auth
        .members
        .as_ref()
        .map_or(Membership::Member, |members| members(dialler));
    stream.set_read_timeout(None).map_err(HandshakeError::Io)?;
    match verdict {
        Membership::Member => Ok(dialler),
        Membership::NotMember => Err(HandshakeError::NotMember {
            claimed: dialler,
            removed_at: None,
        }),
        // Proven, so it may be told (the server does, on this stream).
        Membership::Removed { index } => Err(HandshakeError::NotMember {
            claimed: dialler,
            removed_at: Some(index),
        }),
    }
}

/// The dialler's side, on a fresh connection to node `listener`.
pub fn dial(
    stream: &mut TcpStream,
    auth: &PeerAuth,
    listener: u64,
    deadline: Instant,
) -> Result<(), HandshakeError> {
    let nonce_d = nonce();
    let mut hello = Vec::with_capacity(HELLO_FIXED + auth.cluster_id.len());
    hello.extend_from_slice(MAGIC);
    hello.push(VERSION);
    hello.extend_from_slice(&auth.node_id.to_be_bytes());
    hello.extend_from_slice(&listener.to_be_bytes());
    hello.extend_from_slice(&nonce_d);
    hello.push(auth.cluster_id.len() as u8);
    hello.extend_from_slice(&auth.cluster_id);
    write_all(stream, &hello, deadline)?;
    let mut challenge = [0u8; CHALLENGE_BYTES];
    read_full(stream, &mut challenge, deadline)?;
    check_version(&challenge)?;
    let answered = u64_at(&challenge, 5);
    if answered != listener {
        return Err(HandshakeError::WrongNode {
            expected: listener,
            claimed: answered,
        });
    }
    let nonce_l = &challenge[13..13 + NONCE_BYTES];
    let proof_l = &challenge[13 + NONCE_BYTES..];
    let nonces = (&nonce_d[..], nonce_l);
    if !auth.verify("listener", auth.node_id, listener, nonces, proof_l) {
        return Err(HandshakeError::BadProof { claimed: listener });
    }
    write_all(
        stream,
        &auth.proof("dialler", auth.node_id, listener, nonces),
        deadline,
    )?;
    stream.set_read_timeout(None).map_err(HandshakeError::Io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    fn auth(secret: &[u8], cluster: &[u8], id: u64) -> PeerAuth {
        PeerAuth::new(secret, cluster, id, 3).expect("auth")
    }

    /// Node `d` dials node 2; returns (dialler's outcome, listener's outcome).
    fn run(
        d: PeerAuth,
        l: PeerAuth,
        want: u64,
    ) -> (Result<(), HandshakeError>, Result<u64, HandshakeError>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            accept(&mut s, &l, Instant::now() + HANDSHAKE_TIMEOUT)
        });
        let mut c = TcpStream::connect(addr).expect("connect");
        let dialled = dial(&mut c, &d, want, Instant::now() + HANDSHAKE_TIMEOUT);
        drop(c);
        (dialled, server.join().expect("listener thread"))
    }

    const S: &[u8] = b"0123456789abcdef0123";

    #[test]
    fn both_ends_holding_the_secret_agree() {
        let (d, l) = run(auth(S, b"c1", 1), auth(S, b"c1", 2), 2);
        assert!(d.is_ok(), "{d:?}");
        assert_eq!(l.expect("listener"), 1);
    }

    #[test]
    fn another_secret_is_refused_by_both() {
        let (d, l) = run(
            auth(b"another secret, long", b"c1", 1),
            auth(S, b"c1", 2),
            2,
        );
        assert!(
            matches!(d, Err(HandshakeError::BadProof { claimed: 2 })),
            "{d:?}"
        );
        // The dialler gave up after the listener's proof; the listener sees it close.
        assert!(matches!(l, Err(HandshakeError::Closed)), "{l:?}");
    }

    #[test]
    fn another_cluster_or_node_is_refused() {
        let (_, l) = run(auth(S, b"c2", 1), auth(S, b"c1", 2), 2);
        assert!(matches!(l, Err(HandshakeError::Cluster { .. })), "{l:?}");
        let (_, l) = run(auth(S, b"c1", 1), auth(S, b"c1", 2), 3);
        assert!(matches!(l, Err(HandshakeError::WrongNode { .. })), "{l:?}");
        let (_, l) = run(auth(S, b"c1", 2), auth(S, b"c1", 2), 2);
        assert!(
            matches!(l, Err(HandshakeError::UnknownNode { claimed: 2 })),
            "{l:?}"
        );
    }

    #[test]
    fn silence_and_garbage_end_within_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _silent = TcpStream::connect(addr).expect("connect");
        let (mut s, _) = listener.accept().expect("accept");
        let started = Instant::now();
        let r = accept(
            &mut s,
            &auth(S, b"c1", 2),
            started + Duration::from_millis(200),
        );
        assert!(matches!(r, Err(HandshakeError::Timeout)), "{r:?}");
        assert!(started.elapsed() < Duration::from_millis(500));
        let mut garbage = TcpStream::connect(addr).expect("connect");
        garbage.write_all(&[0xff; HELLO_FIXED]).expect("write");
        let (mut s, _) = listener.accept().expect("accept");
        let r = accept(
            &mut s,
            &auth(S, b"c1", 2),
            Instant::now() + HANDSHAKE_TIMEOUT,
        );
        assert!(matches!(r, Err(HandshakeError::NotPeer)), "{r:?}");
        // A peer of another version is told apart from garbage, both versions named.
        let mut older = TcpStream::connect(addr).expect("connect");
        let mut hello = [0u8; HELLO_FIXED];
        hello[..4].copy_from_slice(MAGIC);
        hello[4] = VERSION - 1;
        older.write_all(&hello).expect("write");
        let (mut s, _) = listener.accept().expect("accept");
        let r = accept(
            &mut s,
            &auth(S, b"c1", 2),
            Instant::now() + HANDSHAKE_TIMEOUT,
        );
        match r {
            Err(
                e @ HandshakeError::Version {
                    ours: VERSION,
                    theirs,
                },
            ) if theirs == VERSION - 1 => {
                assert!(
                    e.to_string().contains("version 1, this node speaks 2"),
                    "{e}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(PeerAuth::new(b"short", b"c", 1, 3).is_err());
        assert!(PeerAuth::new(S, &[0; 256], 1, 3).is_err());
        assert!(PeerAuth::new(S, b"c", 4, 3).is_err());
    }
}
