//! Health endpoints for load balancers, on the agent port (HTTP/1.1 or HTTP/2 over the same
//! mutual TLS as the vouches: a client presents a certificate of the cluster CA, an `observer`
//! one for a load balancer).
//!
//! Paths and status codes mean what Patroni's do, so an HAProxy configuration written for
//! Patroni works unchanged (`option httpchk OPTIONS /primary`, `http-check expect status 200`);
//! `GET`, `HEAD` and `OPTIONS` are answered alike, other methods get 405:
//!
//! | path | 200 when |
//! |---|---|
//! | `/primary`, `/master`, `/leader`, `/read-write` | PostgreSQL is a writable primary and this agent's lease (or failsafe) still runs |
//! | `/replica` | a standby whose WAL receiver streams; with `?lag=N` (bytes, or `16MB`, `512kB`, ...) also at most that far behind its upstream |
//! | `/read-only` | `/primary` or `/replica` would answer 200 (same `?lag=`) |
//! | `/health` | PostgreSQL is running, whatever its role |
//! | `/liveness` | the agent's reconcile loop ran within the staleness bound |
//!
//! Otherwise 503, with the same JSON body (role, state, writable, lease time left, timeline,
//! streaming, lag). Invariants: a primary answers 503 on `/primary` from the instant its lease
//! runs out, before the agent has fenced it; an observation older than the staleness bound
//! counts as unknown (503 everywhere but `/liveness`), so a hung agent never keeps a node in a
//! load balancer.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::Response;
use tokio::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::pg::{PgObservation, ServerRole};

/// What the endpoints answer from: the last observation and the lease, shared with the
/// reconcile loop.
#[derive(Debug, Clone)]
pub struct Health {
    node: String,
    stale_after: Duration,
    inner: Arc<Mutex<Seen>>,
    counters: Counters,
}

/// What `/metrics` counts over the life of the process (shared by clones).
#[derive(Debug, Clone)]
struct Counters {
    reports: Family<Vec<(String, String)>, Counter>,
    report_seconds: Histogram,
    fences: Counter,
}

#[derive(Debug, Default)]
struct Seen {
    observed: Option<(Instant, Observed)>,
    /// When the lease (or failsafe) ends, as of the last loop iteration.
    writable_until: Option<Instant>,
    loop_at: Option<Instant>,
    /// The epoch of the goal the agent follows.
    epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Observed {
    role: &'static str,
    writable: bool,
    standby: bool,
    streaming: bool,
    timeline: Option<u32>,
    lag_bytes: Option<u64>,
}

/// An endpoint of the table in the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Primary,
    Replica,
    ReadOnly,
    Health,
    Liveness,
}

/// Every path served and what it answers, see the module documentation.
pub const PATHS: [(&str, Endpoint); 8] = [
    ("/primary", Endpoint::Primary),
    ("/master", Endpoint::Primary),
    ("/leader", Endpoint::Primary),
    ("/read-write", Endpoint::Primary),
    ("/replica", Endpoint::Replica),
    ("/read-only", Endpoint::ReadOnly),
    ("/health", Endpoint::Health),
    ("/liveness", Endpoint::Liveness),
];

impl Endpoint {
    pub fn from_path(path: &str) -> Option<Self> {
        PATHS.iter().find(|(p, _)| *p == path).map(|(_, e)| *e)
    }
}

/// Parses a `lag` bound: bytes, or a number with PostgreSQL's units (`B`, `kB`, `MB`, `GB`,
/// `TB`, powers of 1024).
pub fn parse_lag(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("lag={text:?}: expected bytes or a size such as 16MB"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "kB" | "KB" => 10,
        "MB" => 20,
        "GB" => 30,
        "TB" => 40,
        other => {
            return Err(format!(
                "lag={text:?}: unknown unit {other:?} (B, kB, MB, GB, TB)"
            ));
        }
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("lag={text:?}: too large"))
}

