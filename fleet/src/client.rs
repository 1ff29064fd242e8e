//! An operator's side: blocking calls to hosts and to the services table (`ctl --host`, `fleet status`,
//! `place`). Each [`Client`] holds its own small runtime and one connection.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::{ConnectOptions, HeaderMap};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::report::Report;
use crate::settings::Credentials;
use crate::subject::{self, Class};

/// Why a call to the fleet failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker could not be reached.
    #[error("fleet: cannot connect to {urls}: {reason}")]
    Connect {
        /// The URLs tried.
        urls: String,
        /// Why.
        reason: String,
    },
    /// Nobody serves the subject: the host is down, unknown, or not in this fleet.
    #[error("host {host}: no responders on {subject} (the host is down or not in fleet {fleet})")]
    NoResponders {
        /// The host.
        host: String,
        /// The fleet.
        fleet: String,
        /// The subject.
        subject: String,
    },
    /// No answer in time: the request may or may not have run.
    #[error("host {host}: no answer within {timeout:?} on {subject}; whether it ran is unknown")]
    Timeout {
        /// The host.
        host: String,
        /// The subject.
        subject: String,
        /// How long the caller waited.
        timeout: Duration,
    },
    /// The broker would not carry the request (the user may not publish there): it never ran.
    #[error("fleet: the broker refused to carry the request on {subject}: {reason} (the request was not run)")]
    Refused {
        /// The subject.
        subject: String,
        /// What the broker said.
        reason: String,
    },
    /// A compare-and-set lost: the entry exists already, or changed since it was read.
    #[error("fleet: bucket {bucket}: key {key} {what}")]
    Conflict {
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// `exists already` or `changed since it was read`.
        what: &'static str,
    },
    /// The broker refused or failed the call.
    #[error("fleet: {0}")]
    Broker(String),
}

/// An entry of a key-value bucket and its revision (for a compare-and-set).
#[derive(Debug, Clone)]
pub struct Versioned {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// Its revision.
    pub revision: u64,
}

/// One row of the services table.
#[derive(Debug, Clone)]
pub struct HostEntry {
    /// The key (the host's name).
    pub host: String,
    /// Its report (or why it could not be read).
    pub report: Result<Report, String>,
    /// How long ago the server stored it (by this machine's clock against the server's timestamp).
    pub age: Duration,
}

