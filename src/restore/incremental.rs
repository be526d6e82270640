//! Restoring a chain of backups (Postgres 17's incremental backups): the full backup is unpacked
//! as usual, then each incremental one on top of it, oldest first, in one streaming pass per
//! archive. An incremental backup holds its changed relation files as `INCREMENTAL.<name>` files
//! (a header, the block numbers, the blocks; Postgres' `basebackup_incremental.c`), whose blocks are
//! written into the file the earlier backups restored, cut to the length the header says; every
//! other file whole; and a file an incremental backup does not hold was deleted before it, so it is
//! removed. At the end the newest backup's manifest is rewritten to describe the rebuilt files, as
//! `pg_combinebackup` does, so `pg_verifybackup` checks the result, and `backup_label` loses the
//! lines that mark it incremental (Postgres refuses to start from such a label).

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use sha2::Digest;

/// The prefix of an incremental file's name.
pub(super) const PREFIX: &str = "INCREMENTAL.";
/// Postgres' block size (the default, and the only one pgkeep's restore rebuilds).
const BLCKSZ: u64 = 8192;
/// Blocks in a relation segment file (1 GB of 8 kB blocks): no incremental file names more.
const RELSEG_SIZE: u32 = 131072;
const MAGIC: u32 = 0xd3ae_1f0d;

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// Applies the incremental file read from `r` (`size` bytes, its tar entry) to `target`, the file
/// the earlier backups of the chain restored: the file is cut to the header's truncation length,
/// then each block is written in its place (a gap left by a block past the old end reads as zeros,
/// as in `pg_combinebackup`). Everything in the header is checked against the entry's size before
/// anything is written. Returns the file's new length, and whether its content changed (a block
/// written or its length changed).
pub(super) fn apply(
    r: &mut impl Read,
    size: u64,
    f: &std::fs::File,
) -> anyhow::Result<(u64, bool)> {
    let malformed = |why: String| anyhow::anyhow!("a malformed incremental file: {why}");
    if size < 12 {
        return Err(malformed(format!("{size} bytes, shorter than its header")));
    }
    let magic = read_u32(r)?;
    if magic != MAGIC {
        return Err(malformed(format!("magic number {magic:#x}")));
    }
    let count = read_u32(r)?;
    let truncation = read_u32(r)?;
    if count > RELSEG_SIZE || truncation > RELSEG_SIZE {
        return Err(malformed(format!(
            "{count} blocks, truncation length {truncation}: more than a relation segment holds"
        )));
    }
    let mut header = 12 + 4 * u64::from(count);
    if count > 0 && header % BLCKSZ != 0 {
        header += BLCKSZ - header % BLCKSZ; // blocks start aligned
    }
    if size != header + u64::from(count) * BLCKSZ {
        return Err(malformed(format!(
            "{size} bytes where a header for {count} blocks and the blocks make {} \
             (a block size other than 8 kB is not supported)",
            header + u64::from(count) * BLCKSZ
        )));
    }
    let mut blocks = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let b = read_u32(r)?;
        if b >= RELSEG_SIZE {
            return Err(malformed(format!(
                "block number {b} past a relation segment"
            )));
        }
        blocks.push(b);
    }
    std::io::copy(
        &mut r.take(header - 12 - 4 * u64::from(count)),
        &mut std::io::sink(),
    )?;
    let before = f.metadata()?.len();
    f.set_len(u64::from(truncation) * BLCKSZ)?;
    let mut buf = vec![0u8; BLCKSZ as usize];
    let mut end = u64::from(truncation) * BLCKSZ;
    for b in blocks {
        r.read_exact(&mut buf)?;
        let at = u64::from(b) * BLCKSZ;
        f.write_all_at(&buf, at)?;
        end = end.max(at + BLCKSZ);
    }
    Ok((end, count > 0 || before != end))
}

/// The file the earlier backups of a chain restored at `target`, opened to apply an incremental
/// file to: never created, never through a link, a regular file.
pub(super) fn open_existing(target: &Path) -> anyhow::Result<std::fs::File> {
    let f = match std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(target)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{} has no full copy in the earlier backups of the chain to apply its changed blocks to",
            target.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("opening {}", target.display())),
    };
    if !f.metadata()?.is_file() {
        bail!("{} is not a regular file", target.display());
    }
    Ok(f)
}

