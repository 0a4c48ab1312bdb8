//! Bench (b), Rust: the loop of loop.c in a binary that can unwind. With a
//! second argument K, the K-th call panics through `work` and main catches it
//! (a uretprobe on `work` would then abort the program).
//! Usage: loop_rs CALLS [PANIC_AT]. Prints `calls=N loop_ns=T cpu_ns=C`.
use std::{hint::black_box, time::Instant};

static mut PANIC_AT: i64 = -1;

#[inline(never)]
fn work(x: i32) -> i32 {
    let v = black_box([x, x + 1]);
    // SAFETY: written once before the loop, on this thread.
    if i64::from(x) == unsafe { PANIC_AT } {
        panic!("bench: planned panic");
    }
    v[0] * 3 + v[1]
}

fn cpu_ns() -> i64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split(' ').collect();
    let ticks: i64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
    ticks * 10_000_000
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let calls: i64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let panic_at: i64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(-1);
    // SAFETY: no other thread runs yet.
    unsafe { PANIC_AT = panic_at };
    if panic_at >= 0 {
        std::panic::set_hook(Box::new(|_| {}));
    }
    let mut sink = 0i32;
    let mut caught = 0;
    let start = Instant::now();
    for i in 0..calls {
        match std::panic::catch_unwind(|| work(i as i32)) {
            Ok(value) => sink = sink.wrapping_add(value),
            Err(_) => caught += 1,
        }
    }
    let loop_ns = start.elapsed().as_nanos();
    black_box(sink);
    println!("calls={calls} loop_ns={loop_ns} cpu_ns={} caught={caught}", cpu_ns());
}