/// A connection to a fleet's broker, for blocking callers.
#[derive(Debug)]
pub struct Client {
    runtime: tokio::runtime::Runtime,
    client: async_nats::Client,
    fleet: String,
    /// The last error the server sent (a permissions violation comes this way, not as an answer).
    server_error: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Client {
    /// Connects to the first of `urls` that answers (within `timeout`).
    pub fn connect(
        urls: &[String],
        fleet: &str,
        credentials: Option<&Credentials>,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        let shown = urls.join(", ");
        let connect = |reason: String| ClientError::Connect { urls: shown.clone(), reason };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| connect(format!("cannot build a runtime: {e}")))?;
        let mut opts = match credentials {
            Some(Credentials::Creds(text)) => {
                ConnectOptions::with_credentials(text).map_err(|e| connect(e.to_string()))?
            }
            Some(Credentials::Nkey(seed)) => ConnectOptions::with_nkey(seed.clone()),
            Some(Credentials::UserPassword { user, password }) => {
                ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            None => ConnectOptions::new(),
        };
        let server_error = std::sync::Arc::new(std::sync::Mutex::new(None));
        let seen = server_error.clone();
        opts = opts.name("plughost ctl").connection_timeout(timeout).max_reconnects(Some(1)).event_callback(move |e| {
            if let async_nats::Event::ServerError(e) = e {
                *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
            async {}
        });
        if let Some(user) = credentials.and_then(Credentials::user) {
            opts = opts.custom_inbox_prefix(subject::inbox_prefix(user));
        }
        let client = runtime
            .block_on(async { tokio::time::timeout(timeout, opts.connect(urls.to_vec())).await })
            .map_err(|_| connect(format!("no connection within {timeout:?}")))?
            .map_err(|e| connect(e.to_string()))?;
        Ok(Client { runtime, client, fleet: fleet.to_owned(), server_error })
    }

    /// The fleet.
    pub fn fleet(&self) -> &str {
        &self.fleet
    }

    /// Sends one request line to `host` on `subject` and waits up to `timeout` for its answer line. The
    /// request carries `Plughost-Deadline` = now + `timeout`: a host that gets it later does not run it.
    pub fn request(
        &self,
        host: &str,
        subject: &str,
        payload: &[u8],
        api: u32,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClientError> {
        self.request_until(host, subject, payload, api, now_ms() + timeout.as_millis() as u64, timeout)
    }

    /// [`request`](Self::request) with the deadline the host sees (milliseconds since the epoch) set
    /// apart from how long this caller waits: a test stands in for a request that arrives late.
    pub fn request_until(
        &self,
        host: &str,
        subject: &str,
        payload: &[u8],
        api: u32,
        deadline_ms: u64,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClientError> {
        let mut headers = HeaderMap::new();
        headers.insert(subject::HEADER_API, api.to_string().as_str());
        headers.insert(subject::HEADER_DEADLINE, deadline_ms.to_string().as_str());
        headers.insert(subject::HEADER_REQUEST_ID, format!("{:x}-{}", now_ms(), std::process::id()).as_str());
        let request =
            async_nats::Request::new().payload(Bytes::copy_from_slice(payload)).headers(headers).timeout(Some(timeout));
        let answer = self.runtime.block_on(self.client.send_request(subject.to_owned(), request));
        match answer {
            Ok(msg) => Ok(msg.payload.to_vec()),
            Err(e) => Err(match e.kind() {
                async_nats::client::RequestErrorKind::NoResponders => ClientError::NoResponders {
                    host: host.to_owned(),
                    fleet: self.fleet.clone(),
                    subject: subject.to_owned(),
                },
                async_nats::client::RequestErrorKind::TimedOut => {
                    match self.server_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
                        // The broker refused to carry it: it never reached the host.
                        Some(e) if e.to_lowercase().contains("permission") => {
                            ClientError::Refused { subject: subject.to_owned(), reason: e }
                        }
                        _ => ClientError::Timeout { host: host.to_owned(), subject: subject.to_owned(), timeout },
                    }
                }
                _ => ClientError::Broker(e.to_string()),
            }),
        }
    }

    /// Sends one request line to every host of the fleet and gathers the answers that come within
    /// `timeout`.
    pub fn broadcast(
        &self,
        class: Class,
        payload: &[u8],
        api: u32,
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>, ClientError> {
        let subject = subject::broadcast(&self.fleet, class);
        self.runtime.block_on(async {
            let inbox = self.client.new_inbox();
            let mut sub = self.client.subscribe(inbox.clone()).await.map_err(|e| ClientError::Broker(e.to_string()))?;
            let mut headers = HeaderMap::new();
            headers.insert(subject::HEADER_API, api.to_string().as_str());
            headers.insert(subject::HEADER_DEADLINE, (now_ms() + timeout.as_millis() as u64).to_string().as_str());
            self.client
                .publish_with_reply_and_headers(subject, inbox, headers, Bytes::copy_from_slice(payload))
                .await
                .map_err(|e| ClientError::Broker(e.to_string()))?;
            let mut out = Vec::new();
            let until = tokio::time::Instant::now() + timeout;
            while let Ok(Some(msg)) = tokio::time::timeout_at(until, sub.next()).await {
                out.push(msg.payload.to_vec());
            }
            Ok(out)
        })
    }

    /// Every row of the services table.
    pub fn hosts(&self) -> Result<Vec<HostEntry>, ClientError> {
        let bucket = subject::bucket(&self.fleet);
        self.runtime.block_on(async {
            let js = async_nats::jetstream::new(self.client.clone());
            let store = match js.get_key_value(&bucket).await {
                Ok(s) => s,
                // No host has reported yet.
                Err(e) if e.kind() == async_nats::jetstream::context::KeyValueErrorKind::GetBucket => {
                    return Ok(Vec::new())
                }
                Err(e) => return Err(ClientError::Broker(format!("bucket {bucket}: {e}"))),
            };
            let stored = crate::bucket::read_all(&store).await.map_err(ClientError::Broker)?;
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0);
            Ok(stored
                .into_iter()
                .map(|s| HostEntry {
                    report: serde_json::from_slice(&s.value)
                        .map_err(|e| format!("host {}: unreadable report: {e}", s.key)),
                    host: s.key,
                    age: Duration::from_nanos(u64::try_from((now - s.stored_ns).max(0)).unwrap_or(u64::MAX)),
                })
                .collect())
        })
    }

    /// One row of the services table (`None`: the host never reported, or no host has).
    pub fn host(&self, host: &str) -> Result<Option<HostEntry>, ClientError> {
        let bucket = subject::bucket(&self.fleet);
        self.runtime.block_on(async {
            let js = async_nats::jetstream::new(self.client.clone());
            let Ok(store) = js.get_key_value(&bucket).await else { return Ok(None) };
            let entry = store.entry(host).await.map_err(|e| ClientError::Broker(format!("bucket {bucket}: {e}")))?;
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0);
            Ok(entry.filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put).map(|e| HostEntry {
                report: serde_json::from_slice(&e.value)
                    .map_err(|err| format!("host {host}: unreadable report: {err}")),
                host: e.key,
                age: Duration::from_nanos(
                    u64::try_from((now - e.created.unix_timestamp_nanos()).max(0)).unwrap_or(u64::MAX),
                ),
            }))
        })
    }

    fn records<T>(
        &self,
        bucket: &str,
        f: impl for<'s> FnOnce(
            &'s async_nats::jetstream::kv::Store,
        ) -> futures_util::future::BoxFuture<'s, Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        self.runtime
            .block_on(async {
                let js = async_nats::jetstream::new(self.client.clone());
                let store = crate::bucket::open_described(
                    &js,
                    bucket,
                    "plughost rollouts: each rollout's record, one lock per backend",
                )
                .await
                .map_err(ClientError::Broker)?;
                f(&store).await
            })
            .map_err(|e| match (e, self.server_error.lock().unwrap_or_else(|p| p.into_inner()).take()) {
                // A write the broker would not carry times out here; the server said why on the side.
                (ClientError::Broker(_), Some(why)) if why.to_lowercase().contains("permission") => {
                    ClientError::Refused { subject: format!("$KV.{bucket}"), reason: why }
                }
                (e, _) => e,
            })
    }

