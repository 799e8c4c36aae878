//! What the JSON parser cannot check of a request body, and the request's
//! fingerprint for idempotency keys.

use rusqlite::types::Value;
use sha2::{Digest, Sha256};

use super::{Params, SqlRequest};

/// Refuses an integer literal outside the 64-bit signed range. serde_json
/// turns one into a float before anyone sees it, so a parameter of
/// -99999999999999999999 would silently become a REAL; the literal text is
/// only here, in the body. Strings are skipped, so only numbers count.
pub fn check_integers(body: &[u8]) -> Result<(), String> {
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' => {
                i += 1;
                while i < body.len() && body[i] != b'"' {
                    i += if body[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < body.len()
                    && matches!(body[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    i += 1;
                }
                let number = &body[start..i];
                let integer = !number.iter().any(|b| matches!(b, b'.' | b'e' | b'E'));
                let fits = std::str::from_utf8(number)
                    .ok()
                    .is_some_and(|n| n.parse::<i64>().is_ok());
                if integer && !fits {
                    let shown = String::from_utf8_lossy(&number[..number.len().min(40)]);
                    return Err(format!(
                        "the integer {shown} is outside the 64-bit signed range of SQLite integers; send it as a string, or as a float (with a decimal point or an exponent) if a REAL is meant"
                    ));
                }
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// SHA-256 of what a request asks for (statements, parameters, read_only),
/// however its JSON was spelt: a repeat with the same idempotency key must
/// ask for the same, or it is another request.
pub fn fingerprint(request: &SqlRequest) -> [u8; 32] {
    let mut hash = Sha256::new();
    let mut field = |tag: u8, bytes: &[u8]| {
        hash.update([tag]);
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(bytes);
    };
    field(b'r', &[request.read_only as u8]);
    for statement in &request.statements {
        field(b's', statement.sql.as_bytes());
        let values: Vec<(Option<&str>, &Value)> = match &statement.params {
            Params::Positional(values) => values.iter().map(|v| (None, v)).collect(),
            Params::Named(values) => values.iter().map(|(n, v)| (Some(n.as_str()), v)).collect(),
        };
        for (name, value) in values {
            if let Some(name) = name {
                field(b'n', name.as_bytes());
            }
            match value {
                Value::Null => field(b'0', &[]),
                Value::Integer(i) => field(b'i', &i.to_le_bytes()),
                Value::Real(f) => field(b'f', &f.to_bits().to_le_bytes()),
                Value::Text(t) => field(b't', t.as_bytes()),
                Value::Blob(b) => field(b'b', b),
            }
        }
    }
    hash.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_integer_literals_out_of_range_are_refused() {
        for ok in [
            r#"{"a": [1, -9223372036854775808, 9223372036854775807, -1e30, 1.0e400, 2.5]}"#,
            r#"{"s": "-99999999999999999999 \" 99999999999999999999"}"#,
        ] {
            assert!(check_integers(ok.as_bytes()).is_ok(), "{ok}");
        }
        for bad in [
            r#"[-9223372036854775809]"#,
            r#"{"p": [99999999999999999999]}"#,
            r#"{"s": "\\", "p": 9223372036854775808}"#,
        ] {
            assert!(check_integers(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
