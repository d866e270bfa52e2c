//! API keys. A key is `ofk_<id>_<secret>`: `id` (16 hex digits) finds the row, `secret` (256
//! random bits, base64url) proves possession. Only the SHA-256 of the secret is stored — a fast
//! hash is enough for a secret of that entropy, and keeps verification cheap on every request —
//! and it is compared in constant time. The full key is returned once, by [`KeyStore::create`].
//!
//! Verified keys are remembered for `auth.key_cache_ttl_ms`, so a revocation made by another
//! process takes effect within that time (in this process: at once).

use std::{sync::Arc, time::Duration};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use moka::sync::Cache;
use orderflow_db::Database;
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{
    roles::{Principal, Role},
    AuthError,
};

/// Prefix every API key starts with (tells keys from JWTs, and makes leaked keys greppable).
pub const PREFIX: &str = "ofk_";

/// A key as listed: never its secret.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub role: Role,
    /// Milliseconds since the epoch.
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

#[derive(Clone)]
pub struct KeyStore {
    db: Database,
    /// SHA-256 of the whole presented key → the principal it proved.
    verified: Cache<[u8; 32], Arc<Principal>>,
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Splits `ofk_<id>_<secret>`.
fn parse(token: &str) -> Result<(&str, &str), AuthError> {
    let rest = token.strip_prefix(PREFIX).ok_or(AuthError::MalformedKey)?;
    let (id, secret) = rest.split_once('_').ok_or(AuthError::MalformedKey)?;
    if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) || secret.len() != 43 {
        return Err(AuthError::MalformedKey);
    }
    Ok((id, secret))
}

impl KeyStore {
    pub fn new(db: Database, cache_ttl: Duration) -> Self {
        Self {
            db,
            verified: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(cache_ttl)
                .support_invalidation_closures()
                .build(),
        }
    }

    /// Creates a key; returns it with the full token, which is never retrievable again.
    pub async fn create(&self, name: &str, role: Role) -> Result<(ApiKey, String), AuthError> {
        let mut id = [0u8; 8];
        let mut secret = [0u8; 32];
        {
            // The thread-local generator is not `Send`: not held across an await.
            let mut rng = rand::rng();
            rng.fill_bytes(&mut id);
            rng.fill_bytes(&mut secret);
        }
        let id = hex(&id);
        let secret = URL_SAFE_NO_PAD.encode(secret);
        let key = ApiKey {
            id: id.clone(),
            name: name.to_owned(),
            role,
            created_at: now_ms(),
            revoked_at: None,
        };
        sqlx::query(
            "INSERT INTO api_keys (id, name, role, secret_sha256, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&key.id)
        .bind(&key.name)
        .bind(role.as_str())
        .bind(hex(&sha256(secret.as_bytes())))
        .bind(key.created_at)
        .execute(self.db.pool())
        .await?;
        Ok((key, format!("{PREFIX}{id}_{secret}")))
    }

    /// Every key, revoked ones too, oldest first.
    pub async fn list(&self) -> Result<Vec<ApiKey>, AuthError> {
        let rows: Vec<(String, String, String, i64, Option<i64>)> = sqlx::query_as(
            "SELECT id, name, role, created_at, revoked_at FROM api_keys ORDER BY created_at, id",
        )
        .fetch_all(self.db.pool())
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, name, role, created_at, revoked_at)| {
                Some(ApiKey {
                    role: role.parse().ok()?,
                    id,
                    name,
                    created_at,
                    revoked_at,
                })
            })
            .collect())
    }

    /// Revokes the key with this id; `false` if there is no such active key.
    pub async fn revoke(&self, id: &str) -> Result<bool, AuthError> {
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now_ms())
                .bind(id)
                .execute(self.db.pool())
                .await?;
        // Forget this process's verifications of it at once.
        let prefix = format!("key:{id}");
        let _ = self
            .verified
            .invalidate_entries_if(move |_, p| p.id == prefix);
        Ok(done.rows_affected() == 1)
    }

    /// The principal a presented key proves.
    pub async fn verify(&self, token: &str) -> Result<Arc<Principal>, AuthError> {
        let fingerprint = sha256(token.as_bytes());
        if let Some(principal) = self.verified.get(&fingerprint) {
            return Ok(principal);
        }
        let (id, secret) = parse(token)?;
        let row: Option<(String, String, String)> = sqlx::query_as(
            "SELECT name, role, secret_sha256 FROM api_keys WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .fetch_optional(self.db.pool())
        .await?;
        let (name, role, stored) = row.ok_or(AuthError::UnknownKey)?;
        let presented = hex(&sha256(secret.as_bytes()));
        if !bool::from(presented.as_bytes().ct_eq(stored.as_bytes())) {
            return Err(AuthError::UnknownKey);
        }
        let role: Role = role.parse().map_err(|_| AuthError::UnknownKey)?;
        let principal = Arc::new(Principal {
            id: format!("key:{id}"),
            name,
            role,
        });
        self.verified.insert(fingerprint, principal.clone());
        Ok(principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, KeyStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("keys.sqlite").display());
        let url = format!("{url}?mode=rwc");
        let db = Database::connect(url.as_str(), 2).await.expect("connect");
        db.migrate().await.expect("migrate");
        (dir, KeyStore::new(db, Duration::from_secs(60)))
    }

    #[tokio::test]
    async fn a_created_key_verifies_until_revoked_and_only_its_hash_is_stored() {
        let (_dir, keys) = store().await;
        let (key, token) = keys.create("shop-1", Role::Producer).await.expect("create");
        assert!(token.starts_with("ofk_"));
        let principal = keys.verify(&token).await.expect("verifies");
        assert_eq!(principal.role, Role::Producer);
        assert_eq!(principal.id, format!("key:{}", key.id));
        let stored: Vec<String> = sqlx::query_scalar("SELECT secret_sha256 FROM api_keys")
            .fetch_all(keys.db.pool())
            .await
            .expect("read");
        // The secret is base64url, which may itself hold `_`: split as `verify` does.
        let (_, secret) = parse(&token).expect("a created key parses");
        assert_eq!(stored, vec![hex(&sha256(secret.as_bytes()))]);
        assert!(!stored.iter().any(|s| s.contains(secret)));

        // A wrong secret under a real id is refused.
        let mut forged = token.clone();
        forged.pop();
        forged.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert!(matches!(
            keys.verify(&forged).await,
            Err(AuthError::UnknownKey)
        ));

        assert!(keys.revoke(&key.id).await.expect("revoke"));
        assert!(!keys.revoke(&key.id).await.expect("second revoke"));
        assert!(matches!(
            keys.verify(&token).await,
            Err(AuthError::UnknownKey)
        ));
        let listed = keys.list().await.expect("list");
        assert_eq!(listed.len(), 1);
        assert!(listed[0].revoked_at.is_some());
    }

    #[tokio::test]
    async fn malformed_keys_are_refused_without_a_lookup() {
        let (_dir, keys) = store().await;
        for bad in [
            "",
            "ofk_",
            "ofk_zz_yy",
            "Bearer x",
            "ofk_0123456789abcdef_short",
        ] {
            assert!(
                matches!(keys.verify(bad).await, Err(AuthError::MalformedKey)),
                "{bad}"
            );
        }
    }
}