/// The `lag` parameter of a query string, if present.
fn lag_param(query: Option<&str>) -> Result<Option<u64>, String> {
    let Some(q) = query else { return Ok(None) };
    q.split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == "lag")
        .map(|(_, v)| parse_lag(v))
        .transpose()
}

impl Health {
    /// `stale_after`: how old an observation or loop iteration may be and still count.
    pub fn new(node: &str, stale_after: Duration) -> Self {
        Self {
            node: node.to_owned(),
            stale_after,
            inner: Arc::default(),
            counters: Counters {
                reports: Family::default(),
                // 1 ms to about 8 s.
                report_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
                fences: Counter::default(),
            },
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new observation of PostgreSQL; `None` when it could not be observed.
    pub fn observed(&self, obs: Option<&PgObservation>, at: Instant) {
        let observed = match obs {
            None => Observed {
                role: "unknown",
                writable: false,
                standby: false,
                streaming: false,
                timeline: None,
                lag_bytes: None,
            },
            Some(o) => Observed {
                role: match o.role {
                    ServerRole::Primary => "primary",
                    ServerRole::Standby => "replica",
                    ServerRole::Stopped(_) => "stopped",
                    ServerRole::Empty => "uninitialized",
                },
                writable: o.role == ServerRole::Primary && !o.read_only,
                standby: o.role == ServerRole::Standby,
                streaming: o.streaming,
                timeline: o.timeline.map(|t| t.0),
                lag_bytes: o.lag_bytes,
            },
        };
        self.lock().observed = Some((at, observed));
    }

    /// One iteration of the reconcile loop: when the lease (or failsafe) of a writable goal
    /// ends, `None` when there is none or the node is fenced.
    pub fn tick(&self, writable_until: Option<Instant>, epoch: u64, at: Instant) {
        let mut seen = self.lock();
        seen.writable_until = writable_until;
        seen.loop_at = Some(at);
        seen.epoch = epoch;
    }

    /// A report came back (`answered`) or failed, `round_trip` after it was sent.
    pub fn report(&self, answered: bool, round_trip: Duration) {
        let result = if answered { "answered" } else { "failed" };
        self.counters
            .reports
            .get_or_create(&vec![("result".to_owned(), result.to_owned())])
            .inc();
        self.counters
            .report_seconds
            .observe(round_trip.as_secs_f64());
    }

    /// The agent fenced its PostgreSQL because the lease ran out.
    pub fn fenced(&self) {
        self.counters.fences.inc();
    }

    /// The Prometheus text exposition of this node at `now` (module documentation of
    /// `/metrics`).
    pub fn metrics(&self, now: Instant) -> String {
        let s = self.snapshot(now);
        let o = s.observed.as_ref();
        let mut registry = Registry::with_prefix("ha_agent");
        let gauge = |registry: &mut Registry, name: &str, help: &str, value: f64| {
            let g = Gauge::<f64, AtomicU64>::default();
            g.set(value);
            registry.register(name, help, g);
        };
        let roles = Family::<Vec<(String, String)>, Gauge>::default();
        for r in ["primary", "replica", "stopped", "uninitialized", "unknown"] {
            roles
                .get_or_create(&vec![("role".to_owned(), r.to_owned())])
                .set(i64::from(r == s.role()));
        }
        registry.register(
            "postgres_role",
            "PostgreSQL's role as last observed (1 for the current one)",
            roles,
        );
        let one = |b: bool| if b { 1.0 } else { 0.0 };
        gauge(
            &mut registry,
            "postgres_up",
            "PostgreSQL runs as primary or replica",
            one(s.running()),
        );
        gauge(
            &mut registry,
            "writable",
            "A writable primary whose lease (or failsafe) runs: what /primary answers 200 for",
            one(s.writable),
        );
        gauge(
            &mut registry,
            "streaming",
            "A standby whose WAL receiver streams",
            one(o.is_some_and(|o| o.streaming)),
        );
        gauge(
            &mut registry,
            "lease_remaining_seconds",
            "Time left of the lease of a writable primary (0 without one)",
            s.lease_left.map_or(0.0, |d| d.as_secs_f64()),
        );
        #[allow(clippy::cast_precision_loss)]
        let lag = o.and_then(|o| o.lag_bytes).unwrap_or(0) as f64;
        gauge(
            &mut registry,
            "replication_lag_bytes",
            "Standby: bytes between its upstream's end of WAL and its replay (0 when not receiving)",
            lag,
        );
        #[allow(clippy::cast_precision_loss)]
        let epoch = s.epoch as f64;
        gauge(
            &mut registry,
            "epoch",
            "Epoch of the goal the agent follows",
            epoch,
        );
        gauge(
            &mut registry,
            "timeline",
            "PostgreSQL's timeline (0 when unknown)",
            f64::from(o.and_then(|o| o.timeline).unwrap_or(0)),
        );
        registry.register(
            "reports",
            "Reports to the monitors by result",
            self.counters.reports.clone(),
        );
        registry.register(
            "report_round_trip_seconds",
            "Time from sending a report to its answer or failure",
            self.counters.report_seconds.clone(),
        );
        registry.register(
            "fences",
            "Times the agent fenced its PostgreSQL after the lease ran out",
            self.counters.fences.clone(),
        );
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &registry);
        text
    }

    /// What the node is at `now`, stale observations counted as unknown.
    fn snapshot(&self, now: Instant) -> Snapshot {
        let seen = self.lock();
        let fresh = |at: Instant| now.saturating_duration_since(at) <= self.stale_after;
        let observed = seen
            .observed
            .as_ref()
            .filter(|(at, _)| fresh(*at))
            .map(|(_, o)| o.clone());
        let lease_left = seen
            .writable_until
            .map(|u| u.saturating_duration_since(now))
            .filter(|left| !left.is_zero());
        Snapshot {
            writable: observed.as_ref().is_some_and(|o| o.writable) && lease_left.is_some(),
            lease_left,
            live: seen.loop_at.is_some_and(fresh),
            epoch: seen.epoch,
            observed,
        }
    }

    /// The status code and JSON body for `endpoint` at `now`.
    pub fn answer(
        &self,
        endpoint: Endpoint,
        lag: Option<u64>,
        now: Instant,
    ) -> (StatusCode, String) {
        let s = self.snapshot(now);
        let o = s.observed.as_ref();
        let within_lag =
            |o: &Observed| lag.is_none_or(|bound| o.lag_bytes.is_some_and(|l| l <= bound));
        let replica = o.is_some_and(|o| o.standby && o.streaming && within_lag(o));
        let ok = match endpoint {
            Endpoint::Primary => s.writable,
            Endpoint::Replica => replica,
            Endpoint::ReadOnly => s.writable || replica,
            Endpoint::Health => s.running(),
            Endpoint::Liveness => s.live,
        };
        let body = serde_json::json!({
            "node": self.node,
            "role": s.role(),
            "state": if s.running() { "running" } else { "not running" },
            "writable": s.writable,
            "lease_left_ms": s.lease_left.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            "timeline": o.and_then(|o| o.timeline),
            "streaming": o.is_some_and(|o| o.streaming),
            "lag_bytes": o.and_then(|o| o.lag_bytes),
        });
        let code = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (code, body.to_string())
    }
}

/// [`Health::snapshot`].
struct Snapshot {
    observed: Option<Observed>,
    writable: bool,
    lease_left: Option<Duration>,
    live: bool,
    epoch: u64,
}

impl Snapshot {
    fn role(&self) -> &'static str {
        self.observed.as_ref().map_or("unknown", |o| o.role)
    }

