//! The change stream at scale: every zone's durable records are published to
//! a NATS JetStream stream, so many agents on many hosts consume through the
//! NATS cluster and the pool's own stream is only a buffer.
//!
//! Names (the zone's name with `.` written as `~`, which zone names never
//! hold, so that it is one subject token):
//! ```text
//! JetStream stream   <PREFIX>_<zone>            (prefix upper-cased)
//! records            <prefix>.<zone>.r.<seq>    one message per part of record <seq>
//! requests           <prefix>.<zone>.api        HELLO, KEYS, SNAPSHOT, DIGEST (request/reply)
//! ```
//! A record larger than the cluster's `max_payload` goes as consecutive
//! parts (headers `Kt-Part`, `Kt-Parts`); every message also carries
//! `Kt-Seq` and `Kt-Stream` (the stream id), and its `Nats-Msg-Id` is
//! `<stream id>-<seq>-<part>.<parts>`, so JetStream drops a part published
//! twice within its duplicate window. Every message expects the previous
//! one's id as the stream's last, so a message lost in a leader change
//! fails the ones after it rather than leaving a gap; the publisher then
//! resumes right after the last message JetStream holds. Agents skip a
//! record they already applied and resync on a gap, which should not occur.
//!
//! Records stay sealed end to end: NATS sees the same ciphertext as the
//! segment files. Requests carry the agent's name (header `Kt-Agent`) and
//! get the answers the TCP transport gives: window keys sealed to the
//! agent's registered public key, snapshot chunks sealed under window keys,
//! digests sealed to the agent. The pool's stream keeps every record until
//! JetStream has acknowledged it (consumer `nats`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage, stream};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::ZoneStream;
use super::serve::{self, StreamSource, kind};

/// The consumer name the publisher acknowledges under.
pub const CONSUMER: &str = "nats";
/// Header: the record's zone sequence number.
pub const H_SEQ: &str = "Kt-Seq";
/// Header: the part of the record this message holds (from 0).
pub const H_PART: &str = "Kt-Part";
/// Header: how many parts the record has.
pub const H_PARTS: &str = "Kt-Parts";
/// Header: the stream id (hex).
pub const H_STREAM: &str = "Kt-Stream";
/// Header: the requesting agent's name.
pub const H_AGENT: &str = "Kt-Agent";
/// Failed publishing attempts (each is retried).
const ERRORS_METRIC: &str = "keyturn_stream_nats_errors_total";
/// Largest snapshot chunk over NATS, blocks (512 KiB: under the default 1 MiB payload).
pub const SNAPSHOT_BLOCKS: u32 = 128;

/// NATS settings (`[stream.nats]` in pool.toml).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSettings {
    /// Server URLs, comma-separated (empty: no NATS).
    pub url: String,
    /// Subject prefix and stream name prefix.
    pub prefix: String,
    /// JetStream replicas of each zone's stream (1, or 3 on a cluster).
    pub replicas: usize,
    /// Records JetStream keeps at most this long, seconds (0: the stream's retention).
    pub max_age_secs: u64,
    /// Bytes JetStream keeps at most per zone, MiB (0: the stream's retention).
    pub max_mib: u64,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            prefix: "keyturn".into(),
            replicas: 1,
            max_age_secs: 0,
            max_mib: 0,
        }
    }
}

impl NatsSettings {
    /// Refuses settings NATS would refuse later, with what to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.prefix.is_empty()
            || !self
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(format!(
                "stream.nats.prefix {:?}: use letters, digits, '-' and '_'",
                self.prefix
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(format!(
                "stream.nats.replicas {}: JetStream takes 1 to 5",
                self.replicas
            ));
        }
        Ok(())
    }
}

/// The zone's name as one subject token.
pub fn token(zone: &str) -> String {
    zone.replace('.', "~")
}

/// The JetStream stream holding a zone's records.
pub fn stream_name(prefix: &str, zone: &str) -> String {
    format!("{}_{}", prefix.to_uppercase(), token(zone))
}

/// The subject of record `seq`'s parts.
pub fn record_subject(prefix: &str, zone: &str, seq: u64) -> String {
    format!("{prefix}.{}.r.{seq}", token(zone))
}

