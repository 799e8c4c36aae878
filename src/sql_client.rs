//! `tenantd sql`: runs SQL against a tenant through the app's URL and
//! prints the results as a table (or the answer's JSON).

use std::io::Read;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};

#[derive(Args, Debug)]
pub struct SqlArgs {
    /// The app's URL: `tenantd dev`'s edge, or https://<app>.fly.dev.
    #[arg(long, env = "TENANTD_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,

    /// The tenant whose database to use.
    #[arg(long)]
    pub customer_id: String,

    /// The API token (the machines' TENANTD_API_TOKEN).
    #[arg(long, env = "TENANTD_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Print the answer's JSON instead of tables.
    #[arg(long)]
    pub json: bool,

    /// Run in a read-only transaction (a write is an error).
    #[arg(long)]
    pub read_only: bool,

    /// Make the request exactly-once: a retry with the same key returns the
    /// first answer.
    #[arg(long)]
    pub idempotency_key: Option<String>,

    /// One SQL statement; without it (or with `-`) a script is read from
    /// stdin and all of its statements run in one request.
    pub sql: Option<String>,

    /// Parameters of the statement (`?` in order): JSON values (42, 2.5,
    /// null, "quoted text") or else plain text.
    pub params: Vec<String>,
}

pub async fn run(args: SqlArgs) -> anyhow::Result<()> {
    let statements = match args.sql.as_deref() {
        None | Some("-") => {
            if !args.params.is_empty() {
                bail!(
                    "parameters go with one statement given on the command line, not with a script on stdin"
                );
            }
            let mut script = String::new();
            std::io::stdin()
                .read_to_string(&mut script)
                .context("reading the SQL script from stdin")?;
            let statements: Vec<Value> = split_script(&script)
                .into_iter()
                .map(|sql| json!({"sql": sql}))
                .collect();
            if statements.is_empty() {
                bail!("the script on stdin has no statements");
            }
            statements
        }
        Some(sql) => {
            // A script in the argument runs as sqlite3 runs it: statement by
            // statement (one request, one transaction), each prepared after
            // the one before it ran.
            let statements = split_script(sql);
            if statements.len() > 1 {
                if !args.params.is_empty() {
                    bail!(
                        "parameters go with one statement; the argument has {} statements",
                        statements.len()
                    );
                }
                statements
                    .into_iter()
                    .map(|sql| json!({"sql": sql}))
                    .collect()
            } else {
                let params: Vec<Value> = args.params.iter().map(|p| param(p)).collect();
                vec![json!({"sql": sql, "params": params})]
            }
        }
    };
    let token = args
        .token
        .filter(|t| !t.is_empty())
        .context("no API token: pass --token or set TENANTD_API_TOKEN (tenantd dev prints the one its machines use)")?;
    let url = format!(
        "{}/customers/{}/sql",
        args.url.trim_end_matches('/'),
        args.customer_id
    );
    let mut request = reqwest::Client::new()
        .post(&url)
        .bearer_auth(token)
        .json(&json!({"statements": statements, "read_only": args.read_only}));
    if let Some(key) = &args.idempotency_key {
        request = request.header("idempotency-key", key);
    }
    let reply = request
        .send()
        .await
        .with_context(|| format!("sending the request to {url}"))?;
    if let Some(replay) = reply.headers().get("fly-replay") {
        bail!(
            "{url} answered with fly-replay: {}: that is one machine, which hands the request to the tenant's holder through Fly Proxy; point --url at the app (https://<app>.fly.dev, or tenantd dev's edge)",
            replay.to_str().unwrap_or("?")
        );
    }
    let status = reply.status();
    let body: Value = reply
        .json()
        .await
        .with_context(|| format!("{url} answered {status} without JSON"))?;
    if !status.is_success() {
        let message = body["error"].as_str().unwrap_or("no message");
        bail!("{status}: {message}");
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        print!("{}", format_results(&body["results"]));
    }
    Ok(())
}

/// A command-line parameter: JSON when it parses as a JSON scalar, else
/// the text itself.
fn param(text: &str) -> Value {
    match serde_json::from_str::<Value>(text) {
        Ok(value @ (Value::Null | Value::Number(_) | Value::String(_))) => value,
        _ => Value::String(text.to_string()),
    }
}

pub use tenantd_core::tenant::migrations::script::split as split_script;

/// Each statement's rows as an aligned table, or what it changed.
pub fn format_results(results: &Value) -> String {
    let mut out = String::new();
    for result in results.as_array().into_iter().flatten() {
        let columns: Vec<String> = result["columns"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c.as_str().unwrap_or("").to_string())
            .collect();
        if columns.is_empty() {
            out.push_str(&format!("rows affected: {}", result["rows_affected"]));
            if let Some(rowid) = result["last_insert_rowid"].as_i64() {
                out.push_str(&format!(", last insert rowid: {rowid}"));
            }
            out.push('\n');
            continue;
        }
        let rows: Vec<Vec<String>> = result["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|row| row.as_array().into_iter().flatten().map(display).collect())
            .collect();
        let mut widths: Vec<usize> = columns.iter().map(|c| c.chars().count()).collect();
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            format!("{}\n", padded.join(" | ").trim_end())
        };
        out.push_str(&line(&columns));
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        out.push_str(&format!("{}\n", rule.join("-+-")));
        for row in &rows {
            out.push_str(&line(row));
        }
        out.push_str(&format!(
            "({} row{})\n",
            rows.len(),
            if rows.len() == 1 { "" } else { "s" }
        ));
    }
    out
}

fn display(value: &Value) -> String {
    match value {
        Value::Null => "NULL".into(),
        Value::String(s) => s.clone(),
        Value::Object(map) => match map.get("base64").and_then(Value::as_str) {
            Some(b64) => format!("base64:{b64}"),
            None => value.to_string(),
        },
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_split_where_sqlite_ends_a_statement() {
        let script = "-- a migration\nCREATE TABLE t(x TEXT); INSERT INTO t VALUES ('a;b');\n\
            CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; SELECT 2; END;\n/* done */\nSELECT * FROM t";
        assert_eq!(
            split_script(script),
            vec![
                "-- a migration\nCREATE TABLE t(x TEXT)",
                "INSERT INTO t VALUES ('a;b')",
                "CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; SELECT 2; END",
                "/* done */\nSELECT * FROM t",
            ]
        );
        assert!(split_script("-- nothing\n;  ").is_empty());
    }

    #[test]
    fn params_are_json_scalars_or_text() {
        assert_eq!(param("42"), json!(42));
        assert_eq!(param("2.5"), json!(2.5));
        assert_eq!(param("null"), json!(null));
        assert_eq!(param("\"7\""), json!("7"));
        assert_eq!(param("hello"), json!("hello"));
        assert_eq!(param("[1]"), json!("[1]"));
    }

    #[test]
    fn tables_are_aligned() {
        let results = json!([
            {"columns": ["id", "body"], "rows": [[1, "hi"], [22, null]], "rows_affected": 0, "last_insert_rowid": null},
            {"columns": [], "rows": [], "rows_affected": 1, "last_insert_rowid": 3}
        ]);
        assert_eq!(
            format_results(&results),
            "id | body\n---+-----\n1  | hi\n22 | NULL\n(2 rows)\nrows affected: 1, last insert rowid: 3\n"
        );
    }
}
