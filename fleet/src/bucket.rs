//! Key-value buckets: the services table (one entry per host, its latest report) and the rollout
//! records.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use futures_util::StreamExt;

/// Opens the bucket, creating it when missing. Servers before 2.10 answer the one-call creation with an
/// account info the client cannot read; then the bucket's stream is created as the key-value store lays
/// it out (one message per subject, direct get, rollups allowed, deletes denied), which every server
/// since 2.7 reads as a bucket.
pub(crate) async fn open(js: &jetstream::Context, bucket: &str) -> Result<kv::Store, String> {
    open_described(js, bucket, "plughost services table: each host's latest report").await
}

/// [`open`] with the description a new bucket gets.
pub(crate) async fn open_described(
    js: &jetstream::Context,
    bucket: &str,
    description: &str,
) -> Result<kv::Store, String> {
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    let config = kv::Config {
        bucket: bucket.to_owned(),
        description: description.to_owned(),
        history: 1,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        Err(first) => {
            let stream = stream::Config {
                name: format!("KV_{bucket}"),
                description: Some(description.to_owned()),
                subjects: vec![format!("$KV.{bucket}.>")],
                max_messages_per_subject: 1,
                discard: stream::DiscardPolicy::New,
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                storage: stream::StorageType::File,
                num_replicas: 1,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            };
            js.get_or_create_stream(stream)
                .await
                .map_err(|e| format!("bucket {bucket}: cannot create it ({first}; then its stream: {e})"))?;
            js.get_key_value(bucket).await.map_err(|e| format!("bucket {bucket}: {e}"))
        }
    }
}

/// One entry: a host's latest report and when the server stored it.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub key: String,
    pub value: bytes::Bytes,
    /// The server's timestamp, nanoseconds since the epoch.
    pub stored_ns: i128,
    /// Its revision (for a compare-and-set).
    pub revision: u64,
}

/// Every host's latest report (deleted or purged entries left out): the keys from the stream's
/// per-subject counts (one request), then every key's last value by direct get, 64 at a time. (An
/// ordered consumer delivering the last value per subject would be one pass, but 2.9 servers report its
/// pending count wrongly, so it cannot tell when it has seen every key.)
pub(crate) async fn read_all(store: &kv::Store) -> Result<Vec<Stored>, String> {
    let name = &store.name;
    let mut subjects = store
        .stream
        .info_with_subjects(format!("{}>", store.prefix))
        .await
        .map_err(|e| format!("bucket {name}: {e}"))?;
    let mut keys = Vec::new();
    while let Some(s) = subjects.next().await {
        let (subject, _) = s.map_err(|e| format!("bucket {name}: {e}"))?;
        if let Some(k) = subject.strip_prefix(&store.prefix) {
            keys.push(k.to_owned());
        }
    }
    let entries: Vec<_> = futures_util::stream::iter(keys)
        .map(|k| async move { store.entry(k).await })
        .buffer_unordered(64)
        .collect()
        .await;
    let mut out = Vec::new();
    for e in entries {
        match e.map_err(|e| format!("bucket {name}: {e}"))? {
            Some(entry) if entry.operation == kv::Operation::Put => out.push(Stored {
                key: entry.key,
                value: entry.value,
                stored_ns: entry.created.unix_timestamp_nanos(),
                revision: entry.revision,
            }),
            _ => {}
        }
    }
    Ok(out)
}