    /// An entry of the bucket `bucket` (created when missing), with its revision.
    pub fn record(&self, bucket: &str, key: &str) -> Result<Option<Versioned>, ClientError> {
        let (b, k) = (bucket.to_owned(), key.to_owned());
        self.records(bucket, move |store| {
            Box::pin(async move {
                let e = store.entry(k.clone()).await.map_err(|e| ClientError::Broker(format!("bucket {b}: {e}")))?;
                Ok(e.filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put).map(|e| Versioned {
                    key: e.key,
                    value: e.value.to_vec(),
                    revision: e.revision,
                }))
            })
        })
    }

    /// Creates an entry: [`ClientError::Conflict`] when it exists. Its revision.
    pub fn create_record(&self, bucket: &str, key: &str, value: &[u8]) -> Result<u64, ClientError> {
        let (b, k, v) = (bucket.to_owned(), key.to_owned(), Bytes::copy_from_slice(value));
        self.records(bucket, move |store| {
            Box::pin(async move {
                store.create(&k, v).await.map_err(|e| match e.kind() {
                    async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {
                        ClientError::Conflict { bucket: b.clone(), key: k.clone(), what: "exists already" }
                    }
                    _ => ClientError::Broker(format!("bucket {b}: key {k}: {e}")),
                })
            })
        })
    }

    /// Replaces an entry if it is still at `revision`: [`ClientError::Conflict`] when it changed. Its
    /// new revision.
    pub fn update_record(&self, bucket: &str, key: &str, value: &[u8], revision: u64) -> Result<u64, ClientError> {
        let (b, k, v) = (bucket.to_owned(), key.to_owned(), Bytes::copy_from_slice(value));
        self.records(bucket, move |store| {
            Box::pin(async move {
                store.update(&k, v, revision).await.map_err(|e| match e.kind() {
                    async_nats::jetstream::kv::UpdateErrorKind::WrongLastRevision => {
                        ClientError::Conflict { bucket: b.clone(), key: k.clone(), what: "changed since it was read" }
                    }
                    _ => ClientError::Broker(format!("bucket {b}: key {k}: {e}")),
                })
            })
        })
    }

    /// Deletes an entry if it is still at `revision`: [`ClientError::Conflict`] when it changed.
    pub fn delete_record(&self, bucket: &str, key: &str, revision: u64) -> Result<(), ClientError> {
        let (b, k) = (bucket.to_owned(), key.to_owned());
        self.records(bucket, move |store| {
            Box::pin(async move {
                store.delete_expect_revision(&k, Some(revision)).await.map_err(|e| {
                    if e.to_string().to_lowercase().contains("wrong last sequence") {
                        ClientError::Conflict { bucket: b.clone(), key: k.clone(), what: "changed since it was read" }
                    } else {
                        ClientError::Broker(format!("bucket {b}: key {k}: {e}"))
                    }
                })
            })
        })
    }

    /// Every entry of a bucket (deleted ones left out).
    pub fn all_records(&self, bucket: &str) -> Result<Vec<Versioned>, ClientError> {
        self.records(bucket, move |store| {
            Box::pin(async move {
                let stored = crate::bucket::read_all(store).await.map_err(ClientError::Broker)?;
                Ok(stored
                    .into_iter()
                    .map(|s| Versioned { key: s.key, value: s.value.to_vec(), revision: s.revision })
                    .collect())
            })
        })
    }

    /// Puts a report in the services table as a host would (for tests and benchmarks that stand in for
    /// many hosts).
    pub fn put_report(&self, report: &Report) -> Result<(), ClientError> {
        let bucket = subject::bucket(&self.fleet);
        self.runtime.block_on(async {
            let js = async_nats::jetstream::new(self.client.clone());
            let store = crate::bucket::open(&js, &bucket).await.map_err(ClientError::Broker)?;
            let body = serde_json::to_vec(report).map_err(|e| ClientError::Broker(e.to_string()))?;
            store.put(&report.host, Bytes::from(body)).await.map_err(|e| ClientError::Broker(e.to_string()))?;
            Ok(())
        })
    }
}

