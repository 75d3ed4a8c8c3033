//! The agent's side of the NATS transport: records from the zone's
//! JetStream stream (an ordered consumer from the first record wanted),
//! requests (HELLO, KEYS, SNAPSHOT, DIGEST) to the source through NATS
//! request/reply. Names and headers are `crate::stream::nats`'s.
//!
//! JetStream may hold a record twice (a publisher that restarted after the
//! duplicate window): the link skips a record below the one it expects.
//! A record missing between two it holds is a gap: the link refuses it as
//! "behind-retention", which starts a full resync, never a silent skip.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use tokio::sync::mpsc;

use super::ReplicaError;
use crate::stream::nats::{
    H_AGENT, H_PART, H_PARTS, H_SEQ, SNAPSHOT_BLOCKS, api_subject, connect, record_subject,
    records_filter, stream_name,
};
use crate::stream::serve::{ErrorMsg, kind};

/// A connection to a zone's records and requests through NATS.
pub struct NatsLink {
    url: String,
    client: async_nats::Client,
    js_stream: stream::Stream,
    prefix: String,
    zone: String,
    agent: String,
    /// Whole records from the consumer's own task, so that the agent may
    /// drop a wait for the next record (its ack timer) at any moment
    /// without cancelling the consumer's stall checks half-way.
    records: Option<Records>,
}

