//! Hrana's JSON as the libSQL clients send it (tursodatabase/libsql
//! `docs/HRANA_3_SPEC.md`): stream requests, statements, batches and
//! values. Answers are built as JSON by the interpreter.

use base64::Engine;
use rusqlite::types::Value as SqlValue;
use serde::Deserialize;
use serde_json::{Value as Json, json};

/// The body of `POST …/v2/pipeline` and `…/v3/pipeline`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct PipelineBody {
    #[serde(default)]
    pub baton: Option<String>,
    pub requests: Vec<StreamRequest>,
    /// A state the answer must reflect (libSQL's read-your-writes
    /// index; tenantd's bookmark), as the header `tenantd-bookmark`.
    #[serde(default)]
    pub replication_index: Option<Json>,
}

/// The body of `POST …/v3/cursor`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct CursorBody {
    #[serde(default)]
    pub baton: Option<String>,
    pub batch: Batch,
    #[serde(default)]
    pub replication_index: Option<Json>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamRequest {
    Close,
    Execute {
        stmt: Stmt,
    },
    Batch {
        batch: Batch,
    },
    Sequence {
        #[serde(default)]
        sql: Option<String>,
        #[serde(default)]
        sql_id: Option<i32>,
    },
    Describe {
        #[serde(default)]
        sql: Option<String>,
        #[serde(default)]
        sql_id: Option<i32>,
    },
    StoreSql {
        sql_id: i32,
        sql: String,
    },
    CloseSql {
        sql_id: i32,
    },
    GetAutocommit,
}

impl StreamRequest {
    pub fn kind(&self) -> &'static str {
        match self {
            StreamRequest::Close => "close",
            StreamRequest::Execute { .. } => "execute",
            StreamRequest::Batch { .. } => "batch",
            StreamRequest::Sequence { .. } => "sequence",
            StreamRequest::Describe { .. } => "describe",
            StreamRequest::StoreSql { .. } => "store_sql",
            StreamRequest::CloseSql { .. } => "close_sql",
            StreamRequest::GetAutocommit => "get_autocommit",
        }
    }

    /// Statements it runs, for the request's statement limit.
    pub fn statements(&self) -> usize {
        match self {
            StreamRequest::Execute { .. } | StreamRequest::Sequence { .. } => 1,
            StreamRequest::Batch { batch } => batch.steps.len(),
            _ => 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Stmt {
    #[serde(default)]
    pub sql: Option<String>,
    #[serde(default)]
    pub sql_id: Option<i32>,
    #[serde(default)]
    pub args: Vec<Value>,
    #[serde(default)]
    pub named_args: Vec<NamedArg>,
    #[serde(default)]
    pub want_rows: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct NamedArg {
    pub name: String,
    pub value: Value,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Batch {
    pub steps: Vec<BatchStep>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct BatchStep {
    #[serde(default)]
    pub condition: Option<Cond>,
    pub stmt: Stmt,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Cond {
    Ok { step: u32 },
    Error { step: u32 },
    Not { cond: Box<Cond> },
    And { conds: Vec<Cond> },
    Or { conds: Vec<Cond> },
    IsAutocommit,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Value {
    Null,
    Integer { value: IntText },
    Float { value: f64 },
    Text { value: String },
    Blob { base64: String },
}

/// An integer as Hrana sends it: a decimal string (a JSON number is
/// taken too, as some clients send one).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum IntText {
    Text(String),
    Number(i64),
}

impl Value {
    pub fn to_sql(&self) -> Result<SqlValue, String> {
        Ok(match self {
            Value::Null => SqlValue::Null,
            Value::Integer {
                value: IntText::Number(n),
            } => SqlValue::Integer(*n),
            Value::Integer {
                value: IntText::Text(t),
            } => SqlValue::Integer(t.parse().map_err(|_| {
                format!("integer value {t:?} is not a decimal 64-bit signed integer")
            })?),
            Value::Float { value } => SqlValue::Real(*value),
            Value::Text { value } => SqlValue::Text(value.clone()),
            Value::Blob { base64 } => SqlValue::Blob(decode_base64(base64)?),
        })
    }
}

fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    use base64::engine::DecodePaddingMode;
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
    const ANY_PADDING: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    ANY_PADDING
        .decode(text)
        .map_err(|e| format!("invalid base64 in a blob value: {e}"))
}

/// A value of the executor's answer (`/sql` encoding: numbers, strings,
/// `{"base64": …}`) in Hrana's encoding.
pub fn value_json(value: &Json) -> Json {
    match value {
        Json::Null => json!({"type": "null"}),
        Json::Number(n) if n.is_f64() => json!({"type": "float", "value": n}),
        Json::Number(n) => json!({"type": "integer", "value": n.to_string()}),
        Json::String(s) => json!({"type": "text", "value": s}),
        Json::Object(map) => match map.get("base64") {
            Some(Json::String(b)) => {
                json!({"type": "blob", "base64": b.trim_end_matches('=')})
            }
            _ => json!({"type": "null"}),
        },
        Json::Bool(b) => json!({"type": "integer", "value": if *b { "1" } else { "0" }}),
        Json::Array(_) => json!({"type": "null"}),
    }
}

/// Hrana's `{message, code}`.
pub fn error_json(message: &str, code: &str) -> Json {
    json!({"message": message, "code": code})
}
