//! Placement: which host should get a new volume or instance. As nova's filter scheduler does it: every
//! host of the services table goes through the filters; the hosts that pass are weighed, each weigher's
//! values normalised to 0..1 over those hosts and multiplied by its multiplier; the best
//! `host_subset_size` are the candidates, one picked at random, the rest kept as alternates in order.

use std::time::Duration;

use serde::Serialize;

use crate::client::HostEntry;
use crate::report::{BackendReport, HostState, Report};

/// What is to be placed.
#[derive(Debug, Clone)]
pub struct Ask {
    /// The service (`volume`, `compute`).
    pub service: String,
    /// The backend (default: each host's default backend for the service).
    pub backend: Option<String>,
    /// Bytes needed (volumes).
    pub size: Option<u64>,
    /// Labels a host must carry, each `key = value`.
    pub labels: Vec<(String, String)>,
    /// Driver extensions the backend must provide.
    pub extensions: Vec<String>,
    /// The lowest protocol version a host may speak.
    pub min_api: u32,
    /// Multipliers by weigher name (unnamed weighers keep their default).
    pub weighers: Vec<(String, f64)>,
    /// Candidates to pick from at random among the best.
    pub host_subset_size: usize,
    /// A host whose last report is older than this is down.
    pub service_down_time: Duration,
}

/// The weighers, their defaults, and what they read.
pub const WEIGHERS: &[(&str, f64, &str)] = &[
    ("free", 1.0, "free bytes of the backend (more is better)"),
    ("records", 0.0, "records the backend holds (more is better: use a negative multiplier to spread)"),
    ("failures", -1.0, "failed driver calls the backend reported (more is worse)"),
];

/// The filters, in the order they run.
pub const FILTERS: &[&str] = &["up", "service", "backend_up", "api", "extensions", "capacity", "labels"];

/// One filter's verdict on one host.
#[derive(Debug, Clone, Serialize)]
pub struct FilterVerdict {
    /// The filter.
    pub filter: &'static str,
    /// Whether the host passed it.
    pub passed: bool,
    /// What it saw.
    pub detail: String,
}

/// One weigher's contribution to a host's weight.
#[derive(Debug, Clone, Serialize)]
pub struct Weight {
    /// The weigher.
    pub weigher: String,
    /// Its raw value.
    pub raw: f64,
    /// Normalised over the hosts that passed (0..1).
    pub normalized: f64,
    /// Its multiplier.
    pub multiplier: f64,
}

/// What placement decided about one host.
#[derive(Debug, Clone, Serialize)]
pub struct HostVerdict {
    /// The host.
    pub host: String,
    /// Its backend considered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// The filter that dropped it (none: it passed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped_by: Option<&'static str>,
    /// Every filter's verdict, up to the one that dropped it.
    pub filters: Vec<FilterVerdict>,
    /// Its weight (hosts that passed).
    pub weight: f64,
    /// Each weigher's part.
    pub weights: Vec<Weight>,
}

/// The outcome: the chosen host first, then the alternates in order; and every host that was dropped.
#[derive(Debug, Clone, Serialize)]
pub struct Placement {
    /// Hosts that passed, best first (the first is the choice).
    pub ranked: Vec<HostVerdict>,
    /// Hosts that did not pass.
    pub dropped: Vec<HostVerdict>,
}

