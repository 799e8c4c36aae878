//! A cap on SQLite's heap for the whole process.
//!
//! Without it one request (`printf('%.*c', 999999999, 'x')`, a blob made
//! of a billion zeros) makes SQLite allocate gigabytes, and the next large
//! allocation — SQLite's or the answer's — fails outside SQLite, which
//! aborts the process and every tenant of the machine with it. With
//! `sqlite3_hard_heap_limit64`, an allocation past the cap fails inside
//! SQLite: the statement ends with SQLITE_NOMEM, its request is refused,
//! and the connection goes on.

use std::fmt;

/// The share of the machine's memory SQLite may use: the rest is for
/// answers on their way out, uploads, snapshot copies and the runtime.
const SHARE_PERCENT: u64 = 50;

/// Used when the machine's memory cannot be read.
const FALLBACK: u64 = 1 << 30;

/// Never less than this, whatever the flag says: tenantd's own statements
/// need room too.
const MINIMUM: u64 = 16 << 20;

/// `--sqlite-heap-limit`: `auto` or a size (`512MiB`, `2G`, `1048576`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeapLimit {
    Auto,
    Bytes(u64),
}

impl fmt::Display for HeapLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeapLimit::Auto => write!(f, "auto"),
            HeapLimit::Bytes(n) => write!(f, "{n}"),
        }
    }
}

impl HeapLimit {
    pub fn parse(text: &str) -> Result<HeapLimit, String> {
        if text.trim().eq_ignore_ascii_case("auto") {
            return Ok(HeapLimit::Auto);
        }
        parse_size(text).map(HeapLimit::Bytes)
    }

    /// The cap in bytes on this machine.
    pub fn bytes(self) -> u64 {
        match self {
            HeapLimit::Bytes(n) => n.max(MINIMUM),
            HeapLimit::Auto => machine_memory()
                .map_or(FALLBACK, |m| m / 100 * SHARE_PERCENT)
                .max(MINIMUM),
        }
    }

    /// Sets the cap for every SQLite connection of the process; returns it.
    pub fn apply(self) -> u64 {
        let bytes = self.bytes();
        // SAFETY: a plain setter of a process-wide value, callable at any
        // time from any thread.
        unsafe {
            rusqlite::ffi::sqlite3_hard_heap_limit64(bytes.min(i64::MAX as u64) as i64);
        }
        bytes
    }
}

/// The cap currently in force (0: none).
pub fn current_limit() -> u64 {
    // SAFETY: a negative argument only reads the value.
    unsafe { rusqlite::ffi::sqlite3_hard_heap_limit64(-1).max(0) as u64 }
}

/// A size in bytes with an optional unit: `k`/`KB` (1000), `KiB` (1024),
/// and likewise M, G.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size {text:?} (examples: 512MiB, 2GB, 1048576)"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "invalid size unit {other:?} in {text:?} (use KiB, MiB, GiB, KB, MB or GB)"
            ));
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// The memory this process may use: its cgroup's limit (v2, then v1),
/// else the machine's total.
pub fn machine_memory() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let cgroup = read("/sys/fs/cgroup/memory.max")
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
        .and_then(|t| t.trim().parse::<u64>().ok());
    let total = read("/proc/meminfo").and_then(|t| meminfo_total(&t));
    match (cgroup, total) {
        // v1 reports "no limit" as a huge number.
        (Some(c), Some(t)) => Some(c.min(t)),
        (Some(c), None) => Some(c),
        (None, t) => t,
    }
}

fn meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_auto_parse() {
        assert_eq!(HeapLimit::parse("auto"), Ok(HeapLimit::Auto));
        assert_eq!(HeapLimit::parse("128MiB"), Ok(HeapLimit::Bytes(128 << 20)));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn meminfo_is_read_in_kib() {
        let text = "MemTotal:       24516056 kB\nMemFree: 1 kB\n";
        assert_eq!(meminfo_total(text), Some(24516056 * 1024));
    }

    #[test]
    fn auto_is_a_share_of_the_machine_and_never_below_the_minimum() {
        let auto = HeapLimit::Auto.bytes();
        assert!(auto >= MINIMUM);
        if let Some(m) = machine_memory() {
            assert!(auto <= m.max(MINIMUM));
        }
        assert_eq!(HeapLimit::Bytes(1).bytes(), MINIMUM);
    }
}
