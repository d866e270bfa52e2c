//! Authentication and authorization for axum routers.
//!
//! [`authenticate`] (a middleware over a whole router) resolves the caller of every request
//! from `Authorization: Bearer <API key or JWT>` into a [`Caller`] request extension; a route
//! then says what it needs with `route_layer(from_fn_with_state(Permission::…, require))`.
//! [`require`] answers `401` (no or bad credentials, with `WWW-Authenticate`), `403` (a role
//! without the permission) or `503` (the key store is unreachable); the problem documents never
//! say why a credential failed — the log does, at debug level, without the credential.

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use axum::{
    extract::{Request, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use orderflow_db::Database;
use orderflow_platform::{
    config::{AuthSettings, JwtSettings},
    http::Problem,
};
use tracing::debug;

use crate::{
    jwt::JwtVerifier,
    keys::{KeyStore, PREFIX},
    roles::{Permission, Principal, Role},
    AuthError,
};

/// Who made a request.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No credentials.
    Anonymous,
    /// Credentials that did not verify.
    Invalid,
    /// The key store could not be asked.
    Unverifiable,
    Known(Arc<Principal>),
}

impl Caller {
    pub fn principal(&self) -> Option<&Principal> {
        match self {
            Caller::Known(p) => Some(p),
            _ => None,
        }
    }
}

struct Inner {
    enabled: bool,
    keys: Option<KeyStore>,
    /// Replaced whole by [`Authenticator::reload_jwt`] (key rotation without a restart).
    jwt: RwLock<Option<Arc<JwtVerifier>>>,
}

/// Verifies credentials; cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

impl Authenticator {
    /// API keys from `db` (when given), JWTs as `settings.jwt` says.
    pub fn new(settings: &AuthSettings, db: Option<Database>) -> Result<Self, AuthError> {
        Ok(Self {
            inner: Arc::new(Inner {
                enabled: settings.enabled,
                keys: db
                    .map(|db| KeyStore::new(db, Duration::from_millis(settings.key_cache_ttl_ms))),
                jwt: RwLock::new(JwtVerifier::from_settings(&settings.jwt)?.map(Arc::new)),
            }),
        })
    }

    /// Reads the JWT keys anew (the HS256 secret, the JWKS file) and uses them from the next
    /// request on: how keys rotate without a restart (SIGHUP). On an error the keys in use stay.
    pub fn reload_jwt(&self, settings: &JwtSettings) -> Result<(), AuthError> {
        let verifier = JwtVerifier::from_settings(settings)?.map(Arc::new);
        *self
            .inner
            .jwt
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = verifier;
        Ok(())
    }

    fn jwt(&self) -> Option<Arc<JwtVerifier>> {
        self.inner
            .jwt
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// With authentication off: every caller is an anonymous admin.
    pub fn disabled() -> Self {
        Self {
            inner: Arc::new(Inner {
                enabled: false,
                keys: None,
                jwt: RwLock::new(None),
            }),
        }
    }

    pub fn enabled(&self) -> bool {
        self.inner.enabled
    }

    /// The key store, when API keys are accepted.
    pub fn keys(&self) -> Option<&KeyStore> {
        self.inner.keys.as_ref()
    }

    /// Resolves the caller of a request with these headers.
    pub async fn identify(&self, headers: &HeaderMap) -> Caller {
        if !self.inner.enabled {
            return Caller::Known(Arc::new(Principal {
                id: "anonymous".to_owned(),
                name: "anonymous".to_owned(),
                role: Role::Admin,
            }));
        }
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Caller::Anonymous;
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            debug!("Refused credentials: not a bearer token.");
            return Caller::Invalid;
        };
        let verified = if token.starts_with(PREFIX) {
            match &self.inner.keys {
                Some(keys) => keys.verify(token).await,
                None => Err(AuthError::UnknownKey),
            }
        } else {
            match self.jwt() {
                Some(jwt) => jwt.verify(token).map(Arc::new),
                None => Err(AuthError::NoJwtKeys),
            }
        };
        match verified {
            Ok(principal) => Caller::Known(principal),
            Err(AuthError::Db(e)) => {
                tracing::warn!(error = %e, "Cannot verify an API key: the key store is unreachable.");
                Caller::Unverifiable
            }
            Err(e) => {
                debug!(reason = %e, "Refused credentials.");
                Caller::Invalid
            }
        }
    }
}

/// Middleware: puts the request's [`Caller`] into its extensions.
pub async fn authenticate(
    State(auth): State<Authenticator>,
    mut request: Request,
    next: Next,
) -> Response {
    let caller = auth.identify(request.headers()).await;
    request.extensions_mut().insert(caller);
    next.run(request).await
}

fn unauthenticated(invalid: bool) -> Response {
    let mut response = Problem::new(
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "Authentication required",
    )
    .detail("send Authorization: Bearer <API key or JWT>")
    .into_response();
    let challenge = if invalid {
        "Bearer realm=\"orderflow\", error=\"invalid_token\""
    } else {
        "Bearer realm=\"orderflow\""
    };
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

/// Route middleware: lets the request through only if its caller's role allows `permission`.
pub async fn require(
    State(permission): State<Permission>,
    request: Request,
    next: Next,
) -> Response {
    let caller = request
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or(Caller::Anonymous);
    match caller {
        Caller::Anonymous => unauthenticated(false),
        Caller::Invalid => unauthenticated(true),
        Caller::Unverifiable => Problem::unavailable("credential verification").into_response(),
        Caller::Known(principal) if principal.role.allows(permission) => next.run(request).await,
        Caller::Known(principal) => Problem::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden")
            .detail(format!(
                "the {} role may not do this",
                principal.role.as_str()
            ))
            .into_response(),
    }
}
