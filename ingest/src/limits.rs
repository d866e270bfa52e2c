//! Rate limits at the edge: GCRA (governor) per client IP and per authenticated principal (API
//! key or token subject), from `ingest.rate_limit_*`, with `RateLimit-Limit`,
//! `RateLimit-Remaining` and `RateLimit-Reset` on every limited response (of the tighter of the
//! two buckets) and `Retry-After` on `429`. [`RateLimits::reload`] swaps in new limits while
//! serving (the binary calls it on SIGHUP after re-reading its configuration); buckets start full
//! again.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    num::NonZeroU32,
    sync::{Arc, RwLock},
};

use axum::{
    extract::{ConnectInfo, Request, State},
    http::{HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use governor::{
    clock::{Clock, DefaultClock},
    middleware::StateInformationMiddleware,
    state::keyed::DashMapStateStore,
    Quota, RateLimiter,
};
use orderflow_platform::{config::IngestSettings, http::Problem};

type Limiter =
    RateLimiter<String, DashMapStateStore<String>, DefaultClock, StateInformationMiddleware>;

/// The limiter in force and its quota; `None` when limiting is off.
struct Active {
    limiter: Limiter,
    burst: u32,
    /// Time for one request's worth of capacity to come back.
    replenish: std::time::Duration,
}

/// The limiters in force: per IP and per principal.
#[derive(Default)]
struct Limiters {
    per_ip: Option<Arc<Active>>,
    per_principal: Option<Arc<Active>>,
}

/// Shared, reloadable rate limits of one ingest edge.
#[derive(Clone, Default)]
pub struct RateLimits {
    active: Arc<RwLock<Limiters>>,
}

/// What a check decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Unlimited,
    Allowed {
        limit: u32,
        remaining: u32,
        reset_secs: u64,
    },
    Limited {
        limit: u32,
        retry_after_secs: u64,
    },
}

impl RateLimits {
    pub fn new(settings: &IngestSettings) -> Self {
        let limits = Self::default();
        limits.reload(settings);
        limits
    }

    /// Replaces the limits with those of `settings` (0 requests per second: off).
    pub fn reload(&self, settings: &IngestSettings) {
        let per_ip = Active::new(
            settings.rate_limit_per_ip_per_second,
            settings.rate_limit_burst,
        );
        let per_principal = Active::new(
            settings.rate_limit_per_principal_per_second,
            settings.rate_limit_principal_burst,
        );
        if let Ok(mut slot) = self.active.write() {
            *slot = Limiters {
                per_ip,
                per_principal,
            };
        }
    }

    /// Takes one request from `ip`'s bucket only.
    pub fn check(&self, ip: IpAddr) -> Decision {
        self.check_client(ip, None)
    }

    /// Takes one request from `ip`'s bucket and, for an authenticated caller, from the
    /// principal's; answers for the tighter of the two.
    pub fn check_client(&self, ip: IpAddr, principal: Option<&str>) -> Decision {
        let (per_ip, per_principal) = match self.active.read() {
            Ok(l) => (l.per_ip.clone(), l.per_principal.clone()),
            Err(_) => return Decision::Unlimited,
        };
        let by_ip = per_ip.map(|a| a.check(format!("ip:{ip}")));
        let by_principal = per_principal
            .zip(principal)
            .map(|(a, p)| a.check(format!("principal:{p}")));
        match (by_ip, by_principal) {
            (None, None) => Decision::Unlimited,
            (Some(d), None) | (None, Some(d)) => d,
            (Some(a), Some(b)) => tighter(a, b),
        }
    }
}

/// The decision to report: a refusal wins; else the one with fewer requests left.
fn tighter(a: Decision, b: Decision) -> Decision {
    match (&a, &b) {
        (Decision::Limited { .. }, _) => a,
        (_, Decision::Limited { .. }) => b,
        (Decision::Allowed { remaining: ra, .. }, Decision::Allowed { remaining: rb, .. })
            if rb < ra =>
        {
            b
        }
        _ => a,
    }
}

impl Active {
    fn new(rate: u32, burst: u32) -> Option<Arc<Self>> {
        NonZeroU32::new(rate).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(rate);
            let quota = Quota::per_second(rate).allow_burst(burst);
            Arc::new(Active {
                limiter: RateLimiter::dashmap(quota)
                    .with_middleware::<StateInformationMiddleware>(),
                burst: burst.get(),
                replenish: quota.replenish_interval(),
            })
        })
    }

    fn check(&self, key: String) -> Decision {
        match self.limiter.check_key(&key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let missing = self.burst.saturating_sub(remaining);
                Decision::Allowed {
                    limit: self.burst,
                    remaining,
                    reset_secs: (self.replenish * missing).as_secs_f64().ceil() as u64,
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Decision::Limited {
                    limit: self.burst,
                    retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
                }
            }
        }
        // Buckets of idle clients are dropped lazily by governor's DashMap store when full.
    }
}

