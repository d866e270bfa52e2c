//! Rate limits at an edge listener: GCRA (governor) per client IP and per authenticated
//! principal (API key or token subject), from `ingest.rate_limit_*` or `query.rate_limit_*`,
//! with `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` on every limited response
//! (of the tighter of the two buckets) and `Retry-After` on `429`. [`RateLimits::reload`] swaps
//! in new limits while serving (the binary calls it on SIGHUP after re-reading its
//! configuration); buckets start full again.
//!
//! - **Who the client is.** The connection's peer, unless the peer is one of the listener's
//!   `trusted_proxies`: then the `Forwarded` header's `for=` hops (or, without it,
//!   `X-Forwarded-For`'s), read from the nearest proxy outwards, and the first hop that is not a
//!   trusted proxy is the client ([`client_ip`]). From any other peer those headers are
//!   ignored: a caller cannot pick its own bucket.
//! - **Bounded.** A bucket that has refilled says nothing a fresh one would not, so
//!   [`RateLimits::retain_recent`] drops them; the binary calls it every
//!   [`EVICT_INTERVAL`]. The store then holds only the clients seen within about one refill
//!   time (burst ÷ rate), however many distinct addresses have called.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    num::NonZeroU32,
    sync::{Arc, RwLock},
    time::Duration,
};

use axum::{
    extract::{ConnectInfo, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use governor::{
    clock::{Clock, DefaultClock},
    middleware::StateInformationMiddleware,
    state::keyed::DashMapStateStore,
    Quota, RateLimiter,
};
use ipnet::IpNet;
use orderflow_platform::{config::RateLimitSettings, http::Problem};

/// How often the binary drops refilled buckets ([`RateLimits::retain_recent`]).
pub const EVICT_INTERVAL: Duration = Duration::from_secs(10);

type Limiter =
    RateLimiter<String, DashMapStateStore<String>, DefaultClock, StateInformationMiddleware>;

/// The limiter in force and its quota; `None` when limiting is off.
struct Active {
    limiter: Limiter,
    burst: u32,
    /// Time for one request's worth of capacity to come back.
    replenish: std::time::Duration,
}

/// The limiters in force: per IP and per principal, and who may name the client.
#[derive(Default)]
struct Limiters {
    per_ip: Option<Arc<Active>>,
    per_principal: Option<Arc<Active>>,
    trusted_proxies: Arc<Vec<IpNet>>,
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
    pub fn new(settings: &RateLimitSettings) -> Self {
        let limits = Self::default();
        limits.reload(settings);
        limits
    }

    /// Replaces the limits with those of `settings` (0 requests per second: off).
    pub fn reload(&self, settings: &RateLimitSettings) {
        let per_ip = Active::new(settings.per_ip_per_second, settings.ip_burst);
        let per_principal =
            Active::new(settings.per_principal_per_second, settings.principal_burst);
        if let Ok(mut slot) = self.active.write() {
            *slot = Limiters {
                per_ip,
                per_principal,
                trusted_proxies: Arc::new(settings.trusted_proxies.clone()),
            };
        }
    }

    /// Drops every bucket that has refilled (module docs); returns how many are left.
    pub fn retain_recent(&self) -> usize {
        let (per_ip, per_principal) = match self.active.read() {
            Ok(l) => (l.per_ip.clone(), l.per_principal.clone()),
            Err(_) => return 0,
        };
        [per_ip, per_principal]
            .into_iter()
            .flatten()
            .map(|active| {
                active.limiter.retain_recent();
                active.limiter.shrink_to_fit();
                active.limiter.len()
            })
            .sum()
    }

    /// Buckets held now, per IP and per principal together.
    pub fn tracked(&self) -> usize {
        match self.active.read() {
            Ok(l) => [&l.per_ip, &l.per_principal]
                .into_iter()
                .flatten()
                .map(|a| a.limiter.len())
                .sum(),
            Err(_) => 0,
        }
    }

    /// The proxies trusted to name the client.
    fn trusted_proxies(&self) -> Arc<Vec<IpNet>> {
        self.active
            .read()
            .map(|l| l.trusted_proxies.clone())
            .unwrap_or_default()
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
    }
}

fn header(value: u64) -> HeaderValue {
    HeaderValue::from(value)
}

/// The client of a request that came from `peer` (module docs): `peer` itself unless it is a
/// trusted proxy; else the nearest hop of `Forwarded` (or `X-Forwarded-For`) that is not a
/// trusted proxy — or the farthest hop, if every one is. A header that names no address leaves
/// the peer as the client.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops = forwarded_hops(headers);
    hops.iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .or_else(|| hops.first())
        .copied()
        .unwrap_or(peer)
}

/// The client-to-proxy hops a request names, farthest first: `Forwarded`'s `for=` parameters
/// (RFC 7239) if the header is there, else `X-Forwarded-For`'s list. Hops that are not
/// addresses (`unknown`, obfuscated names) are left out.
fn forwarded_hops(headers: &HeaderMap) -> Vec<IpAddr> {
    let forwarded: Vec<&str> = headers
        .get_all("forwarded")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if !forwarded.is_empty() {
        return forwarded
            .iter()
            .flat_map(|v| v.split(','))
            .filter_map(|element| {
                element.split(';').find_map(|pair| {
                    let (name, value) = pair.trim().split_once('=')?;
                    name.trim()
                        .eq_ignore_ascii_case("for")
                        .then(|| parse_node(value.trim().trim_matches('"')))
                        .flatten()
                })
            })
            .collect();
    }
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|hop| parse_node(hop.trim()))
        .collect()
}