/// The follower task and what it delivers.
struct Records {
    rx: mpsc::Receiver<Result<Vec<u8>, ReplicaError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Records {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whole records held between the follower and the agent.
const RECORDS_AHEAD: usize = 16;

/// The consumer of a zone's records: an ordered JetStream consumer,
/// reassembling parts, made again when it stalls.
struct Follower {
    addr: String,
    js_stream: stream::Stream,
    prefix: String,
    zone: String,
    messages: Option<consumer::pull::Ordered>,
    /// The record the consumer should deliver next.
    next: u64,
    /// Parts of the record being reassembled.
    partial: Vec<u8>,
    part: u64,
    /// JetStream sequence of the last message taken, and when the consumer
    /// last showed progress (or was found idle for good reason).
    last_js_seq: u64,
    checked: std::time::Instant,
}

/// How long the consumer may deliver nothing before the link asks
/// JetStream whether messages are waiting (a consumer whose server went
/// away is then made again).
const STALL: Duration = Duration::from_secs(3);

fn headers_u64(h: Option<&HeaderMap>, k: &str) -> Option<u64> {
    h?.get(k)?.as_str().parse().ok()
}

fn behind(what: String) -> ReplicaError {
    ReplicaError::Refused {
        error: format!("{what}; a full resync is needed"),
        kind: "behind-retention".into(),
    }
}

impl NatsLink {
    /// Connects to `url` (comma-separated servers) and the zone's stream.
    pub async fn connect(
        url: &str,
        prefix: &str,
        zone: &str,
        agent: &str,
    ) -> Result<Self, ReplicaError> {
        let err = |message: String| ReplicaError::Source {
            addr: format!("nats://{url}"),
            message,
        };
        let client = connect(url, &format!("keyturn-agent-{agent}"))
            .await
            .map_err(err)?;
        let js = jetstream::new(client.clone());
        let name = stream_name(prefix, zone);
        let js_stream = js.get_stream(&name).await.map_err(|e| {
            err(format!(
                "no JetStream stream {name} ({e}): the source does not publish zone {zone:?} to this NATS cluster (its pool.toml needs [stream.nats] url)"
            ))
        })?;
        Ok(Self {
            url: url.to_string(),
            client,
            js_stream,
            prefix: prefix.to_string(),
            zone: zone.to_string(),
            agent: agent.to_string(),
            records: None,
        })
    }

    /// The source as status shows it.
    pub fn addr(&self) -> String {
        format!("nats://{}", self.url)
    }

    fn err(&self, e: impl std::fmt::Display) -> ReplicaError {
        ReplicaError::Source {
            addr: self.addr(),
            message: e.to_string(),
        }
    }

    /// Snapshot chunks fit NATS's default payload limit.
    pub fn snapshot_blocks(&self) -> u32 {
        SNAPSHOT_BLOCKS
    }

    /// A request and its answer of type `want`.
    pub async fn call(&mut self, k: u8, body: &[u8], want: u8) -> Result<Vec<u8>, ReplicaError> {
        let mut h = HeaderMap::new();
        h.insert(H_AGENT, self.agent.as_str());
        let mut frame = Vec::with_capacity(body.len() + 1);
        frame.push(k);
        frame.extend_from_slice(body);
        let subject = api_subject(&self.prefix, &self.zone);
        // Requests only read (KEYS hands out the same keys again), so one
        // whose answer was lost (a NATS server went away in between) is
        // sent again, for up to a minute.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let reply = loop {
            let r = self
                .client
                .request_with_headers(subject.clone(), h.clone(), frame.clone().into())
                .await;
            match r {
                Ok(m) => break m,
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, %subject, "replica: NATS request failed; sending it again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    return Err(self.err(format!(
                        "request on {subject}: {e} (is the source server connected to this NATS cluster?)"
                    )));
                }
            }
        };
        let Some((&got, body)) = reply.payload.split_first() else {
            return Err(self.err("an empty answer"));
        };
        if got == kind::ERROR {
            let m: ErrorMsg = serde_json::from_slice(body).map_err(|e| self.err(e))?;
            return Err(ReplicaError::Refused {
                error: m.error,
                kind: m.kind,
            });
        }
        if got != want {
            return Err(self.err(format!("answer of type {got}, expected {want}")));
        }
        Ok(body.to_vec())
    }

    /// Tells the source how far this replica is durable, for its lag
    /// gauges (no answer; JetStream, not the source, keeps the records).
    pub async fn ack(&mut self, durable: u64) -> Result<(), ReplicaError> {
        let mut h = HeaderMap::new();
        h.insert(H_AGENT, self.agent.as_str());
        let mut frame = Vec::with_capacity(9);
        frame.push(kind::ACK);
        frame.extend_from_slice(&durable.to_le_bytes());
        let subject = api_subject(&self.prefix, &self.zone);
        // A lost report is replaced by the next one.
        if let Err(e) = self
            .client
            .publish_with_headers(subject, h, frame.into())
            .await
        {
            tracing::debug!(error = %e, "replica: position report not sent");
        }
        Ok(())
    }

    /// Starts delivering records from `from` on. A record no longer in
    /// JetStream is refused here, before any record is delivered.
    pub async fn follow(&mut self, from: u64) -> Result<(), ReplicaError> {
        self.records = None;
        let mut f = Follower {
            addr: self.addr(),
            js_stream: self.js_stream.clone(),
            prefix: self.prefix.clone(),
            zone: self.zone.clone(),
            messages: None,
            next: from,
            partial: Vec::new(),
            part: 0,
            last_js_seq: 0,
            checked: std::time::Instant::now(),
        };
        // A cluster electing a leader answers again within seconds.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            match tokio::time::timeout(4 * STALL, f.follow()).await {
                Ok(Ok(())) => break,
                Ok(Err(e @ ReplicaError::Refused { .. })) => return Err(e),
                other if std::time::Instant::now() >= deadline => {
                    return Err(match other {
                        Ok(Err(e)) => e,
                        _ => self.err("making the JetStream consumer timed out"),
                    });
                }
                other => {
                    if let Ok(Err(e)) = other {
                        tracing::warn!(error = %e, "replica: cannot make the JetStream consumer yet");
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        let (tx, rx) = mpsc::channel(RECORDS_AHEAD);
        let task = tokio::spawn(async move {
            loop {
                let r = f.next_record().await;
                let end = r.is_err();
                if tx.send(r).await.is_err() || end {
                    return;
                }
            }
        });
        self.records = Some(Records { rx, task });
        Ok(())
    }

    /// The next record, whole (cancel-safe).
    pub async fn next_record(&mut self) -> Result<Vec<u8>, ReplicaError> {
        let Some(r) = self.records.as_mut() else {
            return Err(self.err("records asked for before following"));
        };
        match r.rx.recv().await {
            Some(r) => r,
            None => Err(self.err("the JetStream follower ended")),
        }
    }

    /// Record `seq` again (to resolve a reference), from JetStream.
    pub async fn fetch(&mut self, seq: u64) -> Result<Vec<u8>, ReplicaError> {
        let subject = record_subject(&self.prefix, &self.zone, seq);
        let first = self
            .js_stream
            .get_first_raw_message_by_subject(&subject, 1)
            .await
            .map_err(|_| behind(format!("record {seq} is no longer in JetStream")))?;
        let parts = headers_u64(Some(&first.headers), H_PARTS).unwrap_or(1);
        let mut out = first.payload.to_vec();
        let mut js_seq = first.sequence;
        let mut part = 1;
        while part < parts {
            js_seq += 1;
            let m = self
                .js_stream
                .get_first_raw_message_by_subject(&subject, js_seq)
                .await
                .map_err(|e| self.err(format!("part {part} of record {seq}: {e}")))?;
            js_seq = m.sequence;
            if headers_u64(Some(&m.headers), H_PART) != Some(part) {
                continue;
            }
            out.extend_from_slice(&m.payload);
            part += 1;
        }
        Ok(out)
    }
}

impl Follower {
    fn err(&self, e: impl std::fmt::Display) -> ReplicaError {
        ReplicaError::Source {
            addr: self.addr.clone(),
            message: e.to_string(),
        }
    }

    /// Makes the consumer, from record `self.next` on.
    async fn follow(&mut self) -> Result<(), ReplicaError> {
        let from = self.next;
        let subject = record_subject(&self.prefix, &self.zone, from);
        let start = match self
            .js_stream
            .get_first_raw_message_by_subject(&subject, 1)
            .await
        {
            Ok(m) => m.sequence,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                // Not there: either not yet published (start after what
                // JetStream holds) or no longer kept (a resync).
                let info = match self.js_stream.info().await {
                    Ok(i) => i.clone(),
                    Err(e) => return Err(self.err(e)),
                };
                let last = info.state.last_sequence;
                if info.state.messages > 0 {
                    let m = self
                        .js_stream
                        .get_raw_message(info.state.first_sequence)
                        .await
                        .map_err(|e| self.err(e))?;
                    let oldest = headers_u64(Some(&m.headers), H_SEQ).unwrap_or(0);
                    if oldest > from {
                        return Err(behind(format!(
                            "record {from} of zone {:?} is no longer in JetStream (oldest kept: {oldest})",
                            self.zone
                        )));
                    }
                    // Published since the lookup: starting after it would skip it.
                    let m = self
                        .js_stream
                        .get_raw_message(last)
                        .await
                        .map_err(|e| self.err(e))?;
                    if headers_u64(Some(&m.headers), H_SEQ).unwrap_or(0) >= from {
                        return Err(self.err(format!(
                            "record {from} was published while the consumer was being made"
                        )));
                    }
                }
                last + 1
            }
            // A lookup that failed (no leader for a moment, a timeout) says
            // nothing about where the record is.
            Err(e) => return Err(self.err(format!("looking up record {from}: {e}"))),
        };
        let cfg = consumer::pull::OrderedConfig {
            filter_subject: records_filter(&self.prefix, &self.zone),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        };
        let c = self
            .js_stream
            .create_consumer(cfg)
            .await
            .map_err(|e| self.err(e))?;
        self.messages = Some(c.messages().await.map_err(|e| self.err(e))?);
        self.partial.clear();
        self.part = 0;
        self.last_js_seq = start.saturating_sub(1);
        self.checked = std::time::Instant::now();
        Ok(())
    }

    /// A consumer that delivers nothing while JetStream holds messages past
    /// the last one taken is stuck (its server or the stream's leader went
    /// away): make it again from the record wanted next.
    async fn unstick(&mut self) -> Result<(), ReplicaError> {
        if self.messages.is_some() && self.checked.elapsed() < STALL {
            return Ok(());
        }
        let last = match tokio::time::timeout(STALL, self.js_stream.info()).await {
            Ok(Ok(i)) => i.state.last_sequence,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "replica: JetStream stream info failed");
                self.checked = std::time::Instant::now();
                return Ok(());
            }
            Err(_) => {
                tracing::warn!("replica: JetStream stream info took over 3 s");
                self.checked = std::time::Instant::now();
                return Ok(());
            }
        };
        self.checked = std::time::Instant::now();
        if self.messages.is_none() || last > self.last_js_seq {
            tracing::warn!(
                next = self.next,
                waiting = last.saturating_sub(self.last_js_seq),
                "replica: the JetStream consumer delivers nothing while messages wait; making it again"
            );
            self.refollow().await?;
        }
        Ok(())
    }

    /// Makes the consumer again from the record wanted next. A cluster
    /// without a leader for a moment is waited out; only a refusal (the
    /// record is gone: resync) ends the link.
    async fn refollow(&mut self) -> Result<(), ReplicaError> {
        match tokio::time::timeout(4 * STALL, self.follow()).await {
            Ok(Err(e @ ReplicaError::Refused { .. })) => Err(e),
            Ok(Ok(())) => Ok(()),
            other => {
                let e = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".into(),
                };
                tracing::warn!(error = %e, "replica: cannot make the JetStream consumer again yet");
                self.messages = None;
                self.checked = std::time::Instant::now() - STALL;
                tokio::time::sleep(Duration::from_millis(500)).await;
                Ok(())
            }
        }
    }

    /// The next record, whole.
    async fn next_record(&mut self) -> Result<Vec<u8>, ReplicaError> {
        loop {
            self.unstick().await?;
            let Some(msgs) = self.messages.as_mut() else {
                // unstick makes it again once JetStream answers
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            let next = tokio::time::timeout(STALL, msgs.next()).await;
            let m = match next {
                Ok(Some(Ok(m))) => m,
                Err(_) => continue, // nothing for a while: check the consumer
                Ok(Some(Err(e))) => {
                    // The ordered consumer could not go on (its server went
                    // away): make it again from the record wanted next.
                    tracing::warn!(error = %e, "replica: JetStream consumer failed; making it again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    self.refollow().await?;
                    continue;
                }
                Ok(None) => {
                    self.refollow().await?;
                    continue;
                }
            };
            if let Ok(info) = m.info() {
                self.last_js_seq = info.stream_sequence;
            }
            self.checked = std::time::Instant::now();
            let h = m.headers.as_ref();
            let (Some(seq), Some(part), Some(parts)) = (
                headers_u64(h, H_SEQ),
                headers_u64(h, H_PART),
                headers_u64(h, H_PARTS),
            ) else {
                return Err(ReplicaError::BadRecord(format!(
                    "a message on {} without keyturn headers",
                    m.subject
                )));
            };
            if seq < self.next {
                continue; // published twice; applied already or about to be
            }
            if seq > self.next {
                return Err(behind(format!(
                    "JetStream holds record {seq} but not record {} (a gap)",
                    self.next
                )));
            }
            if part != self.part || parts == 0 || part >= parts {
                // A restarted publisher may start a record again from part 0.
                if part == 0 {
                    self.partial.clear();
                    self.part = 0;
                } else {
                    continue;
                }
            }
            self.partial.extend_from_slice(&m.payload);
            self.part += 1;
            if self.partial.len() > crate::stream::record::MAX_RECORD_LEN {
                return Err(ReplicaError::BadRecord(format!(
                    "record {seq} is larger than any record"
                )));
            }
            if self.part == parts {
                self.next += 1;
                self.part = 0;
                return Ok(std::mem::take(&mut self.partial));
            }
        }
    }
}