fn header(value: u64) -> HeaderValue {
    HeaderValue::from(value)
}

/// Middleware: limits by the peer's IP (the connection's address) and, after
/// [`orderflow_auth::http::authenticate`], by the caller's principal.
pub async fn limit(State(limits): State<RateLimits>, request: Request, next: Next) -> Response {
    let ip = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let principal = request
        .extensions()
        .get::<orderflow_auth::Caller>()
        .and_then(orderflow_auth::Caller::principal)
        .map(|p| p.id.clone());
    match limits.check_client(ip, principal.as_deref()) {
        Decision::Unlimited => next.run(request).await,
        Decision::Allowed {
            limit,
            remaining,
            reset_secs,
        } => {
            let mut response = next.run(request).await;
            let headers = response.headers_mut();
            headers.insert("ratelimit-limit", header(u64::from(limit)));
            headers.insert("ratelimit-remaining", header(u64::from(remaining)));
            headers.insert("ratelimit-reset", header(reset_secs));
            response
        }
        Decision::Limited {
            limit,
            retry_after_secs,
        } => {
            let seconds = u32::try_from(retry_after_secs).unwrap_or(u32::MAX);
            let mut response = Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too many requests",
            )
            .detail(format!("retry in {retry_after_secs} s"))
            .retry_after(seconds)
            .into_response();
            let headers = response.headers_mut();
            headers.insert("ratelimit-limit", header(u64::from(limit)));
            headers.insert("ratelimit-remaining", header(0));
            headers.insert("ratelimit-reset", header(retry_after_secs));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(rate: u32, burst: u32) -> IngestSettings {
        IngestSettings {
            listen: "127.0.0.1:0".parse().expect("addr"),
            max_body_bytes: 1024,
            status_base_url: String::new(),
            max_batch_orders: 10,
            rate_limit_per_ip_per_second: rate,
            rate_limit_burst: burst,
            rate_limit_per_principal_per_second: rate,
            rate_limit_principal_burst: burst,
            idempotency_ttl_secs: 60,
            idempotency_wait_ms: 100,
            tls: Default::default(),
        }
    }

    #[test]
    fn a_burst_is_allowed_then_limited_per_ip() {
        let limits = RateLimits::new(&settings(1, 2));
        let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let b = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        assert!(matches!(
            limits.check(a),
            Decision::Allowed {
                limit: 2,
                remaining: 1,
                ..
            }
        ));
        assert!(matches!(
            limits.check(a),
            Decision::Allowed {
                limit: 2,
                remaining: 0,
                ..
            }
        ));
        assert!(matches!(
            limits.check(a),
            Decision::Limited {
                limit: 2,
                retry_after_secs: 1
            }
        ));
        // Another client has its own bucket.
        assert!(matches!(
            limits.check(b),
            Decision::Allowed { remaining: 1, .. }
        ));
    }

    #[test]
    fn a_principal_has_one_bucket_whatever_its_address() {
        let limits = RateLimits::new(&IngestSettings {
            rate_limit_per_ip_per_second: 0,
            ..settings(1, 2)
        });
        let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let b = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        assert!(matches!(
            limits.check_client(a, Some("key:1")),
            Decision::Allowed { remaining: 1, .. }
        ));
        assert!(matches!(
            limits.check_client(b, Some("key:1")),
            Decision::Allowed { remaining: 0, .. }
        ));
        assert!(matches!(
            limits.check_client(b, Some("key:1")),
            Decision::Limited { .. }
        ));
        // Another principal from the same address is not limited; anonymous callers have no
        // principal bucket.
        assert!(matches!(
            limits.check_client(b, Some("key:2")),
            Decision::Allowed { .. }
        ));
        assert_eq!(limits.check_client(b, None), Decision::Unlimited);
    }

    #[test]
    fn off_means_unlimited_and_reload_takes_effect() {
        let limits = RateLimits::new(&settings(0, 0));
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert_eq!(limits.check(ip), Decision::Unlimited);
        limits.reload(&settings(1, 1));
        assert!(matches!(limits.check(ip), Decision::Allowed { .. }));
        assert!(matches!(limits.check(ip), Decision::Limited { .. }));
        limits.reload(&settings(0, 0));
        assert_eq!(limits.check(ip), Decision::Unlimited);
    }
}
