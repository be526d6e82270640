//! `pgkeep verify`: checks what is stored without restoring it. For each base backup: every chunk
//! and the manifest present, intact (the checksum of its header over the stored bytes) and the
//! very object `backup.json` names; then WAL continuity from each backup's start through the newest
//! stored segment, across timelines, and every WAL object intact. Needs no identity; with one (or
//! for plain objects) the content is decrypted and decoded too, and the files a backup's chunks
//! hold are compared with its manifest ([`contents`]).
//!
//! Timelines are followed by their `.history` files when they can be read (plain, or with the
//! identity); otherwise by the segments present (each timeline begins at its first stored segment).

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use serde::Serialize;

use std::collections::{HashMap, HashSet};

use crate::pg::{Lsn, SegmentNo, TimelineId, WalFileKind, WalFileName};
use crate::storage::layout::BackupId;
use crate::storage::pieces::PieceRef;
use crate::storage::{Archive, StorageError};

pub mod contents;

/// One thing wrong, by object.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Problem {
    /// The object key (or the first and last of a range of missing segments).
    pub key: String,
    pub problem: String,
    /// Which backups and which recovery it affects.
    pub affects: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub system_identifier: String,
    pub backups_checked: usize,
    /// Backups that restore (their objects intact and their WAL to consistency present), with how
    /// far their recovery can go.
    pub restorable: Vec<Restorable>,
    pub objects_checked: u64,
    pub stored_bytes_checked: u64,
    /// Whether the content itself was decrypted and decoded (not only the stored bytes checked).
    pub content_checked: bool,
    /// How timelines were followed: "history files" or "segments present".
    pub timelines_by: String,
    pub problems: Vec<Problem>,
}

#[derive(Debug, Serialize)]
pub struct Restorable {
    pub id: String,
    /// Where the backup is consistent (its end), the earliest point it restores to.
    pub from_lsn: Lsn,
    pub from_time: chrono::DateTime<chrono::Utc>,
    /// The end of the contiguous WAL from the backup's start (the recoverable window's end).
    pub recoverable_to_lsn: Lsn,
    pub timeline: TimelineId,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for p in &self.problems {
            out.push_str(&format!(
                "PROBLEM {}: {} (affects {})\n",
                p.key, p.problem, p.affects
            ));
        }
        for r in &self.restorable {
            out.push_str(&format!(
                "backup {} restores; recoverable to LSN {} on timeline {}\n",
                r.id, r.recoverable_to_lsn, r.timeline
            ));
        }
        out.push_str(&format!(
            "verify: {} backup(s), {} objects, {} checked ({}; timelines by {}): {}\n",
            self.backups_checked,
            self.objects_checked,
            crate::progress::human_bytes(self.stored_bytes_checked),
            if self.content_checked {
                "content decoded"
            } else {
                "stored bytes only: no identity to decrypt"
            },
            self.timelines_by,
            if self.ok() {
                "everything restorable".to_string()
            } else {
                format!("{} problem(s)", self.problems.len())
            }
        ));
        out
    }
}

/// What checking one object found.
struct Checked {
    stored_len: u64,
    /// The content's length as the header states it (0 when missing or damaged).
    plain_len: u64,
    problem: Option<String>,
    /// Encrypted, and no identity here to check its content.
    undecoded: bool,
}

/// Checks the object `key` against what the metadata records of it (when it records anything).
async fn check_object(
    archive: &Archive,
    key: &object_store::path::Path,
    want: Option<(&str, Option<u64>)>,
) -> Result<Checked, StorageError> {
    Ok(check_fetched(archive, key, want, false).await?.0)
}

