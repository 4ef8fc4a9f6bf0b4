//! Units: QEMU's number syntax, sizes with suffixes and durations, parsed and printed the
//! same way wherever they appear (rule keys, `--rule`, control commands, sector lists and
//! the command line). Pure text in, value out; the callers turn a `None` or an error into
//! their own error, which names the key and where it was (`config/`).

use std::time::Duration;

/// Parses QEMU's unsigned number syntax: decimal, `0x` hex, leading-`0` octal.
pub fn parse_number(text: &str) -> Option<u64> {
    let t = text.trim();
    let parsed = if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        u64::from_str_radix(&t[1..], 8)
    } else {
        t.parse::<u64>()
    };
    parsed.ok()
}

/// Parses a size with QEMU's suffixes (`4k`, `1M`, `1G`; plain bytes otherwise).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                _ => return Err(format!("'{text}': unknown size suffix '{c}'")),
            };
            (&t[..i], mult)
        }
        _ => (t, 1),
    };
    let n = parse_number(digits).ok_or_else(|| format!("'{text}' is not a size"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{text}' is too large"))
}

/// A duration (faults §2): `250us`, `5ms`, `1.5s`, or a bare number of milliseconds; at
/// most a day (a longer delay is a breakpoint, and `Instant` arithmetic stays exact).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let t = text.trim();
    let (number, unit_us) = if let Some(n) = t.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1e6)
    } else {
        (t, 1e3)
    };
    let n: f64 = number.trim().parse().ok()?;
    let us = n * unit_us;
    if !us.is_finite() || !(0.0..=86_400e6).contains(&us) {
        return None;
    }
    Some(Duration::from_micros(us.round() as u64))
}

/// `1.5ms`-style text for a duration (microsecond precision, the unit the trace uses).
pub fn duration_text(d: Duration) -> String {
    let us = d.as_micros();
    if us.is_multiple_of(1_000_000) {
        format!("{}s", us / 1_000_000)
    } else if us.is_multiple_of(1_000) {
        format!("{}ms", us / 1_000)
    } else {
        format!("{us}us")
    }
}
