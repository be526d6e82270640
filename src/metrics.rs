//! The daemon's Prometheus metrics (`GET /metrics`), through `prometheus-client`: the counters
//! live in the states of the streamer, the jobs and the prefetcher (registered here once); the
//! gauges are read from those states at each scrape. Names are documented in
//! `docs/http-api.md`; change both together (and the alert rules and dashboard under
//! `deploy/helm/pgkeep/files/`, which `tests/monitoring.rs` checks against these names).

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
    spooled: Gauge,
    in_flight: Gauge,
    pending_seconds: FloatGauge,
    since_upload: FloatGauge,
    since_backup: FloatGauge,
    backup_seconds: FloatGauge,
    newest_backup: Gauge,
    checks: CheckGauges,
}

/// The scheduled checks' results, read at each scrape.
#[derive(Default)]
struct CheckGauges {
    verify_last_run: Gauge,
    verify_last_success: Gauge,
    verify_problems: Gauge,
    verify_seconds: FloatGauge,
    restorable_backups: Gauge,
    window_start_lsn: Gauge,
    window_start_time: Gauge,
    window_end_lsn: Gauge,
    drill_last_run: Gauge,
    drill_last_success: Gauge,
    drill_ok: Gauge,
    drill_seconds: FloatGauge,
}

impl Metrics {
    pub fn new(stream: Arc<StreamState>, jobs: Arc<Jobs>, prefetch: &Prefetcher) -> Metrics {
        let mut m = Metrics {
            timeline: Gauge::default(),
            received: Gauge::default(),
            durable: Gauge::default(),
            lag: Gauge::default(),
            failing: Gauge::default(),
            spooled: Gauge::default(),
            in_flight: Gauge::default(),
            pending_seconds: FloatGauge::default(),
            since_upload: FloatGauge::default(),
            since_backup: FloatGauge::default(),
            backup_seconds: FloatGauge::default(),
            newest_backup: Gauge::default(),
            checks: CheckGauges::default(),
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
        r.register(
            "wal_spooled_segments",
            "Completed segments in the spool that storage does not hold yet.",
            m.spooled.clone(),
        );
        r.register(
            "wal_uploads_in_flight",
            "WAL uploads running (segments and .partial).",
            m.in_flight.clone(),
        );
        r.register(
            "wal_pending_seconds",
            "Age of the oldest received WAL not yet in storage (0: none waits).",
            m.pending_seconds.clone(),
        );
        let s = &stream;
        r.register(
            "wal_backpressure_events",
            "Times the spool filled with WAL storage had not taken and receiving paused.",
            s.backpressure_events.clone(),
        );
        r.register(
            "wal_durable_lag_seconds",
            "How long received WAL waited until it was in storage (per advance of the durable position, its oldest WAL).",
            s.durable_lag.0.clone(),
        );
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
            "wal_partial_pieces",
            "Of the open segment's uploads, the pieces holding only the bytes new since the last.",
            s.partial_pieces.clone(),
        );
        r.register(
            "wal_partial_uploaded_bytes",
            "Bytes stored by the open segment's uploads (.partial objects and pieces).",
            s.partial_bytes_uploaded.clone(),
        );
        r.register(
            "upload_errors",
            "Failed WAL uploads (each is tried again; the replication connection stays).",
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
            "newest_backup_timestamp_seconds",
            "Unix time the newest base backup in storage ended, as the backup schedule last saw it (0: none seen).",
            m.newest_backup.clone(),
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
            "WAL requests over HTTP answered from a prefetched file.",
            prefetch.hits.clone(),
        );
        r.register(
            "wal_handed_off",
            "Prefetched segments wal-fetch took from the hand-off directory (no HTTP request).",
            prefetch.handed_off.clone(),
        );
        r.register(
            "wal_prefetch_window_segments",
            "How many segments ahead of recovery the prefetch fetches (grows when recovery catches up).",
            prefetch.window.clone(),
        );
        let c = &m.checks;
        for (name, help, gauge) in [
            (
                "verify_last_run_timestamp_seconds",
                "Unix time the last scheduled verify ended (0: none yet).",
                &c.verify_last_run,
            ),
            (
                "verify_last_success_timestamp_seconds",
                "Unix time of the last scheduled verify that found no problem (0: none yet).",
                &c.verify_last_success,
            ),
            (
                "verify_problems",
                "Problems the last scheduled verify found (-1: none ran to the end yet).",
                &c.verify_problems,
            ),
            (
                "verify_restorable_backups",
                "Backups the last scheduled verify found restorable (-1: unknown).",
                &c.restorable_backups,
            ),
            (
                "recoverable_window_start_lsn_bytes",
                "Start of the recoverable window by the last verify: the oldest restorable backup's end (0: none).",
                &c.window_start_lsn,
            ),
            (
                "recoverable_window_start_timestamp_seconds",
                "Unix time of that start (0: none).",
                &c.window_start_time,
            ),
            (
                "recoverable_window_end_lsn_bytes",
                "End of the recoverable window by the last verify (0: none).",
                &c.window_end_lsn,
            ),
            (
                "drill_last_run_timestamp_seconds",
                "Unix time the last scheduled restore drill ended (0: none yet).",
                &c.drill_last_run,
            ),
            (
                "drill_last_success_timestamp_seconds",
                "Unix time of the last restore drill that passed (0: none yet).",
                &c.drill_last_success,
            ),
            (
                "drill_last_ok",
                "1 if the last restore drill passed, 0 if it failed, -1 if none ran yet.",
                &c.drill_ok,
            ),
        ] {
            r.register(name, help, gauge.clone());
        }
        r.register(
            "verify_duration_seconds",
            "How long the last scheduled verify took.",
            c.verify_seconds.clone(),
        );
        r.register(
            "drill_duration_seconds",
            "How long the last restore drill took.",
            c.drill_seconds.clone(),
        );
        r.register(
            "check_errors",
            "Scheduled verifies and drills that could not run at all.",
            jobs.checks.errors.clone(),
        );
        m
    }

