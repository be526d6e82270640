//! The BASE_BACKUP conversation: the command for the server's major, the start and end
//! positions, and the copy stream (Postgres 15+: one CopyOut whose messages say where each
//! archive and the manifest start; 13 and 14: one CopyOut per archive, then one for the manifest)
//! turned into the same [`BackupMessage`]s.

use std::collections::VecDeque;

use anyhow::{anyhow, bail};
use bytes::Bytes;

use crate::config::Config;
use crate::pg::messages::BackupMessage;
use crate::pg::replication::{Event, ReplConnection, ResultSet, ServerIdentity};
use crate::pg::{Lsn, TimelineId};
use crate::progress::Progress;
use crate::storage::Archive;
use crate::storage::layout::{ArchiveName, BackupId};

use super::chunks::{Current, Received, Uploader, assemble, flush};
use super::incremental::Plan;
use super::tarfilter::{LeftOut, TarFilter};
use super::{Streamed, label};
use crate::storage::index::FileEntry;

/// Runs BASE_BACKUP and stores its archives as chunks.
pub(super) async fn stream_backup(
    cfg: &Config,
    conn: &mut ReplConnection,
    server: &ServerIdentity,
    archive: &Archive,
    id: &BackupId,
    plan: &Plan,
) -> anyhow::Result<Streamed> {
    let label = label(id).replace('\'', "''");
    // Incremental: on the manifest uploaded on this connection just before (17 and later).
    let incremental = match plan {
        Plan::Incremental(..) => ", INCREMENTAL",
        _ => "",
    };
    let legacy = server.major() < 15;
    conn.send_query(&if legacy {
        // 13 and 14: the older option syntax; WAIT false is NOWAIT.
        format!("BASE_BACKUP LABEL '{label}' PROGRESS FAST NOWAIT MANIFEST 'yes' MANIFEST_CHECKSUMS 'CRC32C'")
    } else {
        format!(
            "BASE_BACKUP (LABEL '{label}', PROGRESS true, CHECKPOINT 'fast', WAIT false, MANIFEST 'yes', MANIFEST_CHECKSUMS 'CRC32C'{incremental})"
        )
    })
    .await?;
    let header = read_start(conn).await?;
    let mut progress = Progress::new("backup", Some(header.total_bytes));
    let mut up = Uploader::new(
        archive,
        id,
        cfg.codec,
        cfg.backup_chunk_bytes,
        cfg.parallelism,
    );
    let mut source = Source {
        legacy: legacy.then(|| Legacy {
            archives: header.tablespaces.into(),
            copy_started: true,
            in_copy: false,
            manifest_started: false,
        }),
    };
    let mut index = Index {
        plan,
        current: None,
        files: vec![],
        left_out: vec![],
    };
    let (archives, manifest) =
        receive(conn, &mut source, &mut up, &mut progress, &mut index).await?;
    let (end, end_tli) = read_end(conn).await?;
    if header.timeline != end_tli {
        bail!(
            "the timeline changed during the backup ({} to {end_tli}); take another",
            header.timeline
        );
    }
    let timeline =
        TimelineId::new(end_tli).ok_or_else(|| anyhow!("BASE_BACKUP reported timeline 0"))?;
    let uploaded = up.finish().await?;
    let took = progress.finish();
    let archives = assemble(archives, uploaded)?;
    let total: u64 = archives.iter().map(|a| a.plain_bytes).sum();
    tracing::info!(
        bytes = total,
        seconds = crate::progress::round3(took.as_secs_f64()),
        mb_per_s = crate::progress::mb_per_s(total, took),
        "backup data uploaded"
    );
    Ok(Streamed {
        archives,
        files: index.files,
        left_out: index.left_out,
        manifest,
        start: header.start,
        end,
        timeline,
    })
}

/// What the server says before the copy stream.
struct Header {
    start: Lsn,
    timeline: u32,
    total_bytes: u64,
    /// Each archive's name and tablespace location (empty for the data directory), in the
    /// order the server sends them.
    tablespaces: Vec<(String, String)>,
}

