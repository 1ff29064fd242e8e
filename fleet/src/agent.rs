//! A host's side of the fleet: the broker connection, remote requests, and the reports.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_nats::{ConnectOptions, Event};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::report::Report;
use crate::settings::{Credentials, FleetSettings};
use crate::subject::{self, Addressed};

/// A remote request, as the host's handler sees it.
#[derive(Debug)]
pub struct Incoming<'a> {
    /// What its subject addressed (service, backend, class).
    pub addressed: &'a Addressed,
    /// One line of the control protocol.
    pub payload: &'a [u8],
    /// Who asked, from the reply subject (`_INBOX.ph.<user>.…`), when it says.
    pub user: Option<&'a str>,
    /// The caller's protocol version (`Plughost-Api`).
    pub api: Option<u32>,
    /// The caller's request id (`Plughost-Request-Id`).
    pub request_id: Option<&'a str>,
}

/// What the host gives the agent: its request handler and its report.
pub trait Responder: Send + Sync + 'static {
    /// Answers one remote request (one line of the control protocol, without its newline), exactly as
    /// the Unix socket's handler would.
    fn answer(&self, request: &Incoming<'_>) -> String;
    /// The host's report for the services table; `stopping` once the agent's stop has begun.
    fn report(&self, stopping: bool) -> Report;
}

/// The fleet section of a host's `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// `connecting` (never connected yet), `connected`, `disconnected` (reconnecting), `stopping`.
    pub state: String,
    /// The fleet.
    pub fleet: String,
    /// This host's name in it.
    pub host: String,
    /// The server connected to (or last connected to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// Since when in this state, seconds since the epoch.
    pub since: u64,
    /// When the last report was stored, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_report: Option<u64>,
    /// Reports that could not be stored.
    pub failed_reports: u64,
    /// Why the last one failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_report_error: Option<String>,
    /// Remote requests answered.
    pub requests: u64,
    /// Remote requests answered `busy` (the queue was full).
    pub refused_busy: u64,
    /// Remote requests that arrived past their deadline (answered `timeout`, not run).
    pub expired: u64,
    /// Set when a URL carries requests off this machine without TLS (`fleet.allow_plaintext`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

#[derive(Debug)]
struct Shared {
    status: Mutex<AgentStatus>,
    requests: AtomicU64,
    refused_busy: AtomicU64,
    expired: AtomicU64,
    failed_reports: AtomicU64,
    /// Requests queued or running, not answered yet.
    pending: AtomicUsize,
    stopping: AtomicBool,
    /// The connection is closed (the stop is over): workers still running drop their answers.
    closed: AtomicBool,
}

impl Shared {
    fn set_state(&self, state: &str, server: Option<String>) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if s.state != state {
            s.state = state.to_owned();
            s.since = now_secs();
        }
        if server.is_some() {
            s.server = server;
        }
    }
}

enum Command {
    ReportNow,
    Stop { drain: Duration, done: std::sync::mpsc::Sender<()> },
}

/// A host's connection to its fleet. Dropping it without [`Agent::stop`] leaves the thread to end with
/// the process.
#[derive(Debug)]
pub struct Agent {
    shared: Arc<Shared>,
    commands: tokio::sync::mpsc::UnboundedSender<Command>,
    thread: Option<JoinHandle<()>>,
}

/// A remote request waiting for a worker.
struct Job {
    reply: Option<String>,
    addressed: Addressed,
    payload: Bytes,
    user: Option<String>,
    api: Option<u32>,
    request_id: Option<String>,
    deadline_ms: Option<u64>,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The `id` of a request line, as written (`null` when none can be read).
fn request_id(payload: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Id<'a> {
        #[serde(borrow)]
        id: Option<&'a serde_json::value::RawValue>,
    }
    serde_json::from_slice::<Id<'_>>(payload)
        .ok()
        .and_then(|i| i.id.map(|r| r.get().to_owned()))
        .unwrap_or_else(|| "null".to_owned())
}

/// An error answer in the control protocol's shape.
pub(crate) fn error_answer(payload: &[u8], kind: &str, message: &str) -> String {
    format!(
        "{{\"id\":{},\"ok\":false,\"error\":{{\"kind\":{},\"message\":{}}}}}",
        request_id(payload),
        serde_json::Value::from(kind),
        serde_json::Value::from(message)
    )
}

/// Reconnect delays: doubling from 25 ms, capped at 1 s, each cut by up to half at random so that a
/// fleet does not come back in step (the client's own default grows to 4 s).
pub(crate) fn reconnect_delay(attempts: usize) -> Duration {
    let base = Duration::from_millis(25u64 << attempts.min(6)).min(Duration::from_secs(1));
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    base - base.mul_f64(f64::from(nanos % 1000) / 2000.0)
}