/// Every record subject of a zone.
pub fn records_filter(prefix: &str, zone: &str) -> String {
    format!("{prefix}.{}.r.>", token(zone))
}

/// The subject agents send requests to.
pub fn api_subject(prefix: &str, zone: &str) -> String {
    format!("{prefix}.{}.api", token(zone))
}

/// A NATS error as text (the client's errors are many types).
fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Connects to the servers in `url` (comma-separated).
pub async fn connect(url: &str, name: &str) -> Result<async_nats::Client, String> {
    let servers: Vec<async_nats::ServerAddr> = url
        .split(',')
        .map(|s| s.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("NATS URL {url:?}: {e}"))?;
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .connect(servers)
        .await
        .map_err(|e| format!("cannot connect to NATS at {url}: {e}"))
}

/// Publishes every streaming zone's records and answers its agents'
/// requests until the task is dropped. Zones that start or stop streaming
/// are picked up within a second.
pub async fn run(settings: NatsSettings, source: Arc<dyn StreamSource>) {
    let client = match connect(&settings.url, "keyturn-source").await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "ALERT: NATS publishing is off");
            return;
        }
    };
    tracing::info!(url = %settings.url, "stream: publishing to NATS JetStream");
    // What JetStream holds shows as consumer `nats` of each stream's gauges.
    metrics::describe_counter!(
        ERRORS_METRIC,
        "Failed attempts to publish a zone's records to NATS JetStream (each is retried)"
    );
    let mut zones: HashMap<String, (String, Vec<tokio::task::JoinHandle<()>>)> = HashMap::new();
    loop {
        let now = source.streaming_zones();
        zones.retain(|z, (id, tasks)| {
            let keep = source.stream(z).is_some_and(|s| s.id().to_hex() == *id);
            if !keep {
                tasks.iter().for_each(|t| t.abort());
            }
            keep
        });
        for z in now {
            if zones.contains_key(&z) {
                continue;
            }
            let Some(s) = source.stream(&z) else { continue };
            // Hold every kept record until JetStream has it.
            if !s.status().consumers.contains_key(CONSUMER) {
                s.ack(CONSUMER, s.first_kept().saturating_sub(1));
            }
            let publisher = tokio::spawn(publish_zone(
                client.clone(),
                settings.clone(),
                z.clone(),
                s.clone(),
            ));
            let service = tokio::spawn(serve_zone(
                client.clone(),
                settings.prefix.clone(),
                z.clone(),
                source.clone(),
            ));
            zones.insert(z, (s.id().to_hex(), vec![publisher, service]));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Publishes one zone's records, starting again after an error.
async fn publish_zone(
    client: async_nats::Client,
    settings: NatsSettings,
    zone: String,
    stream: Arc<ZoneStream>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match publish_loop(&client, &settings, &zone, &stream).await {
            Ok(()) => return,
            Err(e) => {
                metrics::counter!(ERRORS_METRIC, "zone" => zone.clone()).increment(1);
                tracing::warn!(%zone, error = %e, "stream: NATS publishing failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The zone's JetStream stream, created when missing.
async fn zone_stream(
    js: &jetstream::Context,
    settings: &NatsSettings,
    zone: &str,
    ours: &ZoneStream,
) -> Result<stream::Stream, String> {
    let max_age = match settings.max_age_secs {
        0 => ours.settings().retention_secs,
        s => s,
    };
    let max_bytes = match settings.max_mib {
        0 => ours.settings().retention_mib,
        m => m,
    };
    js.get_or_create_stream(stream::Config {
        name: stream_name(&settings.prefix, zone),
        subjects: vec![records_filter(&settings.prefix, zone)],
        max_age: Duration::from_secs(max_age),
        max_bytes: i64::try_from(max_bytes.saturating_mul(1 << 20)).unwrap_or(i64::MAX),
        num_replicas: settings.replicas,
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(text)
}

/// Where a publisher resumes: right after the last message JetStream
/// holds, or at the pool's oldest kept record.
struct Resume {
    seq: u64,
    part: usize,
    /// Parts of record `seq` as they were split (a mid-record resume goes on
    /// only with the same split).
    parts: usize,
}

async fn resume_point(js_stream: &mut stream::Stream, ours: &ZoneStream) -> Result<Resume, String> {
    let fresh = Resume {
        seq: ours.first_kept(),
        part: 0,
        parts: 0,
    };
    let last = js_stream.info().await.map_err(text)?.state.last_sequence;
    if last == 0 {
        return Ok(fresh);
    }
    let m = js_stream.get_raw_message(last).await.map_err(text)?;
    let h = m.headers;
    let get = |k: &str| h.get(k).and_then(|v| v.as_str().parse::<u64>().ok());
    let sid = h.get(H_STREAM).map(|v| v.as_str().to_string());
    if sid.as_deref() != Some(ours.id().to_hex().as_str()) {
        // Another stream of the same zone name (it was turned off and on):
        // its records would collide with ours by sequence number.
        tracing::warn!(zone = %ours.zone_name(), "stream: the JetStream stream holds another stream's records; purging it");
        js_stream.purge().await.map_err(text)?;
        return Ok(fresh);
    }
    let (Some(seq), Some(part), Some(parts)) = (get(H_SEQ), get(H_PART), get(H_PARTS)) else {
        return Err(format!("JetStream message {last} has no keyturn headers"));
    };
    Ok(if part + 1 >= parts {
        Resume {
            seq: seq + 1,
            part: 0,
            parts: 0,
        }
    } else {
        Resume {
            seq,
            part: part as usize + 1,
            parts: parts as usize,
        }
    })
}

/// A part's message id: JetStream drops a part published twice within its
/// duplicate window. The split is part of the id, so a record split
/// differently (another `max_payload`) is never mixed with its old parts.
fn message_id(sid: &str, seq: u64, part: usize, parts: usize) -> String {
    format!("{sid}-{seq}-{part}.{parts}")
}

/// Publishes records in order. Each message expects the previous one's id
/// as the stream's last (`Nats-Expected-Last-Msg-Id`), so a message lost in
/// a leader change makes every later one fail instead of leaving a gap:
/// the loop then starts again from what JetStream holds.
async fn publish_loop(
    client: &async_nats::Client,
    settings: &NatsSettings,
    zone: &str,
    ours: &Arc<ZoneStream>,
) -> Result<(), String> {
    let js = jetstream::new(client.clone());
    let mut js_stream = zone_stream(&js, settings, zone, ours).await?;
    let resume = resume_point(&mut js_stream, ours).await?;
    let mut next = resume.seq;
    // The first message needs no expectation: nothing but this loop
    // publishes the zone, and it starts right after what JetStream holds.
    let mut prev_id: Option<String> = None;
    let sid = ours.id().to_hex();
    // Room for the headers within the server's payload limit.
    let part_max = client
        .server_info()
        .max_payload
        .saturating_sub(1024)
        .max(4096);
    let mut visible = ours.subscribe();
    let mut cursor = None;
    let mut pending: VecDeque<(u64, bool, jetstream::context::PublishAckFuture)> = VecDeque::new();
    loop {
        let last = *visible.borrow_and_update();
        if next > last {
            // Nothing new: wait, but not forever (the stream may be stopped).
            let _ = tokio::time::timeout(Duration::from_secs(1), visible.changed()).await;
            continue;
        }
        let first = ours.first_kept();
        if next < first {
            tracing::error!(%zone, lost_from = next, lost_to = first - 1,
                "ALERT: records left the pool's stream before NATS had them; NATS agents will resync");
            next = first;
            prev_id = None;
            continue;
        }
        let s = ours.clone();
        let mut c = cursor.take();
        let (batch, c) =
            tokio::task::spawn_blocking(move || (s.read_at(&mut c, next, last, 4 << 20), c))
                .await
                .map_err(text)?;
        cursor = c;
        let batch = batch.map_err(text)?;
        if batch.is_empty() {
            continue;
        }
        for rec in batch {
            let seq = next;
            let parts = rec.len().div_ceil(part_max).max(1);
            let skip = if seq == resume.seq && parts == resume.parts {
                resume.part
            } else {
                0
            };
            for (i, chunk) in rec.chunks(part_max).enumerate().skip(skip) {
                let mut h = HeaderMap::new();
                h.insert(H_SEQ, seq.to_string().as_str());
                h.insert(H_PART, i.to_string().as_str());
                h.insert(H_PARTS, parts.to_string().as_str());
                h.insert(H_STREAM, sid.as_str());
                let id = message_id(&sid, seq, i, parts);
                let mut msg = PublishMessage::build()
                    .payload(bytes::Bytes::copy_from_slice(chunk))
                    .headers(h)
                    .message_id(&id);
                if let Some(p) = &prev_id {
                    msg = msg.expected_last_message_id(p);
                }
                prev_id = Some(id);
                let ack = js
                    .send_publish(record_subject(&settings.prefix, zone, seq), msg)
                    .await
                    .map_err(text)?;
                pending.push_back((seq, i + 1 == parts, ack));
                if pending.len() >= 64 {
                    settle(&mut pending, ours, 32).await?;
                }
            }
            next += 1;
        }
        settle(&mut pending, ours, 0).await?;
    }
}

/// Awaits publish acknowledgements, oldest first, until `keep` remain;
/// a record fully acknowledged no longer needs the pool's copy.
async fn settle(
    pending: &mut VecDeque<(u64, bool, jetstream::context::PublishAckFuture)>,
    ours: &ZoneStream,
    keep: usize,
) -> Result<(), String> {
    while pending.len() > keep {
        let (seq, last_part, ack) = pending.pop_front().expect("not empty");
        ack.await.map_err(|e| format!("record {seq}: {e}"))?;
        if last_part {
            ours.ack(CONSUMER, seq);
        }
    }
    Ok(())
}

/// Records where a registered agent is; anything else is dropped.
fn report_position(source: &dyn StreamSource, zone: &str, agent: &str, body: &[u8]) {
    let Ok(seq) = <[u8; 8]>::try_from(body).map(u64::from_le_bytes) else {
        return;
    };
    if source.agent(zone, agent).is_none() {
        return;
    }
    if let Some(s) = source.stream(zone) {
        s.report_position(agent, seq);
    }
}

/// Answers a zone's agents' requests, and takes their position reports
/// (kind ACK, no reply).
async fn serve_zone(
    client: async_nats::Client,
    prefix: String,
    zone: String,
    source: Arc<dyn StreamSource>,
) {
    loop {
        let sub = client
            .queue_subscribe(api_subject(&prefix, &zone), "keyturn".into())
            .await;
        let mut sub = match sub {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%zone, error = %e, "stream: cannot subscribe to NATS requests; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(msg) = sub.next().await {
            let reply = msg.reply.clone();
            let (client, zone, source) = (client.clone(), zone.clone(), source.clone());
            tokio::spawn(async move {
                let agent = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(H_AGENT))
                    .map(|v| v.as_str().to_string())
                    .unwrap_or_default();
                // A position report, not a request: no answer.
                if let Some((&kind::ACK, body)) = msg.payload.split_first() {
                    report_position(source.as_ref(), &zone, &agent, body);
                    return;
                }
                let (k, body) = match msg.payload.split_first() {
                    Some((k, body)) => {
                        serve::answer(source.as_ref(), &zone, &agent, *k, body, SNAPSHOT_BLOCKS)
                            .await
                    }
                    None => serve::refusal("bad-request", "an empty request".into()),
                };
                let mut frame = Vec::with_capacity(body.len() + 1);
                frame.push(k);
                frame.extend_from_slice(&body);
                let Some(reply) = reply else { return };
                if let Err(e) = client.publish(reply, frame.into()).await {
                    tracing::debug!(error = %e, "stream: NATS reply not sent");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_token_and_injective() {
        assert_eq!(token("prod.db"), "prod~db");
        assert_eq!(stream_name("keyturn", "prod.db"), "KEYTURN_prod~db");
        assert_eq!(record_subject("kt", "a.b", 7), "kt.a~b.r.7");
        assert_eq!(records_filter("kt", "a"), "kt.a.r.>");
        assert_ne!(token("a.b"), token("a_b"));
        assert_ne!(token("a.b"), token("a-b"));
    }

    #[test]
    fn settings_are_checked() {
        assert!(NatsSettings::default().validate().is_ok());
        let bad = NatsSettings {
            prefix: "a.b".into(),
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("prefix"));
        let bad = NatsSettings {
            replicas: 0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("replicas"));
    }
}