/// As [`check_object`]; with `keep`, also returns the decoded content when it can be read (plain,
/// or with the identity) and the object is intact.
async fn check_fetched(
    archive: &Archive,
    key: &object_store::path::Path,
    want: Option<(&str, Option<u64>)>,
    keep: bool,
) -> Result<(Checked, Option<Vec<u8>>), StorageError> {
    let repo = archive.repo();
    let trouble = |problem: String| {
        Ok((
            Checked {
                stored_len: 0,
                plain_len: 0,
                problem: Some(problem),
                undecoded: false,
            },
            None,
        ))
    };
    let (header, stored) = match repo.get_stored(key).await {
        Ok(found) => found,
        Err(StorageError::NotFound { .. }) => return trouble("missing".into()),
        Err(StorageError::Corrupt { reason, .. }) => return trouble(format!("damaged: {reason}")),
        Err(e) => return Err(e),
    };
    let stored_len = stored.len() as u64;
    let mut problem = None;
    if let Some((sum, plain_len)) = want
        && (hex::encode(header.checksum) != sum || plain_len.is_some_and(|l| l != header.plain_len))
    {
        problem = Some(
            "intact, but not the object backup.json records (another checksum or size): \
             swapped or rewritten"
                .to_string(),
        );
    }
    let readable = header.age.is_none() || repo.keys().decrypts();
    let mut content = None;
    if problem.is_none() && readable && (keep || header.age.is_some()) {
        let (repo, key2) = (repo.clone(), key.clone());
        let opened = tokio::task::spawn_blocking(move || repo.open_object(&key2, &stored))
            .await
            .expect("decoding does not panic");
        match opened {
            Ok((_, data)) => content = keep.then_some(data),
            Err(e) => problem = Some(format!("cannot be read: {e}")),
        }
    }
    Ok((
        Checked {
            stored_len,
            plain_len: header.plain_len,
            problem,
            undecoded: !readable,
        },
        content,
    ))
}

/// Lines of a timeline history file: (parent timeline, where it switched).
pub fn parse_history(text: &str) -> Result<Vec<(TimelineId, Lsn)>, String> {
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(tli), Some(lsn)) = (parts.next(), parts.next()) else {
            return Err(format!("line {}: expected a timeline and an LSN", i + 1));
        };
        let tli = tli
            .parse::<u32>()
            .ok()
            .and_then(TimelineId::new)
            .ok_or_else(|| format!("line {}: {tli:?} is not a timeline", i + 1))?;
        let lsn: Lsn = lsn
            .parse()
            .map_err(|_| format!("line {}: {lsn:?} is not an LSN", i + 1))?;
        // As Postgres' own reader: a forged file must not make a timeline its own ancestor.
        if out
            .last()
            .is_some_and(|(last, _): &(TimelineId, Lsn)| last.get() >= tli.get())
        {
            return Err(format!(
                "line {}: timeline {} does not follow the ones before it (they must increase)",
                i + 1,
                tli.get()
            ));
        }
        out.push((tli, lsn));
    }
    Ok(out)
}

