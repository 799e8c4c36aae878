//! `POST …/v3/cursor`: a batch's answer as newline-delimited entries.
//!
//! The bookmark goes in the `tenantd-bookmark` header only. The Hrana 3
//! spec has no place for `replication_index` among cursor entries; the
//! libSQL server sends it as an entry of its own type
//! (`{"type": "replication_index"}`), which `@libsql/hrana-client` 0.7 (the
//! installed `@libsql/client`'s) rejects as an unexpected entry. A field on
//! `step_end` would be ignored by every client, so none is sent.

use serde_json::{Value as Json, json};

/// The entries of one batch's `StreamResult` (the pipeline's first), after
/// the `{baton, base_url}` line.
pub(super) fn entries(result: &Json, baton: &Json) -> String {
    let mut lines = vec![json!({"baton": baton, "base_url": null})];
    if result["type"] == "error" {
        lines.push(json!({"type": "error", "error": result["error"]}));
    } else {
        let batch = &result["response"]["result"];
        let results = batch["step_results"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for (step, outcome) in results.iter().enumerate() {
            if outcome.is_null() {
                let error = &batch["step_errors"][step];
                if !error.is_null() {
                    lines.push(json!({"type": "step_error", "step": step, "error": error}));
                }
                continue;
            }
            lines.push(json!({"type": "step_begin", "step": step, "cols": outcome["cols"]}));
            for row in outcome["rows"].as_array().into_iter().flatten() {
                lines.push(json!({"type": "row", "row": row}));
            }
            lines.push(json!({
                "type": "step_end",
                "affected_row_count": outcome["affected_row_count"],
                "last_insert_rowid": outcome["last_insert_rowid"],
            }));
        }
    }
    let mut text = String::new();
    for line in lines {
        text.push_str(&line.to_string());
        text.push('\n');
    }
    text
}
