//! The rule engine's decision path, timed without FUSE: what every request pays before its
//! I/O (one `fire` of its event, one `check`). `cargo bench` prints nanoseconds per
//! operation for 0, 100 and 10,000 rules armed on every event but never matching, plus one
//! matching rule, so the cost of a rule set can be read off directly; then standing rules
//! (no event) that match every request and act only by chance (`probability`, one seeded
//! draw per match) or by count (`skip`/`every`). This is a measurement, not a test: nothing
//! here asserts a time.

use std::hint::black_box;
use std::time::Instant;

use std::path::Path;

use blkdebugfs::config::parse_config_text;
use blkdebugfs::rules::{Engine, Event, IoType, Rule};

/// Events a raw FUSE view fires on its data path.
const EVENTS: [&str; 6] = [
    "read_aio",
    "write_aio",
    "pwritev",
    "pwritev_done",
    "flush_to_os",
    "flush_to_disk",
];

/// `n` inject-error rules spread over the data-path events, at sectors far past any request.
fn rules(n: usize) -> Vec<Rule> {
    let text: String = (0..n)
        .map(|i| {
            format!(
                "[inject-error]\nevent = \"{}\"\nerrno = \"5\"\nsector = \"{}\"\n",
                EVENTS[i % EVENTS.len()],
                (1u64 << 40) + i as u64
            )
        })
        .collect();
    parse_config_text(Path::new("bench.ini"), &text).expect("valid rules")
}

/// One `once` rule failing reads at sector 8.
fn once_rule() -> Rule {
    let text = "[inject-error]\nevent = \"read_aio\"\nsector = \"8\"\nonce = \"on\"\n";
    parse_config_text(Path::new("bench.ini"), text)
        .expect("valid rule")
        .remove(0)
}

/// `n` standing (event-less) `[inject-error]` rules matching every request, each with the
/// extra `keys` (e.g. `probability = "0.05"`).
fn standing(n: usize, keys: &str) -> Vec<Rule> {
    let text = format!("[inject-error]\nerrno = \"5\"\n{keys}\n").repeat(n);
    parse_config_text(Path::new("bench.ini"), &text).expect("valid rules")
}

/// Runs `f` `iters` times, five rounds; returns the best round's nanoseconds per call.
fn time(iters: u32, mut f: impl FnMut(u32)) -> f64 {
    (0..5)
        .map(|_| {
            let start = Instant::now();
            for i in 0..iters {
                f(i);
            }
            start.elapsed().as_nanos() as f64 / iters as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    // `cargo bench` passes `--bench`; without it (`cargo test --all-targets`) or with
    // `--quick`, a short smoke run.
    let full =
        std::env::args().any(|a| a == "--bench") && !std::env::args().any(|a| a == "--quick");
    let iters = if !full { 10_000 } else { 1_000_000 };
    println!("{:<56} {:>10}", "engine decision path", "ns/op");
    for n in [0, 100, 10_000] {
        let mut engine = Engine::new(rules(n));
        engine.fire(Event::None);
        let read = time(iters, |i| {
            black_box(engine.fire(Event::ReadAio));
            black_box(engine.check(IoType::Read, (i as u64 % 262_144) * 4096, 4096));
        });
        println!(
            "{:<56} {:>10.1}",
            format!("{n} rules: 4k read (fire + check)"),
            read
        );
        let write = time(iters, |i| {
            let offset = (i as u64 % 262_144) * 4096;
            black_box(engine.fire(Event::WriteAio));
            black_box(engine.fire(Event::Pwritev));
            black_box(engine.check(IoType::Write, offset, 4096));
            black_box(engine.fire(Event::PwritevDone));
        });
        println!(
            "{:<56} {:>10.1}",
            format!("{n} rules: 4k write (3 fires + check)"),
            write
        );
        let big = time(iters / 10, |i| {
            black_box(engine.fire(Event::ReadAio));
            black_box(engine.check(IoType::Read, (i as u64 % 1024) << 20, 1 << 20));
        });
        println!(
            "{:<56} {:>10.1}",
            format!("{n} rules: 1 MiB read (fire + check)"),
            big
        );
    }
    // A rule that matches: the failing path, including the `once` deletion. Adding and
    // deleting a rule rebuild the index of its event (here ~1,700 read_aio rules).
    let mut engine = Engine::new(rules(10_000));
    let hit = time(iters / 100, |_| {
        engine.add(once_rule());
        black_box(engine.fire(Event::ReadAio));
        black_box(engine.check(IoType::Read, 0, 4096));
    });
    println!(
        "{:<56} {:>10.1}",
        "10000 rules: add once-rule, fire, fail", hit
    );
    // Standing rules that match every 4k read and act only sometimes. A rule that matches
    // without acting counts the match and lets later rules see the request, so 100 rules at
    // 5% consult ~20 rules (and draw ~20 numbers) per read, and at 0% all 100: the cost of
    // never-acting rules that really are checked (scripts/bench.sh's standing-rule rows).
    // (name, rules, keys, fewer iterations for the slow cases)
    let cases: [(&str, usize, &str, u32); 5] = [
        ("1 standing p=0.05", 1, "probability = \"0.05\"", 1),
        ("100 standing p=0.05", 100, "probability = \"0.05\"", 100),
        ("100 standing p=0", 100, "probability = \"0\"", 100),
        (
            "1 standing skip=10 every=7",
            1,
            "skip = \"10\"\nevery = \"7\"",
            1,
        ),
        (
            "100 standing skip=10 every=1000",
            100,
            "skip = \"10\"\nevery = \"1000\"",
            10,
        ),
    ];
    for (name, n, keys, fewer) in cases {
        let mut engine = Engine::with_seed(standing(n, keys), 1);
        engine.fire(Event::None);
        let read = time(iters / fewer, |i| {
            black_box(engine.fire(Event::ReadAio));
            black_box(engine.check(IoType::Read, (i as u64 % 262_144) * 4096, 4096));
        });
        println!(
            "{:<56} {:>10.1}",
            format!("{name}: 4k read (fire + check)"),
            read
        );
    }
}
