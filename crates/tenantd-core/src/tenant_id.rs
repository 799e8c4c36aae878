//! Tenant ids: `^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$`. Only a [`TenantId`] ever
//! reaches an object key, a file path or a DNS name.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid tenant id {shown:?}: ids are 1-63 characters of A-Z, a-z, 0-9, '_' and '-', starting with a letter or digit"
)]
pub struct InvalidTenantId {
    shown: String,
}

impl TenantId {
    pub fn parse(text: &str) -> Result<TenantId, InvalidTenantId> {
        let bytes = text.as_bytes();
        let valid = !bytes.is_empty()
            && bytes.len() <= 63
            && bytes[0].is_ascii_alphanumeric()
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-');
        if valid {
            Ok(TenantId(text.to_string()))
        } else {
            // Never echo unbounded or control characters back.
            let shown: String = text
                .chars()
                .take(70)
                .map(|c| if c.is_control() { '\u{fffd}' } else { c })
                .collect();
            Err(InvalidTenantId { shown })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_contract_pattern() {
        for ok in ["1", "100", "a", "A-b_c", &"x".repeat(63)] {
            assert!(TenantId::parse(ok).is_ok(), "{ok} rejected");
        }
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            "../x",
            "a.b",
            "_a",
            "-a",
            "a/b",
            "a\0b",
            "a%2Fb",
            "é",
            &"x".repeat(64),
            &"y".repeat(200),
        ] {
            assert!(TenantId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