    fn running(&self) -> bool {
        matches!(self.role(), "primary" | "replica")
    }
}

/// The content type of `/metrics`.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Adds the endpoints to the agent port's gRPC `router`, and answers every other path with 404
/// (tonic's own fallback answers HTTP 200 with a gRPC status, which a load balancer checking a
/// mistyped path would take for healthy).
pub fn add_routes(router: axum::Router, health: &Health) -> axum::Router {
    let metrics = health.clone();
    let mut router = router.route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                let mut r = Response::new(Body::from(metrics.metrics(Instant::now())));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(OPENMETRICS),
                );
                r
            }
        }),
    );
    for (path, endpoint) in PATHS {
        let health = health.clone();
        router = router.route(
            path,
            axum::routing::any(move |method: Method, uri: Uri| {
                let health = health.clone();
                async move { respond(&health, endpoint, &method, &uri) }
            }),
        );
    }
    router.fallback(|method: Method, uri: Uri| async move {
        refuse(
            &method,
            StatusCode::NOT_FOUND,
            &format!("no endpoint {}", uri.path()),
        )
    })
}

/// An error answer: `{"error": why}`.
fn refuse(method: &Method, code: StatusCode, why: &str) -> Response {
    reply(
        method,
        code,
        serde_json::json!({ "error": why }).to_string(),
    )
}

