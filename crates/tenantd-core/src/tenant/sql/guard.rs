//! What a tenant's SQL may do, decided by SQLite itself: the authorizer
//! sees every table, pragma, function and schema change a statement makes
//! as it is prepared (including through views and triggers), and the
//! progress handler interrupts a statement that runs past its deadline.
//!
//! Both are installed once per connection and stay installed: tenantd's
//! own statements run in "internal" mode, where everything is allowed
//! except reaching tenantd's tables through a view or trigger (which a
//! tenant could have created), and a request's statements run in "user"
//! mode while [`Guard::enter`]'s scope lasts.
//!
//! An action the guard does not recognise is denied in every mode: SQLite
//! reports `ATTACH ?` (a file name only known when it runs) as such an
//! action. SQLite's own limits and hardening switches are [`super::limits`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};

/// Pragmas a request may run. Most only read; `user_version` may also be
/// set, because it belongs to the application (migration tools use it).
const ALLOWED_PRAGMAS: &[&str] = &[
    "application_id",
    "collation_list",
    "compile_options",
    "data_version",
    "encoding",
    "foreign_key_check",
    "foreign_key_list",
    "freelist_count",
    "function_list",
    "index_info",
    "index_list",
    "index_xinfo",
    "integrity_check",
    "module_list",
    "page_count",
    "page_size",
    "pragma_list",
    "quick_check",
    "schema_version",
    "table_info",
    "table_list",
    "table_xinfo",
    "user_version",
];

/// Pragmas that set a value when given one (rather than take an argument).
const SETTING_PRAGMAS: &[&str] = &["application_id", "encoding", "page_size", "schema_version"];

/// Virtual table modules a request may create: they keep their data in
/// ordinary tables of the same database file.
const ALLOWED_MODULES: &[&str] = &["fts3", "fts4", "fts5", "rtree", "rtree_i32"];

/// Prefix of tenantd's own tables.
const INTERNAL_PREFIX: &str = "tenantd_";

/// The counter's table: a request may read and change its rows, not its
/// shape, or the counter routes would break.
const COUNTER_TABLE: &str = "welcome";

#[derive(Default)]
struct State {
    user: bool,
    deadline: Option<Instant>,
    /// The rule that refused the last denied action, for the error message.
    denial: Option<String>,
}

/// Shared between the connection's callbacks and the code that runs
/// statements on it.
#[derive(Clone, Default)]
pub struct Guard {
    state: Arc<Mutex<State>>,
}

/// While alive, statements prepared on the connection are a request's.
pub struct UserScope<'a> {
    guard: &'a Guard,
}

impl Drop for UserScope<'_> {
    fn drop(&mut self) {
        let mut state = self.guard.lock();
        state.user = false;
        state.deadline = None;
    }
}