/// A trivial responder that answers every request on `subject` with its own payload, on a thread of
/// its own: the floor that benchmarks measure a host's remote requests against.
#[derive(Debug)]
pub struct Echo {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    /// Starts answering on `subject` (ready when this returns).
    pub fn start(url: &str, subject: &str) -> Result<Echo, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::Broker(e.to_string()))?;
        let client = runtime
            .block_on(async_nats::connect(url))
            .map_err(|e| ClientError::Connect { urls: url.to_owned(), reason: e.to_string() })?;
        let mut sub = runtime
            .block_on(async {
                let s = client.subscribe(subject.to_owned()).await?;
                client.flush().await.map_err(|e| {
                    async_nats::SubscribeError::with_source(async_nats::client::SubscribeErrorKind::Other, e)
                })?;
                Ok::<_, async_nats::SubscribeError>(s)
            })
            .map_err(|e| ClientError::Broker(e.to_string()))?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let thread = std::thread::spawn(move || {
            runtime.block_on(async {
                loop {
                    tokio::select! {
                        Some(msg) = sub.next() => {
                            if let Some(reply) = msg.reply {
                                let _ = client.publish(reply, msg.payload).await;
                            }
                        }
                        _ = &mut stopped => break,
                    }
                }
            });
        });
        Ok(Echo { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