    /// The checks' gauges from their last results.
    fn set_checks(&self) {
        let s = self.jobs.checks.snapshot();
        let c = &self.checks;
        let (v, d) = (&s.verify, &s.drill);
        let signed = |n: Option<usize>| n.map_or(-1, |n| n as i64);
        c.verify_last_run.set(v.last_run_unix as i64);
        c.verify_last_success.set(v.last_success_unix as i64);
        c.verify_problems.set(signed(v.problems));
        c.restorable_backups.set(signed(v.restorable_backups));
        c.verify_seconds.set(v.seconds);
        let w = v.window.as_ref();
        c.window_start_lsn.set(w.map_or(0, |w| w.from_lsn.0 as i64));
        c.window_start_time
            .set(w.map_or(0, |w| w.from_time.timestamp()));
        c.window_end_lsn.set(w.map_or(0, |w| w.to_lsn.0 as i64));
        c.drill_last_run.set(d.last_run_unix as i64);
        c.drill_last_success.set(d.last_success_unix as i64);
        c.drill_ok.set(d.ok.map_or(-1, i64::from));
        c.drill_seconds.set(d.seconds);
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
        self.spooled
            .set(st.spooled_segments.load(Ordering::Relaxed) as i64);
        self.in_flight
            .set(st.uploads_in_flight.load(Ordering::Relaxed) as i64);
        self.pending_seconds
            .set(match st.oldest_pending_unix_ms.load(Ordering::Relaxed) {
                0 => 0.0,
                t => crate::progress::unix_now_ms().saturating_sub(t) as f64 / 1000.0,
            });
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
        self.newest_backup
            .set(jobs.newest_backup_unix.load(Ordering::Relaxed) as i64);
        self.set_checks();
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String does not fail");
        out
    }
}
