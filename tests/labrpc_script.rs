//! `labrpc::script` on replies: a chosen reply is held and released in a chosen order,
//! dropped after its handler ran, or delayed; a reply rule that would duplicate is refused.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel;
use parking_lot::Mutex;
use raftkv::labrpc::script::{Dir, Rule};
use raftkv::labrpc::{ClientEnd, Network, RpcError, Server, Service};

const WAIT: Duration = Duration::from_secs(10);

/// A network cleaned up when the test ends.
struct Net(Network);

impl Drop for Net {
    fn drop(&mut self) {
        self.0.cleanup();
    }
}

/// Server `srv` with `Echo.Double` (records each argument it handled), and one end for
/// each owner in `owners`, labelled with it.
fn setup(owners: &[&str]) -> (Net, Arc<Mutex<Vec<i64>>>, Vec<ClientEnd>) {
    let net = Net(Network::new());
    let handled = Arc::new(Mutex::new(Vec::new()));
    let h = handled.clone();
    let mut server = Server::new();
    server.add_service(Service::new("Echo").method("Double", move |x: i64| -> i64 {
        h.lock().push(x);
        2 * x
    }));
    net.0.add_server("srv", server);
    let ends = owners
        .iter()
        .map(|o| {
            let name = format!("{o}-to-srv");
            let e = net.0.make_end(&name).expect("fresh end name");
            net.0.connect(&name, "srv");
            net.0.enable(&name, true);
            net.0.set_end_owner(&name, o);
            e
        })
        .collect();
    (net, handled, ends)
}

/// Sends `x` from `end` without waiting; the outcome arrives on `tx` tagged with `x`.
fn send(end: &ClientEnd, x: i64, tx: &channel::Sender<(i64, Result<i64, RpcError>)>) {
    let tx = tx.clone();
    end.call_async("Echo.Double", &x, move |r: Result<i64, RpcError>| {
        let _ = tx.send((x, r));
    });
}

#[test]
fn chosen_replies_are_held_and_released_late_in_a_chosen_order() {
    let (net, handled, ends) = setup(&["a", "b"]);
    let s = net.0.script();
    // Every reply to `a` whose content is a multiple of 4 (requests 2 and 6), none to `b`.
    let rule = s.add(
        Rule::reply("Echo.Double")
            .to("a")
            .when("a multiple of 4", |r: &i64| r % 4 == 0)
            .hold(),
    );
    let (tx, rx) = channel::unbounded();
    send(&ends[0], 2, &tx);
    send(&ends[0], 6, &tx);
    let held = s.wait_held(2, WAIT).expect("both replies held");
    assert!(
        held.iter()
            .all(|h| h.dir == Dir::Reply && h.to == "a" && h.from == "srv")
    );
    let mut contents: Vec<i64> = held.iter().map(|h| h.decode().expect("an i64")).collect();
    contents.sort_unstable();
    assert_eq!(contents, vec![4, 12]);
    // Their handlers have run: a held reply is an answer on its way back, not a request.
    let mut ran = handled.lock().clone();
    ran.sort_unstable();
    assert_eq!(ran, vec![2, 6]);
    // Later calls overtake them: another content to `a`, the same content to `b`.
    send(&ends[0], 3, &tx);
    send(&ends[1], 2, &tx);
    let mut early: Vec<(i64, Result<i64, RpcError>)> = (0..2)
        .map(|_| rx.recv_timeout(WAIT).expect("an answer"))
        .collect();
    early.sort_by_key(|(x, _)| *x);
    assert_eq!(early, vec![(2, Ok(4)), (3, Ok(6))]);
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "a held reply arrived"
    );
    // Released 12 first, then 4: they arrive in that order, after everything else.
    let by = |v: i64| {
        held.iter()
            .find(|h| h.decode::<i64>() == Some(v))
            .expect("held")
            .id
    };
    assert!(s.release(by(12)));
    assert_eq!(
        rx.recv_timeout(WAIT).expect("the released reply"),
        (6, Ok(12))
    );
    assert!(s.release(by(4)));
    assert_eq!(
        rx.recv_timeout(WAIT).expect("the released reply"),
        (2, Ok(4))
    );
    assert_eq!(s.matched(rule), 2);
    assert!(s.held().is_empty());
}

#[test]
fn a_chosen_reply_is_dropped_after_its_handler_ran_and_another_is_delayed() {
    let (net, handled, ends) = setup(&["a"]);
    let s = net.0.script();
    s.add(Rule::any_reply().to("a").first(1).drop_it());
    assert_eq!(
        ends[0].call::<i64, i64>("Echo.Double", &5),
        Err(RpcError::NoReply)
    );
    assert_eq!(
        *handled.lock(),
        vec![5],
        "the handler ran, its answer was lost"
    );
    s.clear_rules();
    let delay = Duration::from_millis(300);
    s.add(Rule::reply("Echo.Double").to("a").delay(delay));
    let start = Instant::now();
    assert_eq!(ends[0].call::<i64, i64>("Echo.Double", &7), Ok(14));
    assert!(
        start.elapsed() >= delay,
        "answered in {:?}",
        start.elapsed()
    );
    let events = s.events();
    assert!(
        events
            .iter()
            .any(|e| e.contains("drop reply Echo.Double srv->a"))
            && events
                .iter()
                .any(|e| e.contains("delay 300ms reply Echo.Double srv->a")),
        "{events:#?}"
    );
}

#[test]
fn a_rule_that_would_duplicate_a_reply_is_refused() {
    for dup in [Rule::duplicate as fn(Rule) -> Rule, Rule::duplicate_later] {
        let made = std::panic::catch_unwind(|| {
            let _ = dup(Rule::reply("Raft.InstallSnapshot").to("x"));
        });
        let Err(err) = made else {
            panic!("a reply rule that duplicates was accepted");
        };
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("a reply cannot be duplicated"), "{msg}");
    }
    // Requests still can be.
    let _ = Rule::request("Raft.InstallSnapshot").duplicate_later();
}
