//! An HTTP client for the gateway: one attempt per call, bounded by a timeout. Retries, backoff
//! and the circuit breaker belong to the caller (the payment worker), which knows its deadlines.

use std::time::Duration;

use orderflow_platform::{config::ClientTlsSettings, tls::TlsError};

use crate::protocol::{Answer, ChargeRequest, Faults, RefundRequest, Report};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// No answer in time; the call may or may not have happened (retry with the same key).
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// 5xx: the gateway failed; retry with the same key.
    #[error("gateway error {0}")]
    Server(u16),
    /// 4xx. Most say the request itself is wrong and retrying cannot help; `408`, `409` (a
    /// call for the same key still in progress), `425` and `429` (throttled) say "not now".
    #[error("request refused ({status}): {body}")]
    Refused { status: u16, body: String },
    #[error("answer does not parse: {0}")]
    BadAnswer(String),
}

impl GatewayError {
    /// Whether this says the gateway itself is failing (what a circuit breaker counts), rather
    /// than something about one request or key.
    pub fn is_gateway_failure(&self) -> bool {
        matches!(
            self,
            Self::Timeout(_) | Self::Unreachable(_) | Self::Server(_)
        )
    }

    /// Whether retrying the same call may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Refused { status, .. } => matches!(status, 408 | 409 | 425 | 429),
            Self::BadAnswer(_) => false,
            Self::Timeout(_) | Self::Unreachable(_) | Self::Server(_) => true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GatewayClient {
    http: reqwest::Client,
    base: String,
}

impl GatewayClient {
    /// `base` like `http://127.0.0.1:8090` or `https://gateway.example`; `tls` says which CAs
    /// an https gateway's certificate may chain to and which client certificate to present
    /// (`payment.tls`). Fails when a file it names cannot be read or parsed.
    pub fn new(base: &str, tls: &ClientTlsSettings) -> Result<Self, TlsError> {
        let http = orderflow_platform::tls::http_client(tls)?
            .build()
            .map_err(|e| TlsError::Http(e.to_string()))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub async fn charge(
        &self,
        request: &ChargeRequest,
        timeout: Duration,
    ) -> Result<Answer, GatewayError> {
        self.post(&format!("{}/v1/charges", self.base), Some(request), timeout)
            .await
    }

    pub async fn void(&self, key: &str, timeout: Duration) -> Result<Answer, GatewayError> {
        self.post::<()>(
            &format!("{}/v1/charges/{key}/void", self.base),
            None,
            timeout,
        )
        .await
    }

    pub async fn refund(
        &self,
        request: &RefundRequest,
        timeout: Duration,
    ) -> Result<Answer, GatewayError> {
        self.post(&format!("{}/v1/refunds", self.base), Some(request), timeout)
            .await
    }

    /// Every charge key the gateway saw.
    pub async fn report(&self, timeout: Duration) -> Result<Report, GatewayError> {
        let response = self
            .http
            .get(format!("{}/v1/charges", self.base))
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| classify(e, timeout))?;
        parse(response).await
    }

    /// Changes the simulator's faults (the simulated gateway only).
    pub async fn set_faults(&self, faults: &Faults, timeout: Duration) -> Result<(), GatewayError> {
        let response = self
            .http
            .put(format!("{}/v1/faults", self.base))
            .json(faults)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| classify(e, timeout))?;
        let _: Faults = parse(response).await?;
        Ok(())
    }

    async fn post<T: serde::Serialize>(
        &self,
        url: &str,
        body: Option<&T>,
        timeout: Duration,
    ) -> Result<Answer, GatewayError> {
        let mut request = self.http.post(url).timeout(timeout);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| classify(e, timeout))?;
        parse(response).await
    }
}

fn classify(e: reqwest::Error, timeout: Duration) -> GatewayError {
    if e.is_timeout() {
        GatewayError::Timeout(timeout)
    } else {
        GatewayError::Unreachable(orderflow_platform::http::error_chain(&e))
    }
}

async fn parse<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
) -> Result<T, GatewayError> {
    let status = response.status();
    if status.is_server_error() {
        return Err(GatewayError::Server(status.as_u16()));
    }
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        return Err(GatewayError::Refused {
            status: status.as_u16(),
            body: body.chars().take(500).collect(),
        });
    }
    let bytes = response
        .bytes()
        .await
        .map_err(|e| GatewayError::Unreachable(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| GatewayError::BadAnswer(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_now_answers_are_retried_and_refusals_are_not() {
        let refused = |status| GatewayError::Refused {
            status,
            body: String::new(),
        };
        for status in [408, 409, 425, 429] {
            assert!(refused(status).is_transient(), "{status} is retried");
        }
        for status in [400, 402, 404, 422] {
            assert!(!refused(status).is_transient(), "{status} is final");
        }
        assert!(GatewayError::Server(503).is_transient());
        assert!(GatewayError::Server(503).is_gateway_failure());
        assert!(!refused(409).is_gateway_failure(), "one key's trouble");
        assert!(GatewayError::Timeout(Duration::from_secs(1)).is_transient());
        assert!(!GatewayError::BadAnswer("x".into()).is_transient());
    }
}
