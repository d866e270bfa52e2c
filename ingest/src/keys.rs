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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    pub name: String,
    pub role: String,
}

#[derive(Debug, Serialize)]
pub struct CreatedKey {
    pub key: ApiKey,
    /// The API key itself: shown this once, stored only as a hash.
    pub token: String,
}

#[derive(Debug, Serialize)]
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

pub async fn list(State(state): State<IngestState>) -> Result<Json<KeyList>, Problem> {
    let keys = store(&state)?.list().await.map_err(store_failed)?;
    Ok(Json(KeyList { keys }))
}

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