/// Before the copy stream: the start position and timeline, then the tablespaces (oid,
/// location, size in kB; the data directory is the row without an oid).
async fn read_start(conn: &mut ReplConnection) -> anyhow::Result<Header> {
    let mut sets: Vec<ResultSet> = vec![];
    loop {
        match conn.next_event().await? {
            Event::Rows(s) => sets.push(s),
            Event::CopyStart { .. } => break,
            Event::Done => bail!("BASE_BACKUP ended without sending data"),
        }
    }
    let row = sets
        .first()
        .and_then(|s| s.rows.first())
        .ok_or_else(|| anyhow!("BASE_BACKUP sent no start position"))?;
    let (start, timeline) =
        position(row).ok_or_else(|| anyhow!("BASE_BACKUP sent no start position"))?;
    let rows = sets.get(1).map(|s| s.rows.as_slice()).unwrap_or_default();
    let total_kb: u64 = rows
        .iter()
        .filter_map(|r| r.get(2).cloned().flatten()?.parse::<u64>().ok())
        .sum();
    let tablespaces = rows
        .iter()
        .map(|r| match r.first().cloned().flatten() {
            Some(oid) => (
                format!("{oid}.tar"),
                r.get(1).cloned().flatten().unwrap_or_default(),
            ),
            None => ("base.tar".to_string(), String::new()),
        })
        .collect();
    Ok(Header {
        start,
        timeline,
        total_bytes: total_kb * 1024,
        tablespaces,
    })
}

/// Where the backup messages come from.
struct Source {
    /// 13 and 14 only: the state of their one-CopyOut-per-archive stream.
    legacy: Option<Legacy>,
}

struct Legacy {
    /// Archives still to come, announced by the header.
    archives: VecDeque<(String, String)>,
    /// A CopyOut has begun that no archive was taken from yet (the first one, read with the
    /// header).
    copy_started: bool,
    in_copy: bool,
    manifest_started: bool,
}

/// The end-of-archive marker (two zero blocks), which servers before 15 leave out of each tar.
const TAR_END: [u8; 1024] = [0; 1024];

impl Source {
    /// The next message of the backup, None at the end of the copy stream(s).
    async fn next(&mut self, conn: &mut ReplConnection) -> anyhow::Result<Option<BackupMessage>> {
        let Some(l) = self.legacy.as_mut() else {
            return match conn.next_copy_data().await? {
                Some(msg) => Ok(Some(BackupMessage::parse(msg)?)),
                None => Ok(None),
            };
        };
        loop {
            if l.in_copy {
                match conn.next_copy_data().await? {
                    // 13's walsender has been seen to send empty CopyData frames.
                    Some(d) if d.is_empty() => continue,
                    Some(d) => return Ok(Some(BackupMessage::Data(d))),
                    None => {
                        l.in_copy = false;
                        // Make each stored archive a well-formed tar (the manifest is no tar).
                        if !l.manifest_started {
                            return Ok(Some(BackupMessage::Data(Bytes::from_static(&TAR_END))));
                        }
                        continue;
                    }
                }
            }
            if l.manifest_started {
                return Ok(None);
            }
            if !l.copy_started {
                match conn.next_event().await? {
                    Event::CopyStart { both: false } => {}
                    other => bail!("BASE_BACKUP: expected the next archive, got {other:?}"),
                }
            }
            l.copy_started = false;
            l.in_copy = true;
            return Ok(Some(match l.archives.pop_front() {
                Some((name, location)) => BackupMessage::NewArchive { name, location },
                None => {
                    l.manifest_started = true;
                    BackupMessage::ManifestStart
                }
            }));
        }
    }

    /// Whether the server reports progress itself (`p` messages); otherwise data counts.
    fn reports_progress(&self) -> bool {
        self.legacy.is_none()
    }
}