impl Guard {
    /// Installs the authorizer and the progress handler on `conn`.
    pub fn install(conn: &mut Connection) -> rusqlite::Result<Guard> {
        let guard = Guard::default();
        let authorizer = guard.clone();
        conn.authorizer(Some(move |ctx: AuthContext<'_>| authorizer.authorize(ctx)))?;
        let clock = guard.clone();
        // Every 1,000 virtual machine instructions: a few microseconds.
        conn.progress_handler(
            1_000,
            Some(move || clock.lock().deadline.is_some_and(|d| Instant::now() >= d)),
        )?;
        Ok(guard)
    }

    /// Statements prepared and run until the scope ends are a request's.
    pub fn enter(&self, timeout: Duration) -> UserScope<'_> {
        let mut state = self.lock();
        state.user = true;
        state.deadline = Some(Instant::now() + timeout);
        state.denial = None;
        UserScope { guard: self }
    }

    /// The rule behind the last denial, if the last error was one.
    pub fn take_denial(&self) -> Option<String> {
        self.lock().denial.take()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn authorize(&self, ctx: AuthContext<'_>) -> Authorization {
        let mut state = self.lock();
        match rule(&state, &ctx) {
            None => Authorization::Allow,
            Some(rule) => {
                state.denial = Some(rule);
                Authorization::Deny
            }
        }
    }
}

/// The rule `ctx` breaks, if any.
fn rule(state: &State, ctx: &AuthContext<'_>) -> Option<String> {
    // Whoever runs it: an action the guard cannot read is one it cannot
    // vouch for (SQLite reports `ATTACH ?` with no file name, say).
    if let AuthAction::Unknown { code, .. } = ctx.action {
        return Some(unknown_rule(code));
    }
    if let Some(name) = object_of(&ctx.action)
        && is_internal(name)
        && (state.user || ctx.accessor.is_some())
    {
        return Some(format!(
            "{name} is one of tenantd's own tables (tenantd_*), which requests cannot read or change"
        ));
    }
    // A view or trigger is the tenant's code, even when tenantd's own
    // statement runs it.
    if !state.user && ctx.accessor.is_none() {
        return None;
    }
    action_rule(&ctx.action).or_else(|| {
        ctx.database_name.filter(|db| *db != "main").map(|db| {
            format!("only the tenant's own database (\"main\") can be used, not {db:?}: temporary and attached databases live outside it and never reach the store")
        })
    })
}

const ATTACH_RULE: &str =
    "ATTACH and DETACH are not allowed: a request works on its tenant's database only";

fn unknown_rule(code: i32) -> String {
    if code == rusqlite::ffi::SQLITE_ATTACH || code == rusqlite::ffi::SQLITE_DETACH {
        return ATTACH_RULE.into();
    }
    format!(
        "SQLite asked to authorize action {code}, which tenantd does not know; what it does not know it denies"
    )
}

fn action_rule(action: &AuthAction<'_>) -> Option<String> {
    use AuthAction::*;
    match action {
        Attach { .. } | Detach { .. } => Some(ATTACH_RULE.into()),
        AuthAction::Transaction { .. } | AuthAction::Savepoint { .. } => Some(
            "transaction control (BEGIN, COMMIT, ROLLBACK, SAVEPOINT) is tenantd's: every request already runs in one transaction".into(),
        ),
        AuthAction::Pragma {
            pragma_name,
            pragma_value,
        } => pragma_rule(pragma_name, *pragma_value),
        AuthAction::Function { function_name }
            if function_name.eq_ignore_ascii_case("load_extension") =>
        {
            Some("load_extension() is not allowed".into())
        }
        AuthAction::CreateTempIndex { .. }
        | AuthAction::CreateTempTable { .. }
        | AuthAction::CreateTempTrigger { .. }
        | AuthAction::CreateTempView { .. }
        | AuthAction::DropTempIndex { .. }
        | AuthAction::DropTempTable { .. }
        | AuthAction::DropTempTrigger { .. }
        | AuthAction::DropTempView { .. } => Some(
            "temporary tables, views and triggers are not allowed: they live outside the tenant's database and would never reach the store".into(),
        ),
        AuthAction::CreateVtable { module_name, .. }
            if !ALLOWED_MODULES
                .iter()
                .any(|m| m.eq_ignore_ascii_case(module_name)) =>
        {
            Some(format!(
                "virtual tables of module {module_name} are not allowed (allowed: {})",
                ALLOWED_MODULES.join(", ")
            ))
        }
        AuthAction::DropTable { table_name }
        | AuthAction::AlterTable { table_name, .. }
        | AuthAction::CreateTrigger { table_name, .. }
            if table_name.eq_ignore_ascii_case(COUNTER_TABLE) =>
        {
            Some(format!(
                "the counter's table {COUNTER_TABLE} cannot be dropped, altered or given triggers (its rows can be read and changed)"
            ))
        }
        Select
        | Read { .. }
        | Insert { .. }
        | Update { .. }
        | Delete { .. }
        | Function { .. }
        | Recursive
        | CreateTable { .. }
        | CreateIndex { .. }
        | CreateTrigger { .. }
        | CreateView { .. }
        | CreateVtable { .. }
        | DropTable { .. }
        | DropIndex { .. }
        | DropTrigger { .. }
        | DropView { .. }
        | DropVtable { .. }
        | AlterTable { .. }
        | Analyze { .. }
        | Reindex { .. } => None,
        other => Some(format!(
            "{other:?} is not an action tenantd knows; what it does not know it denies"
        )),
    }
}

fn pragma_rule(name: &str, value: Option<&str>) -> Option<String> {
    let name = name.to_ascii_lowercase();
    let allowed = ALLOWED_PRAGMAS.contains(&name.as_str());
    let sets = value.is_some() && SETTING_PRAGMAS.contains(&name.as_str());
    if allowed && !sets {
        return None;
    }
    Some(format!(
        "PRAGMA {name}{} is not allowed: requests may run only the read-only pragmas {} (and set user_version); the rest are tenantd's",
        if value.is_some() { " with a value" } else { "" },
        ALLOWED_PRAGMAS.join(", ")
    ))
}

/// The table, view or index-owning table an action names.
fn object_of<'a>(action: &AuthAction<'a>) -> Option<&'a str> {
    use AuthAction::*;
    match *action {
        CreateIndex { table_name, .. }
        | CreateTable { table_name }
        | CreateTrigger { table_name, .. }
        | Delete { table_name }
        | DropIndex { table_name, .. }
        | DropTable { table_name }
        | DropTrigger { table_name, .. }
        | Insert { table_name }
        | Read { table_name, .. }
        | Update { table_name, .. }
        | AlterTable { table_name, .. }
        | Analyze { table_name }
        | CreateVtable { table_name, .. }
        | DropVtable { table_name, .. } => Some(table_name),
        CreateView { view_name } | DropView { view_name } => Some(view_name),
        _ => None,
    }
}