fn filter(entry: &HostEntry, ask: &Ask) -> (Vec<FilterVerdict>, Option<&'static str>, Option<BackendReport>) {
    let mut verdicts = Vec::new();
    let mut check = |filter: &'static str, passed: bool, detail: String| {
        verdicts.push(FilterVerdict { filter, passed, detail });
        passed
    };
    let report: &Report = match &entry.report {
        Ok(r) => r,
        Err(e) => {
            check("up", false, e.clone());
            return (verdicts, Some("up"), None);
        }
    };
    let age = entry.age;
    let fresh = !report.is_down(age, ask.service_down_time);
    let stopping = report.state == HostState::Stopping;
    let limit = if report.service_down_time_ms > 0 {
        Duration::from_millis(report.service_down_time_ms)
    } else {
        ask.service_down_time
    };
    let up_detail = format!(
        "last report {:.1}s ago (down after {:.1}s), state {}",
        age.as_secs_f64(),
        limit.as_secs_f64(),
        report.state.as_str()
    );
    if !check("up", fresh && !stopping, up_detail) {
        return (verdicts, Some("up"), None);
    }
    let Some(service) = report.services.iter().find(|s| s.name == ask.service) else {
        check("service", false, format!("no {} service", ask.service));
        return (verdicts, Some("service"), None);
    };
    let name = ask.backend.as_deref().unwrap_or(&service.default_backend);
    let Some(backend) = service.backends.iter().find(|b| b.name == name) else {
        check("service", false, format!("no {} backend {name:?}", ask.service));
        return (verdicts, Some("service"), None);
    };
    check("service", true, format!("{} backend {name:?}", ask.service));
    let why = backend.reason.clone().unwrap_or_else(|| "down".to_owned());
    if !check("backend_up", backend.up, if backend.up { "up".to_owned() } else { why }) {
        return (verdicts, Some("backend_up"), None);
    }
    if !check("api", report.api >= ask.min_api, format!("api {} (need {})", report.api, ask.min_api)) {
        return (verdicts, Some("api"), None);
    }
    let missing: Vec<&str> =
        ask.extensions.iter().filter(|e| !backend.extensions.contains(e)).map(String::as_str).collect();
    let detail = if missing.is_empty() {
        format!("has [{}]", ask.extensions.join(", "))
    } else {
        format!("lacks [{}]", missing.join(", "))
    };
    if !check("extensions", missing.is_empty(), detail) {
        return (verdicts, Some("extensions"), None);
    }
    let (fits, detail) = match (ask.size, backend.free_bytes) {
        (Some(size), Some(free)) => (free >= size, format!("{free} bytes free, {size} needed")),
        (Some(size), None) => (false, format!("reports no capacity, {size} bytes needed")),
        (None, Some(free)) => (true, format!("{free} bytes free")),
        (None, None) => (true, "no capacity asked".to_owned()),
    };
    if !check("capacity", fits, detail) {
        return (verdicts, Some("capacity"), None);
    }
    let unmatched: Vec<String> = ask
        .labels
        .iter()
        .filter(|(k, v)| report.labels.get(k) != Some(v))
        .map(|(k, v)| format!("{k}={v} (has {})", report.labels.get(k).map_or("none", String::as_str)))
        .collect();
    let detail = if unmatched.is_empty() { "match".to_owned() } else { unmatched.join(", ") };
    if !check("labels", unmatched.is_empty(), detail) {
        return (verdicts, Some("labels"), None);
    }
    (verdicts, None, Some(backend.clone()))
}

/// A number in `0..n` that differs from call to call (picking among equals; not for secrets).
fn pick(n: usize) -> usize {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    (nanos as usize / 7) % n.max(1)
}

