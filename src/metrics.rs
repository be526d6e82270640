//! The daemon's Prometheus metrics (`GET /metrics`), through `prometheus-client`: the counters
//! live in the states of the streamer, the jobs and the prefetcher (registered here once); the
//! gauges are read from those states at each scrape. Names are documented in
//! `docs/http-api.md`; change both together (and the chart's alerts in `docs/operations.md`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::jobs::Jobs;
use crate::wal::prefetch::Prefetcher;
use crate::wal::streamer::StreamState;

type FloatGauge = Gauge<f64, AtomicU64>;

pub struct Metrics {
    registry: Registry,
    stream: Arc<StreamState>,
    jobs: Arc<Jobs>,
    timeline: Gauge,
    received: Gauge,
    durable: Gauge,
    lag: Gauge,
    failing: Gauge,
    since_upload: FloatGauge,
    since_backup: FloatGauge,
    backup_seconds: FloatGauge,
}

impl Metrics {
    pub fn new(stream: Arc<StreamState>, jobs: Arc<Jobs>, prefetch: &Prefetcher) -> Metrics {
        let mut m = Metrics {
            timeline: Gauge::default(),
            received: Gauge::default(),
            durable: Gauge::default(),
            lag: Gauge::default(),
            failing: Gauge::default(),
            since_upload: FloatGauge::default(),
            since_backup: FloatGauge::default(),
            backup_seconds: FloatGauge::default(),
            registry: Registry::with_prefix("pgkeep"),
            stream: stream.clone(),
            jobs: jobs.clone(),
        };
        let r = &mut m.registry;
        r.register(
            "timeline",
            "Timeline being streamed (0: not streaming).",
            m.timeline.clone(),
        );
        r.register(
            "received_lsn_bytes",
            "Highest WAL position received.",
            m.received.clone(),
        );
        r.register(
            "durable_lsn_bytes",
            "WAL position up to which everything is in storage.",
            m.durable.clone(),
        );
        r.register(
            "replication_lag_bytes",
            "Received but not yet in storage.",
            m.lag.clone(),
        );
        r.register(
            "stream_failing",
            "1 while the WAL stream fails (the reason is in /status as stream_error), else 0.",
            m.failing.clone(),
        );
        r.register(
            "seconds_since_last_wal_upload",
            "Seconds since the last completed segment reached storage (-1: none yet).",
            m.since_upload.clone(),
        );
        let s = &stream;
        r.register(
            "wal_segments_uploaded",
            "Segments streamed to storage.",
            s.segments_uploaded.clone(),
        );
        r.register(
            "wal_partial_uploads",
            "Uploads of the open segment as .partial.",
            s.partial_uploads.clone(),
        );
        r.register(
            "upload_errors",
            "Failed uploads (each is retried by reconnecting).",
            s.upload_errors.clone(),
        );
        r.register(
            "bytes_uploaded",
            "Bytes stored for streamed segments.",
            s.bytes_uploaded.clone(),
        );
        r.register(
            "stream_reconnects",
            "Reconnections of the WAL stream.",
            s.reconnects.clone(),
        );
        r.register(
            "seconds_since_last_backup",
            "Seconds since this daemon's last successful base backup (-1: none yet).",
            m.since_backup.clone(),
        );
        r.register(
            "last_backup_duration_seconds",
            "How long the last base backup took.",
            m.backup_seconds.clone(),
        );
        r.register(
            "backup_failures",
            "Failed base backups.",
            jobs.state.backup_failures.clone(),
        );
        r.register(
            "wal_served",
            "WAL files served to restore_command.",
            prefetch.served.clone(),
        );
        r.register(
            "wal_prefetched",
            "Segments downloaded ahead of their request.",
            prefetch.prefetched.clone(),
        );
        r.register(
            "wal_prefetch_hits",
            "WAL requests answered from the prefetch cache.",
            prefetch.hits.clone(),
        );
        m
    }

    /// The metrics in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let st = &self.stream;
        let (received, durable) = (st.received_lsn().0, st.durable_lsn().0);
        self.timeline
            .set(i64::from(st.timeline.load(Ordering::Acquire)));
        self.received.set(received as i64);
        self.durable.set(durable as i64);
        self.lag.set(received.saturating_sub(durable) as i64);
        self.failing.set(i64::from(st.problem().is_some()));
        let now = crate::progress::unix_now();
        // -1 for "never", else the seconds since the recorded Unix time.
        let since = |t: &AtomicU64| match t.load(Ordering::Relaxed) {
            0 => -1.0,
            t => now.saturating_sub(t) as f64,
        };
        self.since_upload.set(since(&st.last_upload_unix));
        let jobs = &self.jobs.state;
        self.since_backup.set(since(&jobs.last_backup_unix));
        self.backup_seconds
            .set(jobs.last_backup_ms.load(Ordering::Relaxed) as f64 / 1000.0);
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String does not fail");
        out
    }
}