/// Checks the archive (every backup, or only `only`), `parallelism` downloads at a time.
pub async fn verify(
    archive: &Archive,
    only: Option<&BackupId>,
    parallelism: usize,
) -> anyhow::Result<Report> {
    let parallelism = parallelism.max(1);
    let layout = archive.layout();
    let mut problems = vec![];
    let mut objects = 0u64;
    let mut bytes = 0u64;
    let mut undecoded = 0u64;
    let (mut backups, damaged) = archive.backups_and_damaged().await?;
    for e in damaged {
        if let StorageError::Corrupt { key, reason } = e {
            problems.push(Problem {
                affects: format!(
                    "the backup in its folder: it is not listed and cannot be restored ({})",
                    key.rsplit('/').nth(1).unwrap_or("?")
                ),
                key,
                problem: format!("damaged backup metadata: {reason}"),
            });
        }
    }
    if let Some(id) = only {
        // An incremental backup is checked with every backup of its chain.
        let Some(wanted) = backups.iter().find(|b| &b.id == id).cloned() else {
            anyhow::bail!("storage holds no backup {id} (see `pgkeep list`)");
        };
        let mut needed: BTreeSet<BackupId> = BTreeSet::from([wanted.id.clone()]);
        let mut next = wanted.parent.clone();
        while let Some(p) = next.take() {
            next = backups
                .iter()
                .find(|b| b.id == p)
                .and_then(|b| b.parent.clone());
            needed.insert(p);
        }
        backups.retain(|b| needed.contains(&b.id));
    }
    if backups.is_empty() {
        problems.push(Problem {
            key: layout.backups_dir().to_string(),
            problem: "storage holds no base backup".into(),
            affects: "every restore".into(),
        });
    }

    // Stored bytes to check: the backups' (as recorded), then the WAL's (once listed).
    let mut progress = crate::progress::Progress::new(
        "verify",
        Some(backups.iter().map(|b| b.stored_bytes).sum()),
    );

    // 1. Every backup's objects; where their content can be read, the files the chunks hold
    // against the manifest.
    let mut broken: BTreeSet<BackupId> = BTreeSet::new();
    for b in &backups {
        let manifest_key = layout.backup_manifest(&b.id);
        // The manifest's plain length is not recorded: its checksum alone is compared.
        let (c, manifest) = check_fetched(
            archive,
            &manifest_key,
            Some((&b.manifest_sha256, None)),
            true,
        )
        .await?;
        let mut checked = vec![(manifest_key.clone(), c)];
        let listed = match manifest.map(|m| contents::manifest_files(&m)) {
            Some(Ok(files)) => Some(files),
            Some(Err(e)) => {
                broken.insert(b.id.clone());
                problems.push(Problem {
                    key: manifest_key.to_string(),
                    problem: e,
                    affects: format!("backup {}: it cannot be checked or verified", b.id),
                });
                None
            }
            None => None,
        };
        let mut held = Some(contents::Files::new());
        for a in &b.archives {
            let (chunks, files) =
                contents::check_archive(archive, b, a, parallelism, listed.is_some()).await?;
            checked.extend(chunks);
            match (files, held.as_mut()) {
                (Some(Ok(files)), Some(all)) => all.extend(files),
                (Some(Err(e)), _) => {
                    broken.insert(b.id.clone());
                    problems.push(Problem {
                        key: layout.backup_chunk(&b.id, &a.name, 0).to_string(),
                        problem: format!(
                            "the chunks of {} do not make a valid archive: {e}",
                            String::from(a.name.clone())
                        ),
                        affects: format!("backup {}: it cannot be restored", b.id),
                    });
                    held = None;
                }
                _ => held = None,
            }
        }
        for (key, c) in checked {
            objects += 1;
            bytes += c.stored_len;
            progress.add(c.stored_len);
            undecoded += u64::from(c.undecoded);
            if let Some(problem) = c.problem {
                broken.insert(b.id.clone());
                problems.push(Problem {
                    key: key.to_string(),
                    problem,
                    affects: format!("backup {}: it cannot be restored", b.id),
                });
            }
        }
        // A delta backup's unchanged files are in its file index, their bytes in its chain.
        if b.kind == crate::storage::catalog::BackupKind::Delta {
            match archive.file_index(b).await {
                Ok(Some(index)) => {
                    if let Ok(chain) = archive.chain(b).await
                        && let Some(why) = index
                            .files
                            .iter()
                            .find_map(|f| f.check_reference(b, &chain).err())
                    {
                        broken.insert(b.id.clone());
                        problems.push(Problem {
                            key: layout.backup_files(&b.id).to_string(),
                            problem: format!("a reference that cannot be read: {why}"),
                            affects: format!("backup {}: it cannot be restored", b.id),
                        });
                    }
                    if let Some(all) = held.as_mut() {
                        for f in index.files.iter().filter(|f| f.from.is_some()) {
                            all.insert(f.manifest_path(), f.size);
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    broken.insert(b.id.clone());
                    problems.push(Problem {
                        key: layout.backup_files(&b.id).to_string(),
                        problem: e.to_string(),
                        affects: format!("backup {}: it cannot be restored", b.id),
                    });
                    held = None;
                }
            }
        }
        if let (Some(manifest), Some(held)) = (&listed, &held) {
            for difference in contents::compare(manifest, held) {
                broken.insert(b.id.clone());
                problems.push(Problem {
                    key: manifest_key.to_string(),
                    problem: format!(
                        "the backup does not hold what its manifest lists: {difference}"
                    ),
                    affects: format!("backup {}: it cannot be restored as recorded", b.id),
                });
            }
        }
    }

    // An incremental backup restores only with every backup it builds on.
    let mut by_age: Vec<&crate::storage::BackupMeta> = backups.iter().collect();
    by_age.sort_by(|a, b| a.id.cmp(&b.id));
    for b in by_age {
        let Some(parent) = &b.parent else { continue };
        let problem = if broken.contains(parent) {
            Some(format!(
                "builds on backup {parent}, which cannot be restored"
            ))
        } else {
            match archive.chain(b).await {
                Ok(_) => None,
                Err(e) => Some(format!("{e:#}")),
            }
        };
        if let Some(problem) = problem {
            broken.insert(b.id.clone());
            problems.push(Problem {
                key: layout.backup_meta(&b.id).to_string(),
                problem,
                affects: format!("backup {}: it cannot be restored", b.id),
            });
        }
    }

    // 2. Every WAL object intact.
    let wal = archive.wal_objects().await?;
    progress.set_total(bytes + wal.iter().map(|(m, _)| m.size).sum::<u64>());
    // The pieces after the daemon's streamed `.partial`s, checked as objects too; they count
    // only through the `.partial` they continue.
    let mut wal: Vec<(object_store::path::Path, WalFileName, Option<PieceRef>)> = wal
        .into_iter()
        .map(|(m, n)| (m.location, n, None))
        .collect();
    for (seg, piece) in archive.all_streamed_pieces().await? {
        wal.push((
            piece.key.clone(),
            seg.with_kind(WalFileKind::Partial),
            Some(piece),
        ));
    }
    let mut present: HashSet<WalFileName> = HashSet::new();
    // A `.partial` reaches only as far as its content: the daemon stores the bytes it received.
    let mut partial_len: HashMap<WalFileName, u64> = HashMap::new();
    let mut streamed_len: HashMap<WalFileName, u64> = HashMap::new();
    let mut intact_pieces: HashMap<WalFileName, Vec<PieceRef>> = HashMap::new();
    let checks = futures::stream::iter(wal.into_iter().map(|(key, name, piece)| async move {
        let checked = check_object(archive, &key, None).await;
        (key, name, piece, checked)
    }))
    .buffer_unordered(parallelism);
    futures::pin_mut!(checks);
    while let Some((key, name, piece, checked)) = checks.next().await {
        let c = checked?;
        objects += 1;
        bytes += c.stored_len;
        progress.add(c.stored_len);
        undecoded += u64::from(c.undecoded);
        let problem = match (&piece, c.problem) {
            (Some(p), None) if c.plain_len != p.end - p.start => Some(format!(
                "holds {} bytes where its name says {}",
                c.plain_len,
                p.end - p.start
            )),
            (_, problem) => problem,
        };
        match (problem, piece) {
            (Some(problem), piece) => problems.push(Problem {
                key: key.to_string(),
                problem,
                affects: match piece {
                    Some(p) => format!("recovery through {name} past offset {:#X}", p.start),
                    None => format!("recovery through {name}"),
                },
            }),
            (None, Some(piece)) => intact_pieces.entry(name).or_default().push(piece),
            (None, None) => {
                if name.kind == WalFileKind::Partial {
                    let len = partial_len.entry(name).or_default();
                    *len = (*len).max(c.plain_len);
                    if key == layout.streaming_partial(&name) {
                        streamed_len.insert(name, c.plain_len);
                    }
                }
                present.insert(name);
            }
        }
    }
    for (name, base) in streamed_len {
        let pieces = intact_pieces.remove(&name).unwrap_or_default();
        let len = partial_len.entry(name).or_default();
        *len = (*len).max(crate::storage::pieces::chain_end(base, &pieces));
    }

    // 3. Continuity, per segment size (one per cluster in practice).
    let mut restorable = vec![];
    let mut timelines_by = "history files".to_string();
    let mut gaps: BTreeMap<(TimelineId, u64), BTreeSet<String>> = BTreeMap::new();
    if let Some(size) = backups.first().map(|b| b.wal_segment_size) {
        // (timeline, segment) of the intact full segments and partials.
        let mut full: BTreeSet<(TimelineId, u64)> = BTreeSet::new();
        let mut partial: BTreeSet<(TimelineId, u64)> = BTreeSet::new();
        for n in &present {
            let set = match n.kind {
                WalFileKind::Segment => &mut full,
                WalFileKind::Partial => &mut partial,
                _ => continue,
            };
            if let Ok(seg) = n.segment_no(size) {
                set.insert((n.timeline, seg.0));
            }
        }
        let any_of = |tli: TimelineId| -> Vec<u64> {
            full.iter()
                .chain(partial.iter())
                .filter(|(t, _)| *t == tli)
                .map(|(_, s)| *s)
                .collect()
        };
        let timelines: BTreeSet<TimelineId> = present
            .iter()
            .filter(|n| matches!(n.kind, WalFileKind::Segment | WalFileKind::Partial))
            .map(|n| n.timeline)
            .collect();
        let target = timelines.iter().max().copied();
        // The chain of timelines recovery follows to the newest: (timeline, first segment).
        let mut chain: Vec<(TimelineId, u64)> = vec![];
        if let Some(target) = target {
            if target.get() > 1 {
                let hist = WalFileName::history(target);
                let key = layout.wal(&hist);
                match archive.repo().get(&key).await {
                    Ok(text) => match parse_history(&String::from_utf8_lossy(&text)) {
                        Ok(entries) => {
                            let mut begin = 0;
                            for (tli, switch) in entries {
                                chain.push((tli, begin));
                                begin = size.segment_of(switch).0;
                            }
                            chain.push((target, begin));
                        }
                        Err(e) => problems.push(Problem {
                            key: key.to_string(),
                            problem: format!("not a timeline history file: {e}"),
                            affects: format!("recovery onto timeline {target}"),
                        }),
                    },
                    Err(StorageError::Locked { .. }) => {
                        timelines_by =
                            "segments present (no identity to read .history files)".into()
                    }
                    Err(StorageError::NotFound { .. }) => {}
                    Err(StorageError::Corrupt { .. }) => {} // reported with the WAL objects
                    Err(e) => return Err(e.into()),
                }
                // Every timeline past the first needs its history file, or recovery stops before it.
                for tli in &timelines {
                    if tli.get() > 1
                        && !present
                            .iter()
                            .any(|n| n.kind == WalFileKind::History && n.timeline == *tli)
                    {
                        problems.push(Problem {
                            key: layout.wal(&WalFileName::history(*tli)).to_string(),
                            problem: format!(
                                "missing: timeline {tli} has WAL but no history file, so recovery cannot follow it"
                            ),
                            affects: format!("recovery to latest past timeline {}", tli.get() - 1),
                        });
                    }
                }
            }
            if chain.is_empty() && timelines.len() == 1 {
                chain.push((target, 0));
            } else if chain.is_empty() {
                // Guessing switch points from the segments present could hide a gap (a dead
                // branch's copies standing in for the parent's): each backup is checked on its
                // own timeline only, and the rest is said to be unchecked.
                timelines_by = "none: only each backup's own timeline was checked".into();
                problems.push(Problem {
                    key: layout.wal(&WalFileName::history(target)).to_string(),
                    problem: format!(
                        "the switch points of timelines {} to {target} could not be read (an \
                         encrypted .history file without the identity, or a missing or damaged \
                         one): continuity across timelines was not verified",
                        timelines.iter().next().expect("several")
                    ),
                    affects: "recovery to latest across timelines: run verify with \
                              encryption_identity_file"
                        .into(),
                });
            }
        }
        let newest = target.and_then(|t| any_of(t).into_iter().max());
        for b in &backups {
            let start = size.segment_of(b.start_lsn).0;
            let end = size.segment_of(b.end_lsn).0;
            // On the way to the latest timeline: its timeline is in the chain and it started
            // before that timeline's switch to the next.
            let pos = chain.iter().position(|(t, _)| *t == b.timeline);
            let in_chain =
                pos.is_some_and(|i| chain.get(i + 1).is_none_or(|(_, next)| start < *next));
            let own_newest = any_of(b.timeline).into_iter().max();
            let last = match (in_chain, chain.is_empty()) {
                (true, _) => newest.unwrap_or(end).max(end),
                // No chain known: as far as its own timeline goes.
                (false, true) => own_newest.unwrap_or(end).max(end),
                (false, false) => {
                    broken.insert(b.id.clone());
                    problems.push(Problem {
                        key: layout.backup_meta(&b.id).to_string(),
                        problem: format!(
                            "on timeline {}, which is not on the way to the latest timeline \
                             where this backup started (a branch left behind)",
                            b.timeline
                        ),
                        affects: format!(
                            "backup {}: pgkeep restore (recovery_target_timeline = 'latest') cannot use it",
                            b.id
                        ),
                    });
                    continue;
                }
            };
            let newest = if in_chain { newest } else { own_newest };
            let mut reach = None;
            for s in start..=last {
                let tli = if in_chain {
                    chain
                        .iter()
                        .rev()
                        .find(|(t, begin)| *begin <= s && *t >= b.timeline)
                        .map(|(t, _)| *t)
                        .unwrap_or(b.timeline)
                } else {
                    b.timeline
                };
                let whole = full.contains(&(tli, s));
                let partial_end = Some(s) == newest && partial.contains(&(tli, s));
                if whole || partial_end {
                    reach = Some((tli, s));
                    continue;
                }
                gaps.entry((tli, s)).or_default().insert(b.id.to_string());
                if s <= end {
                    broken.insert(b.id.clone());
                }
                break;
            }
            if !broken.contains(&b.id) {
                let (tli, s) = reach.unwrap_or((b.timeline, end));
                let whole = full.contains(&(tli, s)) || reach.is_none();
                let partial =
                    WalFileName::segment(tli, SegmentNo(s), size).with_kind(WalFileKind::Partial);
                let to = match partial_len.get(&partial) {
                    Some(len) if !whole => Lsn(size.start_of(SegmentNo(s)).0 + len),
                    _ => size.start_of(SegmentNo(s + 1)),
                };
                restorable.push(Restorable {
                    id: b.id.to_string(),
                    from_lsn: b.end_lsn,
                    from_time: b.end_time,
                    recoverable_to_lsn: to,
                    timeline: tli,
                });
            }
        }
        for ((tli, s), ids) in gaps {
            let name = WalFileName::segment(tli, SegmentNo(s), size);
            let ids: Vec<String> = ids.into_iter().collect();
            let unrestorable: Vec<&String> = ids
                .iter()
                .filter(|i| broken.iter().any(|b| b.to_string() == **i))
                .collect();
            problems.push(Problem {
                key: layout.wal(&name).to_string(),
                problem: "missing from the WAL chain".into(),
                affects: if unrestorable.is_empty() {
                    format!(
                        "backup(s) {}: recovery stops before it (LSN {}); later points in time cannot be reached",
                        ids.join(", "),
                        size.start_of(SegmentNo(s))
                    )
                } else {
                    format!(
                        "backup(s) {} need it to become consistent: they cannot be restored",
                        ids.join(", ")
                    )
                },
            });
        }
    }
    progress.finish();
    Ok(Report {
        system_identifier: archive.system_identifier().to_string(),
        backups_checked: backups.len(),
        restorable,
        objects_checked: objects,
        stored_bytes_checked: bytes,
        content_checked: undecoded == 0,
        timelines_by,
        problems,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn history_files_parse_and_garbage_is_named() {
        let h = super::parse_history(
            "1\t0/3000158\tno recovery target specified\n\n2\t0/5000000\tbefore 2026\n",
        )
        .unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[1].0.get(), 2);
        assert_eq!(h[1].1.to_string(), "0/5000000");
        assert!(super::parse_history("x y").unwrap_err().contains("line 1"));
        let e = super::parse_history("2\t0/3000000\tno reason\n1\t0/5000000\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("must increase"), "{e}");
    }
}