/// Filters and weighs every host of the services table for `ask`. Unknown weigher names are an error
/// naming the known ones.
pub fn place(entries: &[HostEntry], ask: &Ask) -> Result<Placement, String> {
    for (name, _) in &ask.weighers {
        if !WEIGHERS.iter().any(|(w, _, _)| w == name) {
            let known: Vec<&str> = WEIGHERS.iter().map(|(w, _, _)| *w).collect();
            return Err(format!("unknown weigher {name:?} (known: {})", known.join(", ")));
        }
    }
    let mut passed = Vec::new();
    let mut dropped = Vec::new();
    for entry in entries {
        let (filters, dropped_by, backend) = filter(entry, ask);
        let verdict = HostVerdict {
            host: entry.host.clone(),
            backend: backend.as_ref().map(|b| b.name.clone()),
            dropped_by,
            filters,
            weight: 0.0,
            weights: Vec::new(),
        };
        match backend {
            Some(b) => passed.push((verdict, b)),
            None => dropped.push(verdict),
        }
    }
    for (name, default, _) in WEIGHERS {
        let multiplier = ask.weighers.iter().rev().find(|(w, _)| w == name).map_or(*default, |(_, m)| *m);
        let raw: Vec<f64> = passed
            .iter()
            .map(|(_, b)| match *name {
                "free" => b.free_bytes.unwrap_or(0) as f64,
                "records" => b.records as f64,
                _ => b.failures as f64,
            })
            .collect();
        let (lo, hi) = raw.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        for ((verdict, _), raw) in passed.iter_mut().zip(raw) {
            let normalized = if hi > lo { (raw - lo) / (hi - lo) } else { 0.0 };
            verdict.weight += multiplier * normalized;
            verdict.weights.push(Weight { weigher: (*name).to_owned(), raw, normalized, multiplier });
        }
    }
    let mut ranked: Vec<HostVerdict> = passed.into_iter().map(|(v, _)| v).collect();
    ranked.sort_by(|a, b| b.weight.total_cmp(&a.weight).then_with(|| a.host.cmp(&b.host)));
    let subset = ask.host_subset_size.max(1).min(ranked.len());
    if subset > 1 {
        let chosen = pick(subset);
        ranked[..=chosen].rotate_right(1);
    }
    dropped.sort_by(|a, b| a.host.cmp(&b.host));
    Ok(Placement { ranked, dropped })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::ServiceReport;

    fn host(name: &str, free: u64, labels: &[(&str, &str)]) -> HostEntry {
        HostEntry {
            host: name.to_owned(),
            age: Duration::from_secs(1),
            report: Ok(Report {
                host: name.to_owned(),
                fleet: "f".to_owned(),
                version: "0".to_owned(),
                api: 1,
                plugin_api: "1.2.0".to_owned(),
                started_at: 0,
                state: HostState::Up,
                service_down_time_ms: 0,
                labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
                services: vec![ServiceReport {
                    name: "volume".to_owned(),
                    default_backend: "default".to_owned(),
                    backends: vec![BackendReport {
                        name: "default".to_owned(),
                        up: true,
                        reason: None,
                        driver: "fake-volume".to_owned(),
                        driver_version: "1".to_owned(),
                        digest: "d".to_owned(),
                        extensions: vec![],
                        total_bytes: Some(free * 2),
                        free_bytes: Some(free),
                        records: 0,
                        failures: 0,
                    }],
                }],
            }),
        }
    }

    fn ask(size: u64) -> Ask {
        Ask {
            service: "volume".to_owned(),
            backend: None,
            size: Some(size),
            labels: vec![],
            extensions: vec![],
            min_api: 1,
            weighers: vec![],
            host_subset_size: 1,
            service_down_time: Duration::from_secs(60),
        }
    }

    fn order(p: &Placement) -> Vec<&str> {
        p.ranked.iter().map(|v| v.host.as_str()).collect()
    }

    #[test]
    fn most_free_first_and_a_negative_multiplier_turns_it_round() {
        let hosts = [host("a", 100, &[]), host("b", 300, &[]), host("c", 200, &[])];
        assert_eq!(order(&place(&hosts, &ask(10)).unwrap()), ["b", "c", "a"]);
        let mut least = ask(10);
        least.weighers = vec![("free".to_owned(), -1.0)];
        assert_eq!(order(&place(&hosts, &least).unwrap()), ["a", "c", "b"]);
        assert!(place(&hosts, &{
            let mut a = ask(1);
            a.weighers = vec![("ram".to_owned(), 1.0)];
            a
        })
        .unwrap_err()
        .contains("unknown weigher \"ram\" (known: free, records, failures)"));
    }

    #[test]
    fn each_filter_names_itself() {
        let mut stale = host("stale", 500, &[]);
        stale.age = Duration::from_secs(61);
        let mut stopping = host("stopping", 500, &[]);
        if let Ok(r) = &mut stopping.report {
            r.state = HostState::Stopping;
        }
        let mut down = host("down", 500, &[]);
        if let Ok(r) = &mut down.report {
            r.services[0].backends[0].up = false;
            r.services[0].backends[0].reason = Some("init failed".to_owned());
        }
        let hosts = [
            stale,
            stopping,
            down,
            host("small", 5, &[]),
            host("ssd", 500, &[("disk", "ssd")]),
            host("hdd", 500, &[("disk", "hdd")]),
        ];
        let mut a = ask(10);
        a.labels = vec![("disk".to_owned(), "ssd".to_owned())];
        let p = place(&hosts, &a).unwrap();
        assert_eq!(order(&p), ["ssd"]);
        let by: Vec<(&str, &str)> = p.dropped.iter().map(|v| (v.host.as_str(), v.dropped_by.unwrap())).collect();
        assert_eq!(
            by,
            [("down", "backend_up"), ("hdd", "labels"), ("small", "capacity"), ("stale", "up"), ("stopping", "up")]
        );
        let hdd = p.dropped.iter().find(|v| v.host == "hdd").unwrap();
        assert_eq!(hdd.filters.last().unwrap().detail, "disk=ssd (has hdd)");
    }

    #[test]
    fn a_subset_picks_among_the_best_only() {
        let hosts = [host("a", 100, &[]), host("b", 300, &[]), host("c", 290, &[])];
        let mut a = ask(10);
        a.host_subset_size = 2;
        for _ in 0..50 {
            let first = place(&hosts, &a).unwrap().ranked[0].host.clone();
            assert!(first == "b" || first == "c", "{first}");
        }
    }
}
