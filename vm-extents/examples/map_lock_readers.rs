//! What the memory map's read side costs when many threads take it at once, as every fault
//! handler thread does once per fault: T threads each take and drop the read guard (and read
//! one extent's state, as a fault does) in a loop for a fixed time; prints acquisitions per
//! second in total and the cost of one, per T. Run with
//! `cargo run --release -p vm-extents --example map_lock_readers [SECONDS]`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vm_extents::{Backing, EXTENT_SIZE, ExtentTable, GuestRam, MemoryMap};
use vm_memory::GuestAddress;

fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let size = 64 * EXTENT_SIZE;
    let ram = Arc::new(GuestRam::new(size, Backing::Small).expect("map guest RAM"));
    let map = Arc::new(MemoryMap::new(ExtentTable::new(size), ram));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("memory map read side, {seconds} s per count, on a {cpus}-CPU host");
    println!("{:>8} {:>16} {:>14}", "threads", "acquires/s", "ns each");
    for threads in [1usize, 2, 4, 8, 16] {
        let stop = Arc::new(AtomicBool::new(false));
        let total = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (map, stop, total) = (map.clone(), stop.clone(), total.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    let at = GuestAddress((t % 64) as u64 * EXTENT_SIZE);
                    let index = map.ram().extent_of(at).expect("inside RAM");
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..256 {
                            let guard = map.read();
                            std::hint::black_box(guard.get(index).map(|e| e.state()));
                        }
                        n += 256;
                    }
                    total.fetch_add(n, Ordering::Relaxed);
                })
            })
            .collect();
        let start = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(seconds));
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().expect("reader thread");
        }
        let elapsed = start.elapsed().as_secs_f64();
        let rate = total.load(Ordering::Relaxed) as f64 / elapsed;
        // CPU time per acquisition: the threads share min(threads, cpus) CPUs.
        let busy = threads.min(cpus) as f64;
        println!("{threads:>8} {rate:>16.0} {:>14.1}", busy * 1e9 / rate);
    }
}
