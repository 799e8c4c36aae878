//! `POST /_admin/tenants/<id>` and `DELETE /_admin/tenants/<id>`: the
//! tenant lifecycle of [`crate::tenant::lifecycle`] over HTTP, behind the
//! admin token.
//!
//! A DELETE is carried out by the tenant's holder, which stops the tenant
//! first (its last batch committed, its lease released) and then deletes
//! under its own lease: a DELETE reaching another machine is handed to the
//! holder like any request; with no live holder, the machine it reached
//! deletes.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{AppState, Forwardable, admin_denied, error, handoff, incoming_hops};
use crate::TenantId;
use crate::replay::Target;
use crate::tenant::Route;
use crate::tenant::lifecycle::{self, Created, Deleted, Deleter};
use crate::tenant::migrations::apply::bring_up_to_date_recorded;

pub(super) async fn create_tenant(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(denied) = admin_denied(&state, &headers) {
        return denied;
    }
    let id = match TenantId::parse(&id) {
        Ok(id) => id,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    match lifecycle::create(state.registry.store(), &id).await {
        Ok(created) => {
            state.registry.created(&id);
            let status = match created {
                Created::Created => StatusCode::CREATED,
                Created::Exists => StatusCode::OK,
            };
            let body = json!({"customer_id": id.as_str(), "result": created.as_str()});
            (status, Json(body)).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &format!("{e:#}")),
    }
}

pub(super) async fn delete_tenant(
    State(state): State<AppState>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(denied) = admin_denied(&state, &headers) {
        return denied;
    }
    let id = match TenantId::parse(&id) {
        Ok(id) => id,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let registry = &state.registry;
    if registry.config().customer_id.as_ref() == Some(&id) {
        let message = format!(
            "customer {id} is this machine's CUSTOMER_ID: its machines would take it back (and recreate it) at once; \
             destroy them first (tenantd fly destroy --customer {id}), then run `tenantd tenants delete {id}`"
        );
        return error(StatusCode::CONFLICT, &message);
    }
    if !registry.holds(&id) {
        match registry.other_holder(&id).await {
            Ok(Some(holder)) => {
                let hops = incoming_hops(&headers);
                let request = Forwardable {
                    method,
                    uri,
                    headers,
                    body,
                };
                let target = Target::Instance(holder.holder);
                return handoff(&state, target, Some(holder.addr), hops, request)
                    .await
                    .0;
            }
            Ok(None) => {}
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e),
        }
    }
    let deleting = registry.begin_delete(&id).await;
    // Long enough for a holder that just vanished to go stale.
    let ttl = registry.config().lease_ttl;
    let deleter = Deleter {
        lease: registry.lease_settings(),
        wait: ttl * 2 + Duration::from_secs(1),
    };
    match lifecycle::delete(registry.store(), &id, &deleter).await {
        Ok(Deleted::Deleted) => {
            deleting.deleted();
            let body = json!({"customer_id": id.as_str(), "result": "deleted"});
            (StatusCode::OK, Json(body)).into_response()
        }
        Ok(Deleted::Absent) => {
            deleting.deleted();
            error(StatusCode::NOT_FOUND, &lifecycle::not_found_message(&id))
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &format!("{e:#}")),
    }
}

/// `POST /_admin/tenants/<id>/migrate`: brings the tenant up to the
/// published schema version now, on its holder (a machine that does not
/// hold it hands the request on, or takes the tenant when no one holds
/// it: the claim applies what is pending). Answers the outcome:
/// `{"customer_id", "latest", "version", "applied", "failed"}`.
pub(super) async fn migrate_tenant(
    State(state): State<AppState>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(denied) = admin_denied(&state, &headers) {
        return denied;
    }
    let id = match TenantId::parse(&id) {
        Ok(id) => id,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let registry = &state.registry;
    let handle = match registry.route(&id, false).await {
        Route::Local(handle) => handle,
        Route::Holder(holder) => {
            let hops = incoming_hops(&headers);
            let request = Forwardable {
                method,
                uri,
                headers,
                body,
            };
            let target = Target::Instance(holder.holder);
            return handoff(&state, target, Some(holder.addr), hops, request)
                .await
                .0;
        }
        Route::NotFound(message) => return error(StatusCode::NOT_FOUND, &message),
        Route::Corrupt(message) => return error(StatusCode::INTERNAL_SERVER_ERROR, &message),
        Route::Unavailable(message) => return error(StatusCode::SERVICE_UNAVAILABLE, &message),
        Route::Elsewhere | Route::Lookup { .. } => {
            let message = format!(
                "customer {id} is not served by this machine and no live holder is known; send the request to one of its machines, or run `tenantd migrate apply --customer-id {id}`"
            );
            return error(StatusCode::SERVICE_UNAVAILABLE, &message);
        }
    };
    match bring_up_to_date_recorded(&id, registry.store(), &handle).await {
        Ok(outcome) => (StatusCode::OK, Json(outcome)).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}
