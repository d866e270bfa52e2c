//! Who is calling and what they may do.
//!
//! - [`roles`] decides which [`Role`] may do what ([`Permission`]): the one place that does.
//! - [`keys`] owns API keys: created with high-entropy secrets shown once, stored as hashes,
//!   revocable ([`KeyStore`]).
//! - [`jwt`] verifies JWT bearer tokens (HS256, or RS256/ES256 from a JWKS file), taking the
//!   algorithm from the key, never from the token.
//! - [`http`] is the axum side: [`http::authenticate`] resolves the caller of every request,
//!   [`http::require`] answers `401`/`403` for routes the caller may not use.
//! - [`limits`] decides how much a caller may ask: rate limits per client IP (the peer, or who
//!   a trusted proxy names) and per principal, for every edge listener.

pub mod http;
pub mod jwt;
pub mod keys;
pub mod limits;
pub mod roles;

pub use http::{Authenticator, Caller};
pub use jwt::JwtVerifier;
pub use keys::{ApiKey, KeyStore};
pub use roles::{Permission, Principal, Role};

/// Why a credential was not accepted. The HTTP answer never says which (`401` either way);
/// logs do.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("malformed API key")]
    MalformedKey,
    #[error("unknown or revoked API key")]
    UnknownKey,
    #[error("token: {0}")]
    Token(String),
    #[error("no JWT keys are configured")]
    NoJwtKeys,
    #[error("token role claim {0:?} is not producer, reader or admin")]
    Role(String),
    #[error("JWKS file {path}: {reason}")]
    Jwks { path: String, reason: String },
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}