pub(crate) fn connect_options(name: String, credentials: Option<&Credentials>) -> ConnectOptions {
    let mut opts = ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(reconnect_delay);
    match credentials {
        Some(Credentials::UserPassword { user, password }) => {
            opts = opts.user_and_password(user.clone(), password.clone());
        }
        Some(Credentials::Nkey(seed)) => opts = opts.nkey(seed.clone()),
        Some(Credentials::Creds(text)) => match ConnectOptions::with_credentials(text) {
            Ok(o) => {
                opts = o
                    .name(format!("plughost {}", std::process::id()))
                    .retry_on_initial_connect()
                    .max_reconnects(None)
                    .connection_timeout(Duration::from_secs(2))
                    .reconnect_delay_callback(reconnect_delay)
            }
            Err(e) => log::error!("fleet credentials: {e}"),
        },
        None => {}
    }
    opts
}

impl Agent {
    /// Starts the fleet thread: connects (retrying in the background: the host serves its socket
    /// whether or not the broker is there), listens on the host's subjects and reports.
    pub fn start(settings: FleetSettings, responder: Arc<dyn Responder>) -> Result<Agent, String> {
        let warning = settings
            .urls
            .iter()
            .find(|u| crate::settings::check_url(u, true) == Ok(true))
            .map(|u| format!("fleet url {u:?} carries requests without TLS (fleet.allow_plaintext)"));
        let shared = Arc::new(Shared {
            status: Mutex::new(AgentStatus {
                state: "connecting".to_owned(),
                fleet: settings.name.clone(),
                host: settings.host.clone(),
                since: now_secs(),
                warning,
                ..AgentStatus::default()
            }),
            requests: AtomicU64::new(0),
            refused_busy: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            failed_reports: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        let (commands, rx) = tokio::sync::mpsc::unbounded_channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("fleet: cannot build the runtime: {e}"))?;
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fleet".to_owned())
            .spawn(move || runtime.block_on(serve(settings, responder, s, rx)))
            .map_err(|e| format!("fleet: cannot start its thread: {e}"))?;
        Ok(Agent { shared, commands, thread: Some(thread) })
    }

    /// Reports at once (after a change: a backend up or down, a swap, a reload).
    pub fn report_now(&self) {
        let _ = self.commands.send(Command::ReportNow);
    }

    /// The fleet section of `status`.
    pub fn status(&self) -> AgentStatus {
        let mut s = self.shared.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
        s.requests = self.shared.requests.load(Ordering::Relaxed);
        s.refused_busy = self.shared.refused_busy.load(Ordering::Relaxed);
        s.expired = self.shared.expired.load(Ordering::Relaxed);
        s.failed_reports = self.shared.failed_reports.load(Ordering::Relaxed);
        s
    }

    /// The graceful stop: reports `stopping`, stops listening (callers get no responders at once), lets
    /// remote requests in flight finish and answers them (up to `drain`), then closes the connection.
    pub fn stop(mut self, drain: Duration) {
        let (done, wait) = std::sync::mpsc::channel();
        if self.commands.send(Command::Stop { drain, done }).is_ok() {
            // The report and the drain are bounded inside; this bounds a thread stuck elsewhere.
            let _ = wait.recv_timeout(drain + Duration::from_secs(1));
        }
        if let Some(t) = self.thread.take() {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

async fn serve(
    settings: FleetSettings,
    responder: Arc<dyn Responder>,
    shared: Arc<Shared>,
    mut commands: tokio::sync::mpsc::UnboundedReceiver<Command>,
) {
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel::<Event>();
    // Its own inbox prefix (JetStream acks come back there): the broker can let each host read only its
    // own answers.
    let opts = connect_options(format!("plughost {}", settings.host), settings.credentials.as_ref())
        .custom_inbox_prefix(subject::inbox_prefix(&settings.host))
        .event_callback(move |e| {
            let tx = events_tx.clone();
            async move {
                let _ = tx.send(e);
            }
        });
    let client = match opts.connect(settings.urls.clone()).await {
        Ok(c) => c,
        Err(e) => {
            log::error!("fleet: cannot connect to {}: {e}", settings.urls.join(", "));
            shared.set_state("failed", None);
            return;
        }
    };
    let subscribed = async {
        let rpc = client.subscribe(subject::rpc_all(&settings.name, &settings.host)).await?;
        let all = client.subscribe(subject::broadcast_all(&settings.name)).await?;
        Ok::<_, async_nats::SubscribeError>((rpc, all))
    };
    let (mut rpc, mut all) = match subscribed.await {
        Ok(s) => s,
        Err(e) => {
            log::error!("fleet: cannot subscribe: {e}");
            shared.set_state("failed", None);
            return;
        }
    };

    // Workers: OS threads running the host's handler.
    let workers = settings.request_workers.max(1);
    // Admission counts requests queued or running (`pending`), not the channel's length: a request that
    // a worker has not taken yet still holds its place, so `workers` running and 16 per worker waiting are
    // always accepted, however late the workers are scheduled. The channel never fills before that count.
    let capacity = workers * 17;
    let (jobs, queue) = std::sync::mpsc::sync_channel::<Job>(capacity);
    let queue = Arc::new(Mutex::new(queue));
    // Workers publish their answers themselves: handing the answer back to this thread first would cost
    // one more thread wake-up per request (publishing is a send into the client's queue, which this
    // runtime drains).
    let runtime = tokio::runtime::Handle::current();
    let mut threads = Vec::new();
    for i in 0..workers {
        let queue = queue.clone();
        let responder = responder.clone();
        let (client, runtime) = (client.clone(), runtime.clone());
        let shared = shared.clone();
        let t = std::thread::Builder::new().name(format!("fleet-req-{i}")).spawn(move || loop {
            let job = {
                let q = queue.lock().unwrap_or_else(|p| p.into_inner());
                q.recv()
            };
            let Ok(job) = job else { break };
            let answer = if job.deadline_ms.is_some_and(|d| now_ms() > d) {
                shared.expired.fetch_add(1, Ordering::Relaxed);
                error_answer(&job.payload, "timeout", "the request's deadline passed while it waited; it was not run")
            } else {
                shared.requests.fetch_add(1, Ordering::Relaxed);
                responder.answer(&Incoming {
                    addressed: &job.addressed,
                    payload: &job.payload,
                    user: job.user.as_deref(),
                    api: job.api,
                    request_id: job.request_id.as_deref(),
                })
            };
            // Past the drain the connection is gone: the answer has nowhere to go.
            if let Some(reply) = job.reply.filter(|_| !shared.closed.load(Ordering::SeqCst)) {
                let _ = runtime.block_on(client.publish(reply, Bytes::from(answer)));
            }
            shared.pending.fetch_sub(1, Ordering::SeqCst);
        });
        match t {
            Ok(t) => threads.push(t),
            Err(e) => log::error!("fleet: cannot start a request worker: {e}"),
        }
    }

    // The reporter: every interval, and at once when asked.
    let report_now = Arc::new(tokio::sync::Notify::new());
    let (reported_tx, reported) = tokio::sync::watch::channel(0u64);
    let js = async_nats::jetstream::new(client.clone());
    tokio::spawn(reporter(js, settings.clone(), responder.clone(), shared.clone(), report_now.clone(), reported_tx));

    let accept = |msg: async_nats::Message| {
        let Ok(addressed) = subject::parse(&settings.name, &settings.host, msg.subject.as_str()) else {
            return None;
        };
        let header = |name: &str| msg.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
        let deadline_ms = header(subject::HEADER_DEADLINE).and_then(|d| d.parse::<u64>().ok());
        let reply = msg.reply.as_ref().map(|r| r.as_str().to_owned());
        if deadline_ms.is_some_and(|d| now_ms() > d) {
            shared.expired.fetch_add(1, Ordering::Relaxed);
            let a = error_answer(&msg.payload, "timeout", "the request arrived after its deadline; it was not run");
            return reply.map(|r| (r, a));
        }
        let job = Job {
            user: reply.as_deref().and_then(subject::user_of_reply).map(str::to_owned),
            reply,
            addressed,
            api: header(subject::HEADER_API).and_then(|v| v.parse().ok()),
            request_id: header(subject::HEADER_REQUEST_ID),
            payload: msg.payload,
            deadline_ms,
        };
        let admitted = shared.pending.fetch_add(1, Ordering::SeqCst) < capacity;
        let sent = if admitted { jobs.try_send(job) } else { Err(std::sync::mpsc::TrySendError::Full(job)) };
        match sent {
            Ok(()) => None,
            Err(std::sync::mpsc::TrySendError::Full(job) | std::sync::mpsc::TrySendError::Disconnected(job)) => {
                shared.pending.fetch_sub(1, Ordering::SeqCst);
                shared.refused_busy.fetch_add(1, Ordering::Relaxed);
                let a = error_answer(
                    &job.payload,
                    "busy",
                    &format!(
                        "host {}: {} remote requests are waiting for {workers} request_workers; try again",
                        settings.host,
                        workers * 16
                    ),
                );
                job.reply.map(|r| (r, a))
            }
        }
    };

    let (drain, done) = loop {
        tokio::select! {
            Some(msg) = rpc.next() => {
                if let Some((reply, a)) = accept(msg) {
                    let _ = client.publish(reply, Bytes::from(a)).await;
                }
            }
            Some(msg) = all.next() => {
                if let Some((reply, a)) = accept(msg) {
                    let _ = client.publish(reply, Bytes::from(a)).await;
                }
            }
            Some(event) = events.recv() => match event {
                Event::Connected => {
                    let info = client.server_info();
                    log::info!("fleet: connected to {}:{} ({})", info.host, info.port, info.server_name);
                    shared.set_state("connected", Some(format!("{}:{}", info.host, info.port)));
                    // A fresh report at once: the table may have lost this host while it was away.
                    report_now.notify_one();
                }
                Event::Disconnected => {
                    log::warn!("fleet: disconnected from the broker; reconnecting");
                    shared.set_state("disconnected", None);
                }
                other => log::info!("fleet: {other}"),
            },
            command = commands.recv() => match command {
                Some(Command::ReportNow) => report_now.notify_one(),
                Some(Command::Stop { drain, done }) => break (drain, Some(done)),
                None => break (Duration::ZERO, None),
            },
        }
    };

    // The stop: report `stopping`, stop listening, answer what is in flight, close; all within `drain`
    // (and 200 ms to flush).
    let until = Instant::now() + drain;
    shared.stopping.store(true, Ordering::SeqCst);
    shared.set_state("stopping", None);
    let before = *reported.borrow();
    report_now.notify_one();
    let mut reported = reported;
    let report_wait = Duration::from_secs(1).min(until.saturating_duration_since(Instant::now()));
    let _ = tokio::time::timeout(report_wait, reported.wait_for(|n| *n > before)).await;
    let _ = rpc.unsubscribe().await;
    let _ = all.unsubscribe().await;
    drop(jobs);
    // The workers answer what they run; this runtime keeps carrying their answers meanwhile.
    while shared.pending.load(Ordering::SeqCst) > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let left = shared.pending.load(Ordering::SeqCst);
    if left > 0 {
        log::warn!("fleet: stopping with {left} remote request(s) unanswered after {drain:?}");
    }
    let _ = tokio::time::timeout(Duration::from_millis(200), client.flush()).await;
    shared.closed.store(true, Ordering::SeqCst);
    drop(client);
    for t in threads {
        if t.is_finished() {
            let _ = t.join();
        }
    }
    if let Some(done) = done {
        let _ = done.send(());
    }
}

async fn reporter(
    js: async_nats::jetstream::Context,
    settings: FleetSettings,
    responder: Arc<dyn Responder>,
    shared: Arc<Shared>,
    now: Arc<tokio::sync::Notify>,
    reported: tokio::sync::watch::Sender<u64>,
) {
    let bucket = subject::bucket(&settings.name);
    let mut store = None;
    let mut attempts = 0u64;
    loop {
        tokio::select! {
            _ = now.notified() => {}
            _ = tokio::time::sleep(settings.report_interval) => {}
        }
        let report = responder.report(shared.stopping.load(Ordering::SeqCst));
        let outcome = async {
            let body = serde_json::to_vec(&report).map_err(|e| format!("cannot encode the report: {e}"))?;
            if store.is_none() {
                store = Some(crate::bucket::open(&js, &bucket).await?);
            }
            let Some(s) = store.as_ref() else { return Err("no bucket".to_owned()) };
            s.put(&settings.host, Bytes::from(body)).await.map_err(|e| format!("bucket {bucket}: {e}"))
        };
        let outcome = tokio::time::timeout(Duration::from_secs(5), outcome)
            .await
            .unwrap_or_else(|_| Err(format!("bucket {bucket}: no answer in 5 s")));
        {
            let mut s = shared.status.lock().unwrap_or_else(|p| p.into_inner());
            match outcome {
                Ok(_) => {
                    s.last_report = Some(now_secs());
                    s.last_report_error = None;
                }
                Err(e) => {
                    shared.failed_reports.fetch_add(1, Ordering::Relaxed);
                    log::debug!("fleet: report failed: {e}");
                    s.last_report_error = Some(e);
                    // Open the bucket again next time (the broker may have lost it, or restarted).
                    store = None;
                }
            }
        }
        attempts += 1;
        let _ = reported.send(attempts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_answers_echo_the_id() {
        assert_eq!(
            error_answer(br#"{"id": [1, "x"], "op": "ping"}"#, "busy", "full"),
            r#"{"id":[1, "x"],"ok":false,"error":{"kind":"busy","message":"full"}}"#
        );
        assert_eq!(
            error_answer(b"not json", "timeout", "late \"x\""),
            r#"{"id":null,"ok":false,"error":{"kind":"timeout","message":"late \"x\""}}"#
        );
    }

    #[test]
    fn reconnect_delays_stay_under_a_second() {
        for n in 0..100 {
            let d = reconnect_delay(n);
            assert!(d <= Duration::from_secs(1) && d >= Duration::from_millis(12), "{n}: {d:?}");
        }
        assert!(reconnect_delay(0) <= Duration::from_millis(25));
    }
}
