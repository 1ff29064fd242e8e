//! Metrics: the host's state as OpenMetrics text (the Prometheus project's prometheus-client encodes
//! it), for `ctl metrics` (socket op `metrics`, open to readers) and the opt-in HTTP listener
//! (`--metrics-listen`: `GET /metrics`, `GET /healthz`). Every scrape takes a fresh snapshot; nothing
//! is kept between scrapes and nothing runs when nobody asks.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;

use super::host::Host;
use crate::backend::stats::{Totals, ERROR_KINDS, LATENCY_BOUNDS_NS, SAMPLE_EVERY};
use crate::control::protocol::State;
use crate::control::status::HostStatus;

/// Each method's call totals of one backend: (service, backend, [(method, totals)]).
type BackendCalls = (String, String, Vec<(&'static str, Totals)>);
/// One service's record counts: (service, (backend, status) → count).
type RecordCounts = (String, BTreeMap<(String, String), u64>);

/// What one scrape reports.
#[derive(Debug)]
struct Snapshot {
    status: HostStatus,
    calls: Vec<BackendCalls>,
    records: Vec<RecordCounts>,
}

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// Encodes one family: `(labels, value)` for each member.
fn family<V: Copy>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    ty: MetricType,
    members: &[(Labels, V)],
    encode: impl Fn(&mut prometheus_client::encoding::MetricEncoder<'_>, V) -> Result<(), std::fmt::Error>,
) -> Result<(), std::fmt::Error> {
    if members.is_empty() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(name, help, None, ty)?;
    for (l, v) in members {
        let mut m = metric.encode_family(l)?;
        encode(&mut m, *v)?;
    }
    Ok(())
}

fn gauges(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, members: &[(Labels, f64)]) -> std::fmt::Result {
    family(e, name, help, MetricType::Gauge, members, |m, v| m.encode_gauge(&v))
}

fn counters(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, members: &[(Labels, u64)]) -> std::fmt::Result {
    family(e, name, help, MetricType::Counter, members, |m, v| {
        m.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&v, None)
    })
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let st = &self.status;
        let info = labels(&[
            ("version", env!("CARGO_PKG_VERSION")),
            ("plugin_api", plughost_api::API_VERSION),
            ("protocol", &crate::control::protocol::PROTOCOL_VERSION.to_string()),
        ]);
        let mut m = e.encode_descriptor("build", "plughost's build", None, MetricType::Info)?;
        m.encode_info(&info)?;
        gauges(&mut e, "uptime_seconds", "time since the host started", &[(vec![], st.uptime_ms as f64 / 1000.0)])?;
        gauges(&mut e, "requests_in_flight", "requests being handled", &[(vec![], st.in_flight as f64)])?;

        let mut up = Vec::new();
        let mut capacity = Vec::new();
        let mut restarts = Vec::new();
        let mut crashes = Vec::new();
        let mut heartbeat = Vec::new();
        for s in &st.services {
            if let Some(age) = s.heartbeat_age_ms {
                heartbeat.push((labels(&[("service", &s.name)]), age as f64 / 1000.0));
            }
            for b in &s.backends {
                let l = labels(&[("service", &s.name), ("backend", &b.name)]);
                let mut with_driver = l.clone();
                with_driver.push(("driver".to_owned(), b.driver.name.clone()));
                with_driver.push(("isolation".to_owned(), b.isolation.clone()));
                up.push((with_driver, if b.state == State::Up { 1.0 } else { 0.0 }));
                if let Some(c) = b.capacity {
                    for (what, v) in
                        [("total", c.total_bytes), ("free", c.free_bytes), ("provisioned", c.provisioned_bytes)]
                    {
                        let mut l = l.clone();
                        l.push(("kind".to_owned(), what.to_owned()));
                        capacity.push((l, v as f64));
                    }
                }
                if let Some(w) = &b.worker {
                    restarts.push((l.clone(), w.restarts));
                    crashes.push((l.clone(), w.crashes));
                }
            }
        }
        gauges(&mut e, "backend_up", "1 when the backend serves (its driver initialised and healthy)", &up)?;
        gauges(&mut e, "service_heartbeat_age_seconds", "time since the service's last periodic round", &heartbeat)?;
        gauges(
            &mut e,
            "backend_capacity_bytes",
            "capacity the driver reports, by kind (total, free, provisioned)",
            &capacity,
        )?;
        counters(&mut e, "worker_restarts", "restarts of an isolated backend's worker after a crash", &restarts)?;
        counters(&mut e, "worker_crashes", "crashes of an isolated backend's worker", &crashes)?;

        let mut calls = Vec::new();
        let mut errors = Vec::new();
        let mut latency = Vec::new();
        for (service, backend, methods) in &self.calls {
            for (method, t) in methods.iter().filter(|(_, t)| t.count > 0) {
                let l = labels(&[("service", service), ("backend", backend), ("method", method)]);
                calls.push((l.clone(), t.count));
                for (kind, n) in ERROR_KINDS.iter().zip(t.errors_by_kind).filter(|(_, n)| *n > 0) {
                    let mut l = l.clone();
                    l.push(("kind".to_owned(), (*kind).to_owned()));
                    errors.push((l, n));
                }
                latency.push((l, *t));
            }
        }
        counters(&mut e, "driver_calls", "driver calls by method", &calls)?;
        counters(&mut e, "driver_call_errors", "driver calls that failed, by method and error kind", &errors)?;
        if !latency.is_empty() {
            let help = format!("driver call latency (timed on one call in {SAMPLE_EVERY} per thread and method)");
            let mut metric = e.encode_descriptor("driver_call_duration_seconds", &help, None, MetricType::Histogram)?;
            for (l, t) in &latency {
                // Per-bucket counts: the encoder sums them into the cumulative `le` series.
                let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS_NS
                    .iter()
                    .map(|b| *b as f64 / 1e9)
                    .chain(std::iter::once(f64::INFINITY))
                    .zip(t.latency)
                    .collect();
                let mut m = metric.encode_family(l)?;
                m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    t.total_ns as f64 / 1e9,
                    t.sampled,
                    &buckets,
                    None,
                )?;
            }
        }

        let mut records = Vec::new();
        for (service, counts) in &self.records {
            for ((backend, status), n) in counts {
                records.push((labels(&[("service", service), ("backend", backend), ("status", status)]), *n as f64));
            }
        }
        gauges(&mut e, "records", "records held, by backend and status", &records)?;

        let libs = &st.libraries;
        gauges(&mut e, "libraries_mapped", "distinct driver library contents mapped", &[(vec![], libs.mapped as f64)])?;
        gauges(&mut e, "libraries_mapped_bytes", "their total size", &[(vec![], libs.mapped_bytes as f64)])?;
        gauges(
            &mut e,
            "libraries_retired",
            "mapped but no longer used (never unloaded)",
            &[(vec![], libs.retired as f64)],
        )?;

        if let Some(f) = &st.fleet {
            let connected = if f.state == "connected" { 1.0 } else { 0.0 };
            gauges(
                &mut e,
                "fleet_connected",
                "1 while connected to the fleet's broker",
                &[(labels(&[("fleet", &f.fleet), ("host", &f.host)]), connected)],
            )?;
            let outcomes = [("served", f.requests), ("busy", f.refused_busy), ("expired", f.expired)];
            let members: Vec<(Labels, u64)> = outcomes.iter().map(|(o, n)| (labels(&[("outcome", o)]), *n)).collect();
            counters(&mut e, "fleet_requests", "remote requests by outcome", &members)?;
            counters(
                &mut e,
                "fleet_failed_reports",
                "reports to the services table that failed",
                &[(vec![], f.failed_reports)],
            )?;
        }
        Ok(())
    }
}

