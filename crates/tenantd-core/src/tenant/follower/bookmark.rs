//! The consistency headers of every answer that reflects committed state,
//! and of requests that ask for a state at least so new. Built here only,
//! so that every route (counter, SQL, Hrana) says the same thing.
//!
//! A bookmark is the log slot of the newest state an answer reflects:
//! every slot up to it is confirmed in the store, and slots only grow,
//! across epochs too (a new holder's fences come after everything its
//! predecessor could confirm). So two bookmarks of a tenant compare as
//! numbers, whichever machine gave them. Clients treat it as opaque.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};

pub const BOOKMARK: &str = "tenantd-bookmark";
pub const SERVED_BY: &str = "tenantd-served-by";
pub const ROLE: &str = "tenantd-role";
pub const MAX_STALENESS: &str = "tenantd-max-staleness";

/// Who answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Holder,
    Follower,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Holder => "holder",
            Role::Follower => "follower",
        }
    }
}

/// What a read asks of the state it is answered from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Wanted {
    /// At least this slot (`tenantd-bookmark`).
    pub bookmark: Option<u64>,
    /// A replica known to hold every write acknowledged this long ago
    /// may answer at once (`tenantd-max-staleness`).
    pub max_staleness: Option<Duration>,
}

/// Reads the request's consistency headers; the error names the header
/// and what to send instead.
pub fn wanted(headers: &HeaderMap) -> Result<Wanted, String> {
    let text = |name: &str| -> Result<Option<String>, String> {
        match headers.get(name) {
            None => Ok(None),
            Some(value) => value
                .to_str()
                .map(|v| Some(v.trim().to_string()))
                .map_err(|_| format!("{name} must be visible ASCII")),
        }
    };
    let bookmark = match text(BOOKMARK)? {
        None => None,
        Some(value) if value.is_empty() => None,
        Some(value) => Some(parse(&value).ok_or_else(|| {
            format!(
                "{BOOKMARK} {value:?} is not a bookmark tenantd gave: send back the {BOOKMARK} header of an earlier answer unchanged, or none"
            )
        })?),
    };
    let max_staleness = match text(MAX_STALENESS)? {
        None => None,
        Some(value) => Some(Duration::from_millis(value.parse::<u64>().map_err(
            |_| format!("{MAX_STALENESS} {value:?} must be a number of milliseconds, e.g. 500"),
        )?)),
    };
    Ok(Wanted {
        bookmark,
        max_staleness,
    })
}

/// The bookmark of the state after `slot`, as sent.
pub fn format(slot: u64) -> String {
    slot.to_string()
}

/// A bookmark as sent back by a client.
pub fn parse(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Marks an answer: the state it reflects, the machine and its role.
pub fn stamp(headers: &mut HeaderMap, slot: u64, machine_id: &str, role: Role) {
    headers.insert(
        BOOKMARK,
        HeaderValue::from_str(&format(slot)).expect("digits are header-safe"),
    );
    stamp_role(headers, machine_id, role);
}

/// Who answered, on an answer that reflects no state (a refusal).
pub fn stamp_role(headers: &mut HeaderMap, machine_id: &str, role: Role) {
    if let Ok(machine) = HeaderValue::from_str(machine_id) {
        headers.insert(SERVED_BY, machine);
    }
    headers.insert(ROLE, HeaderValue::from_static(role.as_str()));
}

/// The headers a proxied answer keeps (forward mode, the dev edge).
pub const ANSWER_HEADERS: [&str; 3] = [BOOKMARK, SERVED_BY, ROLE];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bookmarks_round_trip_and_refuse_anything_else() {
        assert_eq!(parse(&format(42)), Some(42));
        for bad in ["", "-1", "1.5", "abc", " 1", "99999999999999999999999"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn wanted_reads_both_headers_and_names_the_bad_one() {
        let mut headers = HeaderMap::new();
        headers.insert(BOOKMARK, HeaderValue::from_static("17"));
        headers.insert(MAX_STALENESS, HeaderValue::from_static("250"));
        assert_eq!(
            wanted(&headers).unwrap(),
            Wanted {
                bookmark: Some(17),
                max_staleness: Some(Duration::from_millis(250)),
            }
        );
        headers.insert(BOOKMARK, HeaderValue::from_static("x"));
        assert!(wanted(&headers).unwrap_err().contains(BOOKMARK));
        headers.remove(BOOKMARK);
        headers.insert(MAX_STALENESS, HeaderValue::from_static("soon"));
        assert!(wanted(&headers).unwrap_err().contains(MAX_STALENESS));
    }
}
