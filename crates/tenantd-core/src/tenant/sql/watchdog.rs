//! Deadlines for everything that runs on a tenant's connection, enforced
//! from outside it.
//!
//! The progress handler only runs between virtual machine instructions,
//! and one instruction can do a lot of work (a huge `printf` or
//! `zeroblob`, an index build, a cascade fired by tenantd's own UPDATE of
//! the counter). One thread per process watches every armed deadline and
//! calls `sqlite3_interrupt` on the connection whose deadline passed; the
//! interrupt is seen at the next check SQLite makes (loops over rows,
//! sorts, b-tree walks), not only at the next instruction boundary.
//!
//! On shutdown every armed connection is interrupted at once, and work
//! armed later gets [`SHUTDOWN_GRACE`] at most, so that no statement keeps
//! the process from exiting while the drain's short commits still land.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use rusqlite::InterruptHandle;

/// The most time work armed after shutdown began may take.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// Why an armed scope was interrupted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    Deadline,
    Shutdown,
}

struct Entry {
    deadline: Instant,
    handle: Arc<InterruptHandle>,
    fired: Option<Cause>,
}

#[derive(Default)]
struct State {
    next: u64,
    armed: BTreeMap<u64, Entry>,
    shutting_down: bool,
    thread: bool,
}

#[derive(Default)]
pub struct Watchdog {
    state: Mutex<State>,
    wake: Condvar,
}

/// While alive, the connection is interrupted when its deadline passes.
pub struct Armed<'a> {
    watchdog: &'a Watchdog,
    id: u64,
}

impl Armed<'_> {
    /// Whether (and why) the watchdog interrupted the connection.
    pub fn fired(&self) -> Option<Cause> {
        self.watchdog
            .lock()
            .armed
            .get(&self.id)
            .and_then(|e| e.fired)
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        // Under the lock the watchdog takes to interrupt: once removed, no
        // interrupt for this scope can arrive later. One that arrived just
        // before is cleared by SQLite when the connection's next statement
        // starts with none running.
        self.watchdog.lock().armed.remove(&self.id);
    }
}

/// The process's watchdog.
pub fn global() -> &'static Watchdog {
    static WATCHDOG: OnceLock<Watchdog> = OnceLock::new();
    WATCHDOG.get_or_init(Watchdog::default)
}

impl Watchdog {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Interrupts `handle`'s connection once `timeout` has passed, until
    /// the returned scope ends.
    pub fn arm(&'static self, handle: &Arc<InterruptHandle>, timeout: Duration) -> Armed<'static> {
        let deadline = Instant::now()
            .checked_add(timeout)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
        let mut state = self.lock();
        let id = state.next;
        state.next += 1;
        let mut entry = Entry {
            deadline,
            handle: handle.clone(),
            fired: None,
        };
        if state.shutting_down {
            // Short work (the drain's last commits) still completes.
            entry.deadline = entry.deadline.min(Instant::now() + SHUTDOWN_GRACE);
        }
        state.armed.insert(id, entry);
        if !state.thread {
            state.thread = true;
            std::thread::Builder::new()
                .name("sql-watchdog".into())
                .spawn(move || self.watch())
                .expect("spawn the SQL watchdog thread");
        }
        drop(state);
        self.wake.notify_one();
        Armed { watchdog: self, id }
    }

    /// Interrupts every armed connection, and bounds what is armed later.
    pub fn shut_down(&self) {
        let mut state = self.lock();
        state.shutting_down = true;
        for entry in state.armed.values_mut() {
            entry.handle.interrupt();
            entry.fired.get_or_insert(Cause::Shutdown);
        }
    }

    fn watch(&self) {
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            let mut next: Option<Instant> = None;
            let shutting_down = state.shutting_down;
            for entry in state.armed.values_mut() {
                if entry.fired.is_some() {
                    continue;
                }
                if entry.deadline <= now {
                    entry.handle.interrupt();
                    entry.fired = Some(match shutting_down {
                        true => Cause::Shutdown,
                        false => Cause::Deadline,
                    });
                } else {
                    next = Some(next.map_or(entry.deadline, |n| n.min(entry.deadline)));
                }
            }
            state = match next {
                Some(at) => {
                    self.wake
                        .wait_timeout(state, at.saturating_duration_since(now))
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.wake.wait(state).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    const FOREVER: &str =
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c";

    #[test]
    fn a_statement_past_its_deadline_is_interrupted() {
        let conn = Connection::open_in_memory().unwrap();
        let handle = Arc::new(conn.get_interrupt_handle());
        let armed = global().arm(&handle, Duration::from_millis(50));
        let err = conn
            .query_row(FOREVER, [], |r| r.get::<_, i64>(0))
            .unwrap_err();
        assert_eq!(
            err.sqlite_error_code(),
            Some(rusqlite::ErrorCode::OperationInterrupted)
        );
        assert_eq!(armed.fired(), Some(Cause::Deadline));
        drop(armed);
        // The connection is usable again once the scope ended.
        let one: i64 = conn.query_row("SELECT 1", [], |r| r.get(0)).unwrap();
        assert_eq!(one, 1);
    }

    #[test]
    fn a_scope_that_ends_in_time_is_not_interrupted() {
        let conn = Connection::open_in_memory().unwrap();
        let handle = Arc::new(conn.get_interrupt_handle());
        let armed = global().arm(&handle, Duration::from_secs(60));
        let one: i64 = conn.query_row("SELECT 1", [], |r| r.get(0)).unwrap();
        assert_eq!((one, armed.fired()), (1, None));
    }
}
