//! API key management on the admin listener: `GET /v1/keys`, `POST /v1/keys` (the token is in
//! that one answer and nowhere else, `Cache-Control: no-store`), `DELETE /v1/keys/{key_id}`.
//! The same operations as `orderflow keys list|create|revoke`, over the same [`KeyStore`].

use axum::{
    body::Bytes,
    extract::{rejection::BytesRejection, Path, State},
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use orderflow_auth::{ApiKey, KeyStore, Role};
use orderflow_platform::http::{FieldError, Problem};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::routes::{read_body, IngestState};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    pub name: String,
    pub role: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedKey {
    pub key: ApiKey,
    /// The API key itself: shown this once, stored only as a hash.
    pub token: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KeyList {
    pub keys: Vec<ApiKey>,
}

fn store(state: &IngestState) -> Result<&KeyStore, Problem> {
    state
        .auth
        .keys()
        .ok_or_else(|| Problem::unavailable("the key store"))
}

fn store_failed(e: orderflow_auth::AuthError) -> Problem {
    warn!(error = %e, "Key store operation failed.");
    Problem::unavailable("the key store")
}

/// Every API key, revoked ones too (never a secret).
#[utoipa::path(get, path = "/v1/keys", tag = "admin", responses((status = 200, description = "The keys.", body = KeyList)))]
pub async fn list(State(state): State<IngestState>) -> Result<Json<KeyList>, Problem> {
    let keys = store(&state)?.list().await.map_err(store_failed)?;
    Ok(Json(KeyList { keys }))
}

/// Create an API key; the answer is the only place its token ever appears.
#[utoipa::path(
    post,
    path = "/v1/keys",
    tag = "admin",
    request_body(content = NewKey, content_type = "application/json"),
    responses(
        (status = 201, description = "Created; `token` is shown this once.", body = CreatedKey),
        (status = 422, description = "Invalid name or role.", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create(
    State(state): State<IngestState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let body = read_body(body)?;
    let request: NewKey = serde_json::from_slice(&body).map_err(|e| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-key-request",
            "Invalid key request",
        )
        .detail(format!(
            "expected {{\"name\": \"...\", \"role\": \"producer|reader|admin\"}}: {e}"
        ))
    })?;
    let mut errors = Vec::new();
    let name = request.name.trim();
    if name.is_empty() || name.len() > 100 {
        errors.push(FieldError {
            field: "name".to_owned(),
            message: "1 to 100 characters".to_owned(),
        });
    }
    let role = request.role.parse::<Role>().map_err(|message| FieldError {
        field: "role".to_owned(),
        message,
    });
    let role = match role {
        Ok(role) if errors.is_empty() => role,
        Ok(_) => Role::Reader,
        Err(e) => {
            errors.push(e);
            Role::Reader
        }
    };
    if !errors.is_empty() {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-key-request",
            "Invalid key request",
        )
        .errors(errors));
    }
    let (key, token) = store(&state)?
        .create(name, role)
        .await
        .map_err(store_failed)?;
    info!(key_id = %key.id, name = %key.name, role = %key.role, "API key created.");
    let mut response = (StatusCode::CREATED, Json(CreatedKey { key, token })).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// Revoke an API key.
#[utoipa::path(
    delete,
    path = "/v1/keys/{key_id}",
    tag = "admin",
    params(("key_id" = String, Path, description = "The key's id (16 hex digits).")),
    responses(
        (status = 204, description = "Revoked."),
        (status = 404, description = "No such active key.", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn revoke(
    State(state): State<IngestState>,
    Path(key_id): Path<String>,
) -> Result<StatusCode, Problem> {
    if store(&state)?.revoke(&key_id).await.map_err(store_failed)? {
        info!(key_id = %key_id, "API key revoked.");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Problem::not_found(&format!("active API key {key_id}")))
    }
}