impl Host {
    /// The host's metrics as OpenMetrics text.
    pub fn metrics(&self) -> String {
        let snapshot = Snapshot {
            status: self.status(),
            calls: self
                .services
                .iter()
                .flat_map(|s| {
                    s.backends().iter().map(move |b| (s.kind().name.to_owned(), b.name().to_owned(), b.call_totals()))
                })
                .collect(),
            records: self.services.iter().map(|s| (s.kind().name.to_owned(), s.records_by_status())).collect(),
        };
        let mut registry = prometheus_client::registry::Registry::with_prefix("plughost");
        registry.register_collector(Box::new(snapshot));
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
            log::error!("metrics: cannot encode: {e}");
        }
        text
    }
}

/// Serves `GET /metrics` and `GET /healthz` on `addr` (opt-in: `--metrics-listen`), one connection at a
/// time, each bounded (8 KiB of request, 2 s to send it).
pub(crate) fn listen(host: Arc<Host>, addr: SocketAddr) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("metrics_listen {addr}: cannot listen: {e}"))?;
    std::thread::Builder::new()
        .name("metrics".to_owned())
        .spawn(move || {
            for stream in listener.incoming() {
                if host.stopping() {
                    break;
                }
                if let Ok(s) = stream {
                    if let Err(e) = serve_http(&host, s) {
                        log::debug!("metrics: {e}");
                    }
                }
            }
        })
        .map_err(|e| format!("cannot start the metrics listener: {e}"))?;
    Ok(())
}

fn serve_http(host: &Host, stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = std::io::BufReader::new(std::io::Read::take(stream.try_clone()?, 8192));
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // The headers are read and ignored (up to the 8 KiB cap).
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (code, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (200, "application/openmetrics-text; version=1.0.0; charset=utf-8", host.metrics()),
        ("GET", "/healthz") => {
            let (_, problems) = host.status().problems();
            if problems.is_empty() {
                (200, "text/plain; charset=utf-8", "ok\n".to_owned())
            } else {
                (503, "text/plain; charset=utf-8", problems.join("\n") + "\n")
            }
        }
        ("GET", _) => (404, "text/plain; charset=utf-8", "not found: try /metrics or /healthz\n".to_owned()),
        _ => (405, "text/plain; charset=utf-8", "only GET\n".to_owned()),
    };
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}