/// The file an incremental file's path rebuilds: the same path without the prefix on its name.
pub(super) fn rebuilt_path(path: &str) -> Option<String> {
    let (dir, name) = match path.rsplit_once('/') {
        Some((d, n)) => (Some(d), n),
        None => (None, path),
    };
    let bare = name.strip_prefix(PREFIX).filter(|b| !b.is_empty())?;
    Some(match dir {
        Some(d) => format!("{d}/{bare}"),
        None => bare.to_string(),
    })
}

/// After a backup of the chain is applied: removes the regular files below `root` (restored with
/// the manifest paths under `prefix`) that it does not hold, whole or incremental: they were
/// deleted (a dropped table, say) between the previous backup and it. `keep` holds the manifest
/// paths it holds, incremental ones by the file they rebuild. Links are never followed; `own`, the
/// restore's own files at the top of `root` (its marker, the held-back PG_VERSION), are left alone.
pub(super) fn remove_deleted(
    root: &Path,
    prefix: &str,
    keep: &HashSet<String>,
    own: &[&str],
) -> anyhow::Result<usize> {
    let mut removed = 0;
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        let here = root.join(&rel);
        for entry in
            std::fs::read_dir(&here).with_context(|| format!("reading {}", here.display()))?
        {
            let entry = entry?;
            let rel_path = rel.join(entry.file_name());
            let kind = entry.file_type()?;
            if kind.is_dir() {
                dirs.push(rel_path);
                continue;
            }
            if !kind.is_file() {
                continue;
            }
            let name = rel_path.to_string_lossy().into_owned();
            if rel.as_os_str().is_empty() && own.contains(&name.as_str()) {
                continue;
            }
            if !keep.contains(&format!("{prefix}{name}")) {
                std::fs::remove_file(root.join(&rel_path))
                    .with_context(|| format!("removing {}", rel_path.display()))?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// `backup_label` without the lines that make it an incremental backup's (`INCREMENTAL FROM LSN`,
/// `INCREMENTAL FROM TLI`): the rebuilt directory is a full backup's, and Postgres refuses to start
/// from an incremental one's label.
pub(super) fn strip_label(label: &str) -> String {
    label
        .lines()
        .filter(|l| !l.starts_with("INCREMENTAL FROM "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// What the rebuilt directory's manifest says of a file: its size and CRC-32C (in the manifest's
/// form: the checksum's bytes in memory order, hex).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Rebuilt {
    pub size: u64,
    pub crc32c: String,
}

impl Rebuilt {
    /// What a manifest entry says, when it gives a CRC-32C.
    pub(super) fn from_manifest(f: &crate::verify::contents::ManifestFile) -> Option<Rebuilt> {
        match &f.checksum {
            Some((algorithm, value)) if algorithm == "CRC32C" => Some(Rebuilt {
                size: f.size,
                crc32c: value.clone(),
            }),
            _ => None,
        }
    }
}

/// The CRC-32C of a restored file, as a backup manifest writes it.
pub(super) fn file_crc32c(path: &Path) -> anyhow::Result<Rebuilt> {
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut digest = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        digest.update(&buf[..n]);
        size += n as u64;
    }
    let crc = digest.finalize() as u32;
    Ok(Rebuilt {
        size,
        crc32c: hex::encode(crc.to_le_bytes()),
    })
}

/// The manifest of the rebuilt directory from the newest backup's: each incremental file's entry
/// names the file it rebuilt, with that file's size and checksum (`rebuilt`, by the incremental
/// entry's path); every other entry as it was; the manifest checksum computed anew (SHA-256 of
/// everything up to the line that holds it).
pub(super) fn combined_manifest(
    newest: &[u8],
    rebuilt: &dyn Fn(&str) -> anyhow::Result<Option<Rebuilt>>,
) -> anyhow::Result<Vec<u8>> {
    let v: serde_json::Value =
        serde_json::from_slice(newest).context("the newest backup's manifest is not JSON")?;
    let version = v["PostgreSQL-Backup-Manifest-Version"]
        .as_u64()
        .context("the newest backup's manifest has no version")?;
    let files = v["Files"]
        .as_array()
        .context("the newest backup's manifest has no Files list")?;
    let mut out = format!("{{ \"PostgreSQL-Backup-Manifest-Version\": {version},\n");
    if let Some(sysid) = v.get("System-Identifier") {
        out.push_str(&format!("\"System-Identifier\": {sysid},\n"));
    }
    out.push_str("\"Files\": [");
    for (i, f) in files.iter().enumerate() {
        let path = crate::verify::contents::entry_path(f).map_err(|e| anyhow::anyhow!(e))?;
        let mut entry = f.clone();
        if let Some(r) = rebuilt(&path)? {
            let name = rebuilt_path(&path).unwrap_or(path);
            let obj = entry
                .as_object_mut()
                .context("a manifest entry is no object")?;
            obj.remove("Encoded-Path");
            obj.insert("Path".into(), name.into());
            obj.insert("Size".into(), r.size.into());
            obj.insert("Checksum-Algorithm".into(), "CRC32C".into());
            obj.insert("Checksum".into(), r.crc32c.into());
        }
        out.push_str(if i == 0 { "\n" } else { ",\n" });
        out.push_str(&entry_line(&entry));
    }
    out.push_str(" ],\n");
    if let Some(ranges) = v.get("WAL-Ranges") {
        out.push_str(&format!(
            "\"WAL-Ranges\": {},\n",
            serde_json::to_string(ranges).expect("serialisable")
        ));
    }
    let sum = hex::encode(sha2::Sha256::digest(out.as_bytes()));
    out.push_str(&format!("\"Manifest-Checksum\": \"{sum}\"}}\n"));
    Ok(out.into_bytes())
}

/// One file's entry, its fields in the order Postgres writes them.
fn entry_line(entry: &serde_json::Value) -> String {
    const ORDER: [&str; 6] = [
        "Path",
        "Encoded-Path",
        "Size",
        "Last-Modified",
        "Checksum-Algorithm",
        "Checksum",
    ];
    let fields: Vec<String> = ORDER
        .iter()
        .filter_map(|k| {
            entry.get(*k).map(|v| {
                format!(
                    "\"{k}\": {}",
                    serde_json::to_string(v).expect("serialisable")
                )
            })
        })
        .collect();
    format!("{{ {} }}", fields.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An incremental file of `blocks` (number, fill byte) with this truncation length.
    fn incremental(truncation: u32, blocks: &[(u32, u8)]) -> Vec<u8> {
        let mut out = vec![];
        out.extend(MAGIC.to_le_bytes());
        out.extend((blocks.len() as u32).to_le_bytes());
        out.extend(truncation.to_le_bytes());
        for (b, _) in blocks {
            out.extend(b.to_le_bytes());
        }
        if !blocks.is_empty() {
            out.resize(out.len().div_ceil(BLCKSZ as usize) * BLCKSZ as usize, 0);
        }
        for (_, fill) in blocks {
            out.extend(std::iter::repeat_n(*fill, BLCKSZ as usize));
        }
        out
    }

    fn blocks_of(path: &Path) -> Vec<u8> {
        std::fs::read(path)
            .unwrap()
            .chunks(BLCKSZ as usize)
            .map(|c| {
                assert!(c.iter().all(|b| *b == c[0]));
                c[0]
            })
            .collect()
    }

    #[test]
    fn changed_blocks_land_in_place_and_the_file_takes_the_new_length() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("16384");
        let base: Vec<u8> = (1..=4u8)
            .flat_map(|b| std::iter::repeat_n(b, BLCKSZ as usize))
            .collect();
        std::fs::write(&f, &base).unwrap();
        // Block 1 changed, the file cut to 3 blocks, then grown to 6 (block 5 new, 3 and 4 zeros).
        let inc = incremental(3, &[(1, 9), (5, 7)]);
        let file = open_existing(&f).unwrap();
        let (len, changed) = apply(&mut &inc[..], inc.len() as u64, &file).unwrap();
        assert_eq!((len, changed), (6 * BLCKSZ, true));
        assert_eq!(blocks_of(&f), [1, 9, 3, 0, 0, 7]);
        // Nothing changed, cut to 2 blocks: the header alone (no padding).
        let inc = incremental(2, &[]);
        assert_eq!(inc.len(), 12);
        assert_eq!(apply(&mut &inc[..], 12, &file).unwrap(), (2 * BLCKSZ, true));
        assert_eq!(blocks_of(&f), [1, 9]);
        // Nothing changed at all: the file is what it was (its checksum stands).
        assert_eq!(
            apply(&mut &inc[..], 12, &file).unwrap(),
            (2 * BLCKSZ, false)
        );
    }

    #[test]
    fn a_malformed_incremental_file_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("1");
        std::fs::write(&f, vec![5u8; BLCKSZ as usize * 2]).unwrap();
        let good = incremental(2, &[(0, 1)]);
        let mut bad_magic = good.clone();
        bad_magic[0] ^= 1;
        let mut huge_block = good.clone();
        huge_block[12..16].copy_from_slice(&RELSEG_SIZE.to_le_bytes());
        let mut huge_count = good.clone();
        huge_count[4..8].copy_from_slice(&(RELSEG_SIZE + 1).to_le_bytes());
        for (what, data, size) in [
            ("magic", bad_magic.clone(), bad_magic.len() as u64),
            ("block number", huge_block.clone(), huge_block.len() as u64),
            ("blocks", huge_count.clone(), huge_count.len() as u64),
            ("bytes where", good.clone(), good.len() as u64 - 1),
        ] {
            let err = apply(&mut &data[..], size, &open_existing(&f).unwrap()).unwrap_err();
            assert!(err.to_string().contains(what), "{what}: {err}");
            assert_eq!(blocks_of(&f), [5, 5], "{what}");
        }
        // No full file to apply it to: named, nothing created.
        let missing = dir.path().join("2");
        let err = open_existing(&missing).unwrap_err();
        assert!(err.to_string().contains("no full copy"), "{err}");
        assert!(!missing.exists());
    }

    #[test]
    fn the_combined_manifest_describes_the_rebuilt_files_and_checks_itself() {
        let newest = br#"{ "PostgreSQL-Backup-Manifest-Version": 2,
"System-Identifier": 7449000000000000001,
"Files": [
{ "Path": "backup_label", "Size": 10, "Last-Modified": "2026-12-06 10:00:00 GMT", "Checksum-Algorithm": "CRC32C", "Checksum": "00000000" },
{ "Path": "base/5/INCREMENTAL.16384", "Size": 16396, "Last-Modified": "2026-12-06 10:00:00 GMT", "Checksum-Algorithm": "CRC32C", "Checksum": "11111111" },
{ "Path": "global/pg_control", "Size": 8192, "Last-Modified": "2026-12-06 10:00:00 GMT", "Checksum-Algorithm": "CRC32C", "Checksum": "22222222" } ],
"WAL-Ranges": [
{ "Timeline": 1, "Start-LSN": "0/4000028", "End-LSN": "0/4000120" }
],
"Manifest-Checksum": "ignored"}
"#;
        let out = combined_manifest(newest, &|p| {
            Ok(
                (p == "base/5/INCREMENTAL.16384" || p == "backup_label").then(|| Rebuilt {
                    size: 40960,
                    crc32c: "abcdef01".into(),
                }),
            )
        })
        .unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["System-Identifier"].as_u64(), Some(7449000000000000001));
        assert_eq!(v["Files"][1]["Path"], "base/5/16384");
        assert_eq!(v["Files"][1]["Size"], 40960);
        assert_eq!(v["Files"][1]["Checksum"], "abcdef01");
        assert_eq!(v["Files"][2]["Checksum"], "22222222");
        assert_eq!(v["WAL-Ranges"][0]["End-LSN"], "0/4000120");
        assert!(text.starts_with("{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n"));
        // Checked as pg_verifybackup does: SHA-256 up to and including the next-to-last newline.
        let cut = text[..text.len() - 1].rfind('\n').unwrap() + 1;
        let sum = hex::encode(sha2::Sha256::digest(&out[..cut]));
        assert_eq!(v["Manifest-Checksum"], sum.as_str());
    }

    #[test]
    fn incremental_labels_and_names() {
        let label = "START WAL LOCATION: 0/4000028 (file 000000010000000000000004)\nINCREMENTAL FROM LSN: 0/2000028\nINCREMENTAL FROM TLI: 1\nLABEL: x\n";
        assert_eq!(
            strip_label(label),
            "START WAL LOCATION: 0/4000028 (file 000000010000000000000004)\nLABEL: x\n"
        );
        assert_eq!(
            rebuilt_path("base/5/INCREMENTAL.16384").as_deref(),
            Some("base/5/16384")
        );
        assert_eq!(rebuilt_path("INCREMENTAL.x").as_deref(), Some("x"));
        assert_eq!(rebuilt_path("base/5/16384"), None);
        assert_eq!(rebuilt_path("base/5/INCREMENTAL."), None);
    }
}
