//! The answer's size as sent: every value, name and separator counted in
//! the bytes of its JSON encoding (escapes and base64 included), so that
//! the budget bounds what is built and sent, not an estimate of it.

use base64::Engine;
use rusqlite::types::ValueRef;
use serde_json::{Map, Number, Value as Json};

use super::cursor::Column;

/// `{"customer_id": …, "machine_id": …, "epoch": …, "results": []}`.
pub const ENVELOPE: usize = 160;

/// `{"columns":[],"rows":[],"rows_affected":N,"last_insert_rowid":N},`
/// with both numbers at their longest.
pub const STATEMENT: usize = 64 + 2 * 20;

/// A row's brackets and the comma after it.
pub const ROW: usize = 3;

/// `{"base64":""}` around a blob's encoding.
const BLOB_WRAPPING: usize = 13;

/// `t` as a JSON string, quotes included, as serde_json writes it (text
/// that is not UTF-8 is sent with U+FFFD for each invalid sequence).
pub fn text_len(t: &[u8]) -> usize {
    let mut n = 2;
    for chunk in t.utf8_chunks() {
        for &b in chunk.valid().as_bytes() {
            n += match b {
                b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
                0..=0x1f => 6,
                _ => 1,
            };
        }
        if !chunk.invalid().is_empty() {
            n += 3;
        }
    }
    n
}

/// The fewest bytes a column's value can take once encoded, known before
/// SQLite materialises it.
pub fn least_len(column: Column) -> usize {
    match column {
        Column::Null | Column::Integer | Column::Real => 1,
        Column::Text(bytes) => bytes.saturating_add(2),
        Column::Blob(bytes) => blob_len(bytes),
    }
}

fn blob_len(bytes: usize) -> usize {
    bytes
        .div_ceil(3)
        .saturating_mul(4)
        .saturating_add(BLOB_WRAPPING)
}

/// A value as JSON (blobs as `{"base64": …}`), and its encoded length.
pub fn to_json(value: ValueRef<'_>) -> (Json, usize) {
    match value {
        ValueRef::Null => (Json::Null, 4),
        ValueRef::Integer(i) => {
            let digits = i.unsigned_abs().checked_ilog10().unwrap_or(0) as usize + 1;
            (Json::from(i), digits + usize::from(i < 0))
        }
        // JSON has no NaN or infinity; SQLite has no NaN, and an infinite
        // REAL is rare enough to answer as null.
        ValueRef::Real(f) => match Number::from_f64(f) {
            Some(n) => {
                let len = n.to_string().len();
                (Json::Number(n), len)
            }
            None => (Json::Null, 4),
        },
        ValueRef::Text(t) => (
            Json::String(String::from_utf8_lossy(t).into_owned()),
            text_len(t),
        ),
        ValueRef::Blob(b) => {
            let encoded = base64::engine::general_purpose::STANDARD.encode(b);
            let mut map = Map::new();
            map.insert("base64".into(), Json::String(encoded));
            (Json::Object(map), blob_len(b.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(value: ValueRef<'_>) -> usize {
        serde_json::to_string(&to_json(value).0).unwrap().len()
    }

    #[test]
    fn lengths_are_those_of_the_encoding() {
        let values = [
            ValueRef::Null,
            ValueRef::Integer(0),
            ValueRef::Integer(-9),
            ValueRef::Integer(i64::MIN),
            ValueRef::Integer(i64::MAX),
            ValueRef::Real(1.5),
            ValueRef::Real(-1e300),
            ValueRef::Real(0.1),
            ValueRef::Text(b""),
            ValueRef::Text(b"plain"),
            ValueRef::Text("\u{1}\"\\\n\t\u{8}\u{c}\u{7f}é😀".as_bytes()),
            ValueRef::Text(b"bad \xff\xfe utf-8 \xe2\x82"),
            ValueRef::Blob(b""),
            ValueRef::Blob(b"a"),
            ValueRef::Blob(b"ab"),
            ValueRef::Blob(b"abc"),
            ValueRef::Blob(&[0; 1000]),
        ];
        for value in values {
            assert_eq!(to_json(value).1, encoded(value), "{value:?}");
        }
    }

    #[test]
    fn the_least_length_never_exceeds_the_real_one() {
        let text = "\u{1}x".as_bytes();
        assert!(least_len(Column::Text(text.len())) <= text_len(text));
        assert_eq!(least_len(Column::Blob(3)), encoded(ValueRef::Blob(b"abc")));
    }
}
