//! Loopback ports for local clusters (the cluster tests, `raftkv chaos`), each claimed for
//! as long as the cluster that uses it lives, against every process on the machine that
//! picks its ports here.
//!
//! A port a node listens on is free again whenever that node is down (killed, waiting to be
//! restarted), and a second cluster picking its ports meanwhile (another test thread, another
//! test process, a chaos run) would otherwise find it free and take it: the restarted node
//! then cannot listen, and a test waiting for it waits on a node that is gone. So each port
//! handed out is also claimed with a name in Linux's abstract Unix socket namespace
//! (`raftkv-port-<port>`): binding the name fails while any process holds it, and the kernel
//! drops it when its holder closes it or dies, so no claim outlives its holder and no file is
//! left behind. A [`PortLease`] holds the claims; clones share them, and the last one dropped
//! releases them.
//!
//! The ports are taken below the kernel's ephemeral range when it leaves room: an outgoing
//! connection takes its local port from that range, so it can never occupy a node's port
//! either.

use std::fs;
use std::io;
use std::net::TcpListener;
use std::ops::Deref;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener};
use std::sync::Arc;

const LOG: &str = "proc::ports";

/// Where [`cluster_ports`] looks first: below the usual ephemeral range (32768–60999), and
/// below the ports `raftkv local`'s tests use.
const QUIET_PORTS: std::ops::Range<u16> = 10000..20000;

/// Loopback ports and the claims that keep every other [`cluster_ports`] caller off them.
/// Dereferences to the ports.
#[derive(Clone, Debug)]
pub struct PortLease {
    ports: Vec<u16>,
    _claims: Arc<Vec<UnixListener>>,
}

impl Deref for PortLease {
    type Target = [u16];
    fn deref(&self) -> &[u16] {
        &self.ports
    }
}

/// The claim on `port`, or `None` while another holder (in any process) has it.
fn claim(port: u16) -> io::Result<Option<UnixListener>> {
    let name = UnixAddr::from_abstract_name(format!("raftkv-port-{port}"))?;
    match UnixListener::bind_addr(&name) {
        Ok(claim) => Ok(Some(claim)),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(None),
        Err(e) => Err(e),
    }
}

/// The claim on `port` if no one holds it and the port is free now (bound once to see).
fn claim_free(port: u16) -> io::Result<Option<UnixListener>> {
    let Some(claimed) = claim(port)? else {
        return Ok(None);
    };
    Ok(TcpListener::bind(("127.0.0.1", port))
        .is_ok()
        .then_some(claimed))
}

/// `n` distinct loopback ports free now and claimed (see the module doc): in
/// [`QUIET_PORTS`] from a random start when the ephemeral range leaves it alone, else any.
pub fn cluster_ports(n: usize) -> io::Result<PortLease> {
    let ephemeral_low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok());
    let quiet = ephemeral_low.is_some_and(|low| low >= QUIET_PORTS.end);
    let mut lease = if quiet { quiet_ports(n)? } else { Vec::new() };
    if lease.len() < n {
        if quiet {
            log::warn!(target: LOG, "only {} free ports in {QUIET_PORTS:?}; taking the rest anywhere", lease.len());
        }
        lease.extend(ephemeral_ports(n - lease.len())?);
    }
    let (ports, claims) = lease.into_iter().unzip();
    Ok(PortLease {
        ports,
        _claims: Arc::new(claims),
    })
}

/// Exactly `ports`, claimed and free now, or `None` if one is claimed or in use (for a
/// command whose ports follow from one base, like `raftkv local --port P`).
pub fn claim_exact(ports: &[u16]) -> io::Result<Option<PortLease>> {
    let mut claims = Vec::new();
    for &port in ports {
        let Some(claimed) = claim_free(port)? else {
            return Ok(None);
        };
        claims.push(claimed);
    }
    Ok(Some(PortLease {
        ports: ports.to_vec(),
        _claims: Arc::new(claims),
    }))
}

/// Up to `n` claimed free ports in [`QUIET_PORTS`].
fn quiet_ports(n: usize) -> io::Result<Vec<(u16, UnixListener)>> {
    let span = QUIET_PORTS.end - QUIET_PORTS.start;
    let mut offset = rand::random::<u16>() % span;
    let mut found = Vec::new();
    for _ in 0..span {
        let port = QUIET_PORTS.start + offset;
        offset = (offset + 1) % span;
        if let Some(claimed) = claim_free(port)? {
            found.push((port, claimed));
            if found.len() == n {
                break;
            }
        }
    }
    Ok(found)
}

/// `n` claimed ports the kernel hands out (all bound at once, so they differ), a bounded
/// number of tries when one is claimed already.
fn ephemeral_ports(n: usize) -> io::Result<Vec<(u16, UnixListener)>> {
    let mut found = Vec::new();
    for _ in 0..16 {
        let listeners = (0..n - found.len())
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<io::Result<Vec<_>>>()?;
        for l in &listeners {
            let port = l.local_addr()?.port();
            if let Some(claimed) = claim(port)? {
                found.push((port, claimed));
            }
        }
        if found.len() == n {
            return Ok(found);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("found {} of {n} unclaimed loopback ports", found.len()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_port_is_not_handed_out_again_until_its_last_lease_is_dropped() {
        let lease = cluster_ports(8).unwrap();
        assert_eq!(lease.len(), 8);
        let mut distinct = lease.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 8, "{:?}", &*lease);
        for &port in lease.iter() {
            assert!(claim(port).unwrap().is_none(), "port {port} claimed twice");
        }
        let clone = lease.clone();
        drop(lease);
        for &port in clone.iter() {
            assert!(
                claim(port).unwrap().is_none(),
                "port {port} released with a clone alive"
            );
        }
        let ports = clone.to_vec();
        drop(clone);
        // A child forked meanwhile by another test thread holds copies of this process's
        // sockets until it execs (they are close-on-exec), so a released name may stay
        // bound for that moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        for port in ports {
            while claim(port).unwrap().is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            assert!(claim(port).unwrap().is_some(), "port {port} still claimed");
        }
    }

    /// Set in the child of [`a_claim_holds_across_processes_until_its_holder_dies`]: the
    /// ports it claims.
    const HOLD_ENV: &str = "RAFTKV_TEST_HOLD_PORT_CLAIMS";

    #[test]
    fn a_claim_holds_across_processes_until_its_holder_dies() {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        if let Ok(ports) = std::env::var(HOLD_ENV) {
            // The child: claims the ports, says so, and holds them until it is killed.
            let claims: Vec<UnixListener> = ports
                .split(',')
                .map(|p| claim(p.parse().unwrap()).unwrap().expect("unclaimed"))
                .collect();
            println!("held {}", claims.len());
            std::thread::sleep(std::time::Duration::from_secs(60));
            return;
        }
        let ports = cluster_ports(4).unwrap().to_vec();
        let list = ports.iter().map(u16::to_string).collect::<Vec<_>>();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "proc::ports::tests::a_claim_holds_across_processes_until_its_holder_dies",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HOLD_ENV, list.join(","))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let held = out
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("held 4"));
        let claimed_elsewhere = ports.iter().all(|&p| claim(p).unwrap().is_none());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(held, "the child did not claim the ports");
        assert!(
            claimed_elsewhere,
            "ports {ports:?} claimed by another live process were free"
        );
        for port in ports {
            assert!(
                claim(port).unwrap().is_some(),
                "port {port} still claimed after its holder died"
            );
        }
    }
}