/// After the copy stream: the end position and timeline.
async fn read_end(conn: &mut ReplConnection) -> anyhow::Result<(Lsn, u32)> {
    let mut end = None;
    loop {
        match conn.next_event().await? {
            Event::Rows(s) => {
                if let Some(row) = s.rows.first() {
                    end = Some(position(row).ok_or_else(|| {
                        anyhow!("BASE_BACKUP sent an end position that is no LSN: {row:?}")
                    })?);
                }
            }
            Event::Done => break,
            Event::CopyStart { .. } => bail!("unexpected second copy stream"),
        }
    }
    end.ok_or_else(|| anyhow!("BASE_BACKUP sent no end position"))
}

/// A row `(lsn, timeline)` as BASE_BACKUP sends its start and end.
fn position(row: &[Option<String>]) -> Option<(Lsn, u32)> {
    let lsn = row.first()?.as_deref()?.parse().ok()?;
    let tli = row
        .get(1)
        .cloned()
        .flatten()
        .unwrap_or_default()
        .parse()
        .unwrap_or(0);
    Some((lsn, tli))
}

/// The file index being built as the archives pass (`tarfilter.rs`).
struct Index<'a> {
    plan: &'a Plan,
    current: Option<TarFilter<'a>>,
    files: Vec<FileEntry>,
    left_out: Vec<LeftOut>,
}

impl<'a> Index<'a> {
    /// A new archive starts: the one before is complete.
    fn start(&mut self, name: &ArchiveName) {
        self.end();
        let (files, start) = match self.plan {
            Plan::Delta(base) => (
                base.files.get(name),
                base.parent.start_time.timestamp().max(0) as u64,
            ),
            _ => (None, 0),
        };
        self.current = Some(TarFilter::new(name.clone(), files, start));
    }

    fn end(&mut self) {
        if let Some(f) = self.current.take() {
            self.files.extend(f.entries);
            self.left_out.extend(f.left_out);
        }
    }
}

/// Reads the copy stream: archives cut into chunks and handed to the uploader, then the manifest.
async fn receive(
    conn: &mut ReplConnection,
    source: &mut Source,
    up: &mut Uploader,
    progress: &mut Progress,
    index: &mut Index<'_>,
) -> anyhow::Result<(Vec<Received>, Vec<u8>)> {
    let mut archives: Vec<Received> = vec![];
    let mut current: Option<Current> = None;
    let mut manifest: Option<Vec<u8>> = None;
    while let Some(msg) = source.next(conn).await? {
        match msg {
            BackupMessage::NewArchive { name, location } => {
                if let Some(c) = current.take() {
                    flush(up, &archives, c).await?;
                }
                if manifest.is_some() {
                    bail!("an archive after the backup manifest");
                }
                let name = ArchiveName::try_from(name).map_err(|e| anyhow!(e))?;
                tracing::debug!(archive = %String::from(name.clone()), %location, "archive starts");
                index.start(&name);
                archives.push((name, (!location.is_empty()).then_some(location), 0));
                current = Some(Current {
                    index: archives.len() - 1,
                    seq: 0,
                    buf: up.buffer(),
                });
            }
            BackupMessage::Data(data) => match (manifest.as_mut(), current.as_mut()) {
                (Some(m), _) => m.extend_from_slice(&data),
                (None, Some(c)) => {
                    if !source.reports_progress() {
                        progress.add(data.len() as u64);
                    }
                    let filter = index.current.as_mut().expect("an archive started");
                    for part in filter.feed(data) {
                        archives[c.index].2 += part.len() as u64;
                        up.add(&archives[c.index].0, c, part).await?;
                    }
                }
                (None, None) => bail!("backup data before any archive"),
            },
            BackupMessage::Progress(n) => progress.add(n.saturating_sub(progress.done())),
            BackupMessage::ManifestStart => {
                index.end();
                if let Some(c) = current.take() {
                    flush(up, &archives, c).await?;
                }
                manifest = Some(vec![]);
            }
        }
    }
    index.end();
    if let Some(c) = current.take() {
        flush(up, &archives, c).await?;
    }
    let manifest = manifest.ok_or_else(|| anyhow!("the server sent no backup manifest"))?;
    Ok((archives, manifest))
}
