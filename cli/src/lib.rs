//! The orderflow binary's wiring: which roles run, on which broker and database, and how they
//! start and stop together. No role logic lives here.
//!
//! - [`pipeline`] starts any set of roles on a shared cancellation token and drains them.
//! - [`supervisor`] owns the tasks of those roles and what their ends mean (exit status).
//! - [`embedded`] is what `orderflow dev` adds: the embedded broker that keeps its log in the
//!   data directory, and the check that the database's tables describe that log.
//! - [`dlq`] shows the dead letters and redrives or discards them (`orderflow dlq`).
//! - [`admin`] holds the operator commands: inventory load, review, the stand-alone broker.
//! - [`shadow`] creates a shadow saga's topics and compares its outputs with the live ones.
//! - [`requirements`] decides what each role needs from its configuration.
//! - [`loadgen`] posts realistic random orders to a running instance and reads back the result.

pub mod admin;
pub mod backup;
pub mod dlq;
pub mod embedded;
pub mod loadgen;
pub mod pipeline;
pub mod requirements;
pub mod shadow;
pub mod supervisor;

/// A URL with any password replaced, for printing.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}://{user}:***{}", &url[..scheme_end], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// A time in ms since the epoch as RFC 3339 (UTC).
pub fn format_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}
