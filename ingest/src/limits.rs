//! Rate limits at the edge: GCRA (governor) per client IP, from `ingest.rate_limit_*`, with
//! `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` on every limited response and
//! `Retry-After` on `429`. [`RateLimits::reload`] swaps in new limits while serving (the binary
//! calls it on SIGHUP after re-reading its configuration); buckets start full again.
//!
//! Limits per principal (API key or token subject) join these once the edge authenticates.

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
    RateLimiter<IpAddr, DashMapStateStore<IpAddr>, DefaultClock, StateInformationMiddleware>;

/// The limiter in force and its quota; `None` when limiting is off.
struct Active {
    limiter: Limiter,
    burst: u32,
    /// Time for one request's worth of capacity to come back.
    replenish: std::time::Duration,
}

/// Shared, reloadable rate limits of one ingest edge.
#[derive(Clone, Default)]
pub struct RateLimits {
    active: Arc<RwLock<Option<Arc<Active>>>>,
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
        let active = NonZeroU32::new(settings.rate_limit_per_ip_per_second).map(|rate| {
            let burst = NonZeroU32::new(settings.rate_limit_burst).unwrap_or(rate);
            let quota = Quota::per_second(rate).allow_burst(burst);
            Arc::new(Active {
                limiter: RateLimiter::dashmap(quota)
                    .with_middleware::<StateInformationMiddleware>(),
                burst: burst.get(),
                replenish: quota.replenish_interval(),
            })
        });
        if let Ok(mut slot) = self.active.write() {
            *slot = active;
        }
    }

    /// Takes one request from `ip`'s bucket.
    pub fn check(&self, ip: IpAddr) -> Decision {
        let Some(active) = self.active.read().ok().and_then(|a| a.clone()) else {
            return Decision::Unlimited;
        };
        match active.limiter.check_key(&ip) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let missing = active.burst.saturating_sub(remaining);
                Decision::Allowed {
                    limit: active.burst,
                    remaining,
                    reset_secs: (active.replenish * missing).as_secs_f64().ceil() as u64,
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Decision::Limited {
                    limit: active.burst,
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

/// Middleware: limits by the peer's IP (the connection's address).
pub async fn limit(State(limits): State<RateLimits>, request: Request, next: Next) -> Response {
    let ip = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    match limits.check(ip) {
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
