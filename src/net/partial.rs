//! The memory a server's connections hold in partly received frames, bounded in total.
//!
//! A frame's body is read into a buffer grown as its bytes arrive; each growth is first
//! reserved here. When a reservation would pass the limit, the connection holding the most
//! is closed (its reader then frees its buffer) until it fits, or, if the one asking holds
//! the most, it is refused (its frame is dropped with its connection). A peer that stalls in
//! a large frame therefore cannot keep others' frames out, and many large partial frames
//! cannot grow a node's memory past the limit. Every limit hit is logged naming the peer.

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};

use parking_lot::Mutex;

const LOG: &str = "net::server";

/// One connection's share.
struct Holder {
    /// Bytes of buffer it holds for the frame it is reading.
    bytes: usize,
    /// Who it is, for the log: the node the handshake proved and its address.
    who: String,
    /// A handle to close it by.
    stream: TcpStream,
}

#[derive(Default)]
struct Holders {
    total: usize,
    by_conn: HashMap<u64, Holder>,
}

/// The budget of a server's partly received frames. See the module documentation.
pub(crate) struct PartialFrames {
    limit: usize,
    holders: Mutex<Holders>,
}

/// Why a reservation was refused: the budget is full and the asking connection holds the
/// most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OverBudget {
    pub held: usize,
    pub asked: usize,
    pub limit: usize,
}

impl PartialFrames {
    pub(crate) fn new(limit: usize) -> PartialFrames {
        PartialFrames {
            limit,
            holders: Mutex::new(Holders::default()),
        }
    }

    /// Bytes held now, by every connection.
    pub(crate) fn held(&self) -> usize {
        self.holders.lock().total
    }

    /// Registers connection `conn` (closed through `stream` if it must make room).
    pub(crate) fn register(&self, conn: u64, who: String, stream: TcpStream) {
        self.holders.lock().by_conn.insert(
            conn,
            Holder {
                bytes: 0,
                who,
                stream,
            },
        );
    }

    /// Forgets connection `conn` and what it held.
    pub(crate) fn unregister(&self, conn: u64) {
        let mut h = self.holders.lock();
        if let Some(gone) = h.by_conn.remove(&conn) {
            h.total -= gone.bytes;
        }
    }

    /// Reserves `bytes` more for `conn`'s frame, closing the largest holders to make room.
    pub(crate) fn grow(&self, conn: u64, bytes: usize) -> Result<(), OverBudget> {
        let mut h = self.holders.lock();
        loop {
            if h.total.saturating_add(bytes) <= self.limit {
                let Some(me) = h.by_conn.get_mut(&conn) else {
                    // Not registered: nothing to account (a connection being torn down).
                    return Ok(());
                };
                me.bytes += bytes;
                h.total += bytes;
                return Ok(());
            }
            let mine = h.by_conn.get(&conn).map_or(0, |me| me.bytes);
            let largest = h
                .by_conn
                .iter()
                .filter(|(k, other)| **k != conn && other.bytes > 0)
                .max_by_key(|(_, other)| other.bytes)
                .map(|(k, other)| (*k, other.bytes));
            match largest {
                Some((other, held)) if held >= mine.saturating_add(bytes) => {
                    let evicted = h.by_conn.get_mut(&other).expect("found above");
                    evicted.bytes = 0;
                    let _ = evicted.stream.shutdown(Shutdown::Both);
                    log::warn!(target: LOG, "{}: closed: it held {held} bytes of a partly received frame, the most, when the {}-byte budget for partial frames was full", evicted.who, self.limit);
                    h.total -= held;
                }
                _ => {
                    return Err(OverBudget {
                        held: mine,
                        asked: bytes,
                        limit: self.limit,
                    });
                }
            }
        }
    }

    /// `conn`'s frame is complete (or abandoned): what it held is free again.
    pub(crate) fn release(&self, conn: u64) {
        let mut h = self.holders.lock();
        if let Some(me) = h.by_conn.get_mut(&conn) {
            let held = std::mem::take(&mut me.bytes);
            h.total -= held;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn socket() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        (a, b)
    }

    #[test]
    fn the_largest_holder_makes_room_and_the_largest_asker_is_refused() {
        let budget = PartialFrames::new(100);
        let (a, _a) = socket();
        let (b, b_peer) = socket();
        budget.register(1, "node 1".into(), a);
        budget.register(2, "node 2".into(), b);
        budget.grow(2, 70).unwrap();
        budget.grow(1, 30).unwrap();
        assert_eq!(budget.held(), 100);
        // Node 1 needs 20 more: node 2, holding the most, is closed to make room.
        budget.grow(1, 20).unwrap();
        assert_eq!(budget.held(), 50);
        let mut buf = [0u8; 1];
        use std::io::Read;
        assert_eq!((&b_peer).read(&mut buf).unwrap(), 0, "node 2 was closed");
        // Node 1 now holds the most and asks past the limit: refused.
        assert_eq!(
            budget.grow(1, 60),
            Err(OverBudget {
                held: 50,
                asked: 60,
                limit: 100
            })
        );
        budget.release(1);
        assert_eq!(budget.held(), 0);
        budget.unregister(1);
        budget.unregister(2);
        assert_eq!(budget.held(), 0);
    }
}