fn reply(method: &Method, code: StatusCode, body: String) -> Response {
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from(body)
    };
    let mut r = Response::new(body);
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn respond(health: &Health, endpoint: Endpoint, method: &Method, uri: &Uri) -> Response {
    if ![Method::GET, Method::HEAD, Method::OPTIONS].contains(method) {
        return refuse(
            method,
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET, HEAD and OPTIONS",
        );
    }
    match lag_param(uri.query()) {
        Ok(lag) => {
            let (code, body) = health.answer(endpoint, lag, Instant::now());
            reply(method, code, body)
        }
        Err(e) => refuse(method, StatusCode::BAD_REQUEST, &e),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn obs(role: ServerRole, streaming: bool, lag: Option<u64>) -> PgObservation {
        PgObservation {
            role,
            streaming,
            lag_bytes: lag,
            ..PgObservation::empty()
        }
    }

    fn codes(h: &Health, lag: Option<u64>, now: Instant) -> Vec<u16> {
        [
            Endpoint::Primary,
            Endpoint::Replica,
            Endpoint::ReadOnly,
            Endpoint::Health,
            Endpoint::Liveness,
        ]
        .iter()
        .map(|e| h.answer(*e, lag, now).0.as_u16())
        .collect()
    }

    #[test]
    fn a_primary_is_primary_only_while_its_lease_runs() {
        let h = Health::new("psql1", Duration::from_secs(2));
        let t0 = Instant::now();
        assert_eq!(
            codes(&h, None, t0),
            [503, 503, 503, 503, 503],
            "nothing seen yet"
        );
        h.observed(Some(&obs(ServerRole::Primary, false, None)), t0);
        h.tick(Some(t0 + Duration::from_secs(3)), 1, t0);
        assert_eq!(codes(&h, None, t0), [200, 503, 200, 200, 200]);
        let (_, body) = h.answer(Endpoint::Primary, None, t0);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["role"], "primary");
        assert_eq!(v["lease_left_ms"], 3000);
        // The lease ran out, not yet fenced: no longer primary at once.
        let later = t0 + Duration::from_secs(3);
        h.observed(Some(&obs(ServerRole::Primary, false, None)), later);
        assert_eq!(codes(&h, None, later)[..3], [503, 503, 503]);
        // No lease at all (fenced, or the goal is not writable).
        h.tick(None, 1, later);
        assert_eq!(codes(&h, None, later), [503, 503, 503, 200, 200]);
    }

    #[test]
    fn a_replica_streams_and_respects_the_lag_bound() {
        let h = Health::new("psql2", Duration::from_secs(2));
        let t0 = Instant::now();
        h.tick(None, 1, t0);
        h.observed(Some(&obs(ServerRole::Standby, true, Some(1000))), t0);
        assert_eq!(codes(&h, None, t0), [503, 200, 200, 200, 200]);
        assert_eq!(codes(&h, Some(1000), t0)[1], 200);
        assert_eq!(codes(&h, Some(999), t0)[..3], [503, 503, 503]);
        // Not streaming: not a replica to send reads to, though PostgreSQL runs.
        h.observed(Some(&obs(ServerRole::Standby, false, None)), t0);
        assert_eq!(codes(&h, None, t0), [503, 503, 503, 200, 200]);
    }

    #[test]
    fn stale_or_failed_observations_count_as_unknown() {
        let h = Health::new("psql2", Duration::from_secs(2));
        let t0 = Instant::now();
        h.tick(None, 1, t0);
        h.observed(Some(&obs(ServerRole::Standby, true, Some(0))), t0);
        let late = t0 + Duration::from_millis(2001);
        assert_eq!(codes(&h, None, late), [503, 503, 503, 503, 503]);
        h.tick(None, 1, late);
        h.observed(None, late);
        assert_eq!(codes(&h, None, late), [503, 503, 503, 503, 200]);
        let (_, body) = h.answer(Endpoint::Health, None, late);
        assert!(body.contains("\"role\":\"unknown\""), "{body}");
    }

    #[test]
    fn metrics_follow_the_role_the_lease_reports_and_fences() {
        let h = Health::new("psql1", Duration::from_secs(2));
        let t0 = Instant::now();
        h.observed(Some(&obs(ServerRole::Primary, false, None)), t0);
        h.tick(Some(t0 + Duration::from_millis(2500)), 4, t0);
        h.report(true, Duration::from_millis(3));
        h.report(false, Duration::from_secs(1));
        let text = h.metrics(t0);
        for line in [
            "ha_agent_postgres_role{role=\"primary\"} 1\n",
            "ha_agent_postgres_role{role=\"replica\"} 0\n",
            "ha_agent_writable 1.0\n",
            "ha_agent_lease_remaining_seconds 2.5\n",
            "ha_agent_epoch 4.0\n",
            "ha_agent_reports_total{result=\"answered\"} 1\n",
            "ha_agent_reports_total{result=\"failed\"} 1\n",
            "ha_agent_report_round_trip_seconds_count 2\n",
            "ha_agent_fences_total 0\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        h.fenced();
        h.tick(None, 4, t0);
        let text = h.metrics(t0);
        assert!(text.contains("ha_agent_writable 0.0\n"), "{text}");
        assert!(text.contains("ha_agent_fences_total 1\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn paths_and_lag_values() {
        for (p, e) in PATHS {
            assert_eq!(Endpoint::from_path(p), Some(e), "{p}");
        }
        assert_eq!(Endpoint::from_path("/master"), Some(Endpoint::Primary));
        assert_eq!(Endpoint::from_path("/read-write/"), None);
        assert_eq!(Endpoint::from_path("/read-only"), Some(Endpoint::ReadOnly));
        assert_eq!(Endpoint::from_path("/"), None);
        assert_eq!(parse_lag("16MB"), Ok(16 << 20));
        assert_eq!(parse_lag("512kB"), Ok(512 << 10));
        assert_eq!(parse_lag("100"), Ok(100));
        assert!(parse_lag("ten").unwrap_err().contains("expected bytes"));
        assert!(parse_lag("1PB").unwrap_err().contains("unknown unit"));
        assert!(
            parse_lag("99999999999TB")
                .unwrap_err()
                .contains("too large")
        );
        assert_eq!(lag_param(Some("x=1&lag=1kB")), Ok(Some(1024)));
        assert_eq!(
            lag_param(Some("lag")).unwrap_err(),
            parse_lag("").unwrap_err()
        );
        assert_eq!(lag_param(None), Ok(None));
    }
}