/// An address as `Forwarded` and `X-Forwarded-For` write it: `192.0.2.1`, `192.0.2.1:4711`,
/// `2001:db8::1` or `[2001:db8::1]:4711`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = node.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    node.parse::<SocketAddr>().ok().map(|a| a.ip())
}

/// Middleware: limits by the client's IP ([`client_ip`]) and, after
/// [`crate::http::authenticate`], by the caller's principal.
pub async fn limit(State(limits): State<RateLimits>, request: Request, next: Next) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let ip = client_ip(peer, request.headers(), &limits.trusted_proxies());
    let principal = request
        .extensions()
        .get::<crate::Caller>()
        .and_then(crate::Caller::principal)
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

    fn settings(rate: u32, burst: u32) -> RateLimitSettings {
        RateLimitSettings {
            per_ip_per_second: rate,
            ip_burst: burst,
            per_principal_per_second: rate,
            principal_burst: burst,
            trusted_proxies: Vec::new(),
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
        let limits = RateLimits::new(&RateLimitSettings {
            per_ip_per_second: 0,
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

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                axum::http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn the_client_is_the_peer_unless_a_trusted_proxy_names_another() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().expect("cidr")];
        let forwarded = headers(&[("x-forwarded-for", "203.0.113.7, 10.1.1.1")]);
        // An untrusted peer cannot choose its bucket by sending the header.
        assert_eq!(
            client_ip(ip("198.51.100.9"), &forwarded, &trusted),
            ip("198.51.100.9")
        );
        // Through two trusted hops: the nearest untrusted one is the client.
        assert_eq!(
            client_ip(ip("10.2.2.2"), &forwarded, &trusted),
            ip("203.0.113.7")
        );
        // A spoofed hop in front of the real client does not win: read from the nearest proxy.
        let spoofed = headers(&[("x-forwarded-for", "1.2.3.4, 203.0.113.7")]);
        assert_eq!(
            client_ip(ip("10.2.2.2"), &spoofed, &trusted),
            ip("203.0.113.7")
        );
        // RFC 7239 Forwarded takes precedence, quoted IPv6 with a port included.
        let rfc = headers(&[
            (
                "forwarded",
                r#"for="[2001:db8:cafe::17]:4711";proto=https, for=10.3.3.3"#,
            ),
            ("x-forwarded-for", "198.51.100.1"),
        ]);
        assert_eq!(
            client_ip(ip("10.2.2.2"), &rfc, &trusted),
            ip("2001:db8:cafe::17")
        );
        // Every hop trusted: the farthest; no usable header: the peer.
        let internal = headers(&[("x-forwarded-for", "10.9.9.9, 10.8.8.8")]);
        assert_eq!(
            client_ip(ip("10.2.2.2"), &internal, &trusted),
            ip("10.9.9.9")
        );
        let garbage = headers(&[("x-forwarded-for", "unknown, _hidden")]);
        assert_eq!(
            client_ip(ip("10.2.2.2"), &garbage, &trusted),
            ip("10.2.2.2")
        );
        // No trusted proxies (the default): headers never count.
        assert_eq!(client_ip(ip("10.2.2.2"), &forwarded, &[]), ip("10.2.2.2"));
    }

    /// A flood of distinct client addresses, each with one request: every one gets a bucket.
    /// Once the buckets have refilled (a millisecond at 1 000 requests per second and a burst
    /// of one), `retain_recent` drops them all: an unbounded store would hold 50 000 and grow
    /// with every new address.
    #[test]
    fn a_flood_of_distinct_addresses_leaves_no_buckets_behind() {
        let limits = RateLimits::new(&RateLimitSettings {
            per_ip_per_second: 1_000,
            ip_burst: 1,
            ..RateLimitSettings::default()
        });
        for n in 0..50_000u32 {
            let address = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n));
            assert!(matches!(limits.check(address), Decision::Allowed { .. }));
        }
        assert_eq!(
            limits.tracked(),
            50_000,
            "one bucket per address while fresh"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = limits.retain_recent();
            if left == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{left} buckets still held 10 s after the flood"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(limits.tracked(), 0);
    }
}