fn is_internal(name: &str) -> bool {
    // Bytes, not characters: a name may have a multibyte character
    // straddling the prefix's length.
    name.as_bytes()
        .get(..INTERNAL_PREFIX.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(INTERNAL_PREFIX.as_bytes()))
}

/// What the authorizer never sees: VACUUM (which, with INTO, writes a file
/// anywhere the process may write), and a virtual table's arguments.
pub fn denied_by_keyword(sql: &str) -> Option<&'static str> {
    let words = leading_words(sql, 2);
    let is = |i: usize, word: &str| words.get(i).is_some_and(|w| w.eq_ignore_ascii_case(word));
    if is(0, "vacuum") {
        return Some(
            "VACUUM is not allowed: tenantd compacts the database itself, and VACUUM INTO writes files outside it",
        );
    }
    if is(0, "create") && is(1, "virtual") && names_a_compress_function(sql) {
        return Some(
            "the FTS options compress= and uncompress= are not allowed: they name SQL functions that every read and write of the table runs, and a wrong pair leaves an index that fails its integrity check",
        );
    }
    None
}

/// Whether `sql` has an argument `compress=` or `uncompress=` (in any
/// case, with quotes or spaces before the `=`: a superset of what FTS3/4
/// read as the option).
fn names_a_compress_function(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    lower.match_indices("compress").any(|(at, word)| {
        lower[at + word.len()..]
            .trim_start_matches(|c: char| c.is_whitespace() || "\"'`]".contains(c))
            .starts_with('=')
    })
}

/// The first `n` words of a statement, skipping whitespace and comments.
fn leading_words(sql: &str, n: usize) -> Vec<&str> {
    let mut words = Vec::with_capacity(n);
    let mut rest = sql;
    while words.len() < n {
        let Some(word) = first_keyword(rest) else {
            break;
        };
        words.push(word);
        // `word` is a slice of `rest`: continue after it.
        let end = word.as_ptr() as usize - rest.as_ptr() as usize + word.len();
        rest = &rest[end..];
    }
    words
}

/// The first word of a statement, after whitespace and comments.
pub fn first_keyword(sql: &str) -> Option<&str> {
    let mut rest = sql;
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix("--") {
            rest = after.split_once('\n').map_or("", |(_, r)| r);
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.split_once("*/").map_or("", |(_, r)| r);
        } else {
            break;
        }
    }
    let end = rest
        .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .unwrap_or(rest.len());
    (end > 0).then(|| &rest[..end])
}

#[cfg(test)]
#[path = "guard_tests.rs"]
mod tests;
