//! lockbench: times joining a datastore and uncontended lock acquire + release.
//!
//! `lockbench DEVICE HOST ITERATIONS` prints one JSON line: join time, and the median and
//! 90th percentile of acquire + release (each a volume-lease Disk Paxos round, a lock
//! record write and a heartbeat scan, twice). Used by scripts/bench-lock.sh.

use std::sync::Arc;
use std::time::Instant;

use datastore::hostlease::HostLease;
use datastore::{locks, Datastore, LockMode, Observer};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    assert!(a.len() == 4, "usage: lockbench DEVICE HOST ITERATIONS");
    let n: usize = a[3].parse().expect("iterations");
    let ds = Arc::new(Datastore::open(std::path::Path::new(&a[1])).expect("open datastore"));
    let t = Instant::now();
    let lease = HostLease::join(Arc::clone(&ds), &a[2], "", Box::new(|_| {})).expect("join");
    let join_ms = t.elapsed().as_secs_f64() * 1e3;
    let me = lease.owner();
    let mut obs = Observer::new(&ds);
    let mut times: Vec<f64> = (0..n)
        .map(|i| {
            let object = format!("bench-{}", i % 8);
            let t = Instant::now();
            locks::try_acquire(&ds, me, &mut obs, &object, LockMode::Exclusive).expect("acquire");
            locks::release(&ds, me, &mut obs, &object).expect("release");
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    lease.leave().expect("leave");
    times.sort_by(|x, y| x.partial_cmp(y).unwrap());
    println!(
        "{{\"join_ms\": {join_ms:.1}, \"acquire_release_median_ms\": {:.2}, \"acquire_release_p90_ms\": {:.2}, \"iterations\": {n}}}",
        times[n / 2],
        times[n * 9 / 10]
    );
}
