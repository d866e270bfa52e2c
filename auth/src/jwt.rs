//! JWT bearer tokens. The key decides the algorithm, never the token: a token's `kid` picks a
//! key of the JWKS file (RS256 for RSA keys, ES256 for P-256 keys, or the key's own `alg`), a
//! token without `kid` is checked against the HS256 secret (or the only JWKS key), and a token
//! whose header names another algorithm is refused — which stops `alg: none` and HS256 tokens
//! signed with a public key. `exp`, `iss`, `aud` and `sub` are required; `nbf` is checked when
//! present; `auth.jwt.leeway_secs` of clock skew is allowed.

use std::collections::HashMap;

use jsonwebtoken::{
    decode, decode_header,
    jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm},
    Algorithm, DecodingKey, Validation,
};
use orderflow_platform::config::JwtSettings;
use serde_json::{Map, Value};

use crate::{
    roles::{Principal, Role},
    AuthError,
};

struct Key {
    algorithm: Algorithm,
    decoding: DecodingKey,
}

pub struct JwtVerifier {
    /// The HS256 secret, for tokens without `kid`.
    shared: Option<Key>,
    /// JWKS keys by `kid`.
    by_kid: HashMap<String, Key>,
    issuer: String,
    audience: String,
    role_claim: String,
    leeway: u64,
}

fn jwks_error(path: &str, reason: impl Into<String>) -> AuthError {
    AuthError::Jwks {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// RS256 or ES256, from the key's `alg` if it has one, else from its type.
fn algorithm_of(jwk: &jsonwebtoken::jwk::Jwk) -> Result<Algorithm, String> {
    let from_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        _ => return Err("only RSA and P-256 keys are accepted".to_owned()),
    };
    match jwk.common.key_algorithm {
        None => Ok(from_type),
        Some(KeyAlgorithm::RS256) if from_type == Algorithm::RS256 => Ok(Algorithm::RS256),
        Some(KeyAlgorithm::ES256) if from_type == Algorithm::ES256 => Ok(Algorithm::ES256),
        Some(other) => Err(format!(
            "alg {other:?} does not fit the key (RS256 for RSA, ES256 for P-256)"
        )),
    }
}

impl JwtVerifier {
    /// `None` when no JWT key is configured (only API keys are accepted then).
    pub fn from_settings(settings: &JwtSettings) -> Result<Option<Self>, AuthError> {
        if !settings.configured() {
            return Ok(None);
        }
        // The only backend compiled in; installing it makes the choice explicit.
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        let shared = settings.hs256_secret.expose().map(|secret| Key {
            algorithm: Algorithm::HS256,
            decoding: DecodingKey::from_secret(secret.as_bytes()),
        });
        let mut by_kid = HashMap::new();
        if !settings.jwks_file.is_empty() {
            let path = settings.jwks_file.as_str();
            let text =
                std::fs::read_to_string(path).map_err(|e| jwks_error(path, e.to_string()))?;
            let set: JwkSet =
                serde_json::from_str(&text).map_err(|e| jwks_error(path, e.to_string()))?;
            for (n, jwk) in set.keys.iter().enumerate() {
                let kid = jwk
                    .common
                    .key_id
                    .clone()
                    .ok_or_else(|| jwks_error(path, format!("keys[{n}] has no kid")))?;
                let algorithm =
                    algorithm_of(jwk).map_err(|e| jwks_error(path, format!("key {kid}: {e}")))?;
                let decoding = DecodingKey::from_jwk(jwk)
                    .map_err(|e| jwks_error(path, format!("key {kid}: {e}")))?;
                if by_kid
                    .insert(
                        kid.clone(),
                        Key {
                            algorithm,
                            decoding,
                        },
                    )
                    .is_some()
                {
                    return Err(jwks_error(path, format!("kid {kid} appears twice")));
                }
            }
        }
        Ok(Some(Self {
            shared,
            by_kid,
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            role_claim: settings.role_claim.clone(),
            leeway: settings.leeway_secs,
        }))
    }

    fn key_for(&self, kid: Option<&str>) -> Result<&Key, AuthError> {
        match kid {
            Some(kid) => self
                .by_kid
                .get(kid)
                .ok_or_else(|| AuthError::Token(format!("unknown kid {kid:?}"))),
            None => match (&self.shared, self.by_kid.len()) {
                (Some(key), _) => Ok(key),
                (None, 1) => self.by_kid.values().next().ok_or(AuthError::NoJwtKeys),
                (None, 0) => Err(AuthError::NoJwtKeys),
                (None, _) => Err(AuthError::Token(
                    "no kid, and the JWKS has several keys".to_owned(),
                )),
            },
        }
    }

    /// The principal a token proves.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        // Fails for any `alg` outside jsonwebtoken's list, `none` among them.
        let header = decode_header(token).map_err(|e| AuthError::Token(e.to_string()))?;
        let key = self.key_for(header.kid.as_deref())?;
        let mut validation = Validation::new(key.algorithm);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway;
        let data = decode::<Map<String, Value>>(token, &key.decoding, &validation)
            .map_err(|e| AuthError::Token(e.to_string()))?;
        let claims = data.claims;
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| AuthError::Token("sub is not a non-empty string".to_owned()))?;
        let role = match claims.get(&self.role_claim) {
            Some(Value::String(role)) => role
                .parse::<Role>()
                .map_err(|_| AuthError::Role(role.clone()))?,
            _ => return Err(AuthError::Role(String::new())),
        };
        Ok(Principal {
            id: format!("jwt:{subject}"),
            name: subject.to_owned(),
            role,
        })
    }
}
