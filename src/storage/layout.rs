//! The only place object keys are built. The layout is documented in `docs/storage-format.md`;
//! change both together and bump [`LAYOUT_VERSION`] when old readers could misread the new layout.
//!
//! ```text
//! pgkeep.json                                  format marker: {"format": "pgkeep", "layout_version": 1}
//! clusters/<system identifier>/cluster.json    which cluster this is (system identifier, segment size)
//! clusters/<system identifier>/wal/<TLI>/<WAL file name>
//! ```
//!
//! Every cluster lives under its own system identifier, so two clusters never mix.

use object_store::path::Path;

use crate::pg::WalFileName;

pub const LAYOUT_VERSION: u32 = 1;
pub const FORMAT_NAME: &str = "pgkeep";

/// The format marker at the root of the storage prefix.
pub fn format_marker() -> Path {
    Path::from("pgkeep.json")
}

/// The folder holding one folder per cluster.
pub fn clusters() -> Path {
    Path::from("clusters")
}

/// Keys of one cluster's objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterLayout {
    pub system_identifier: u64,
}

impl ClusterLayout {
    pub fn new(system_identifier: u64) -> Self {
        ClusterLayout { system_identifier }
    }

    pub fn root(&self) -> Path {
        clusters().clone().join(self.system_identifier.to_string())
    }

    pub fn info(&self) -> Path {
        self.root().join("cluster.json")
    }

    /// The folder of one timeline's WAL.
    pub fn wal_dir(&self, timeline: crate::pg::TimelineId) -> Path {
        self.root()
            .join("wal")
            .join(format!("{:08X}", timeline.get()))
    }

    /// A WAL file's key: segments, `.partial`, `.history` and `.backup` files all live in their
    /// timeline's folder under their own (validated) name.
    pub fn wal(&self, name: &WalFileName) -> Path {
        self.wal_dir(name.timeline).join(name.to_string())
    }
}

/// The system identifier of a cluster folder's name, if it is one.
pub fn parse_cluster_dir(name: &str) -> Option<u64> {
    (!name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) && !name.starts_with('0'))
        .then(|| name.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_layout() {
        let c = ClusterLayout::new(7312345678901234567);
        assert_eq!(
            c.info().as_ref(),
            "clusters/7312345678901234567/cluster.json"
        );
        let seg: WalFileName = "00000002000000000000000A".parse().unwrap();
        assert_eq!(
            c.wal(&seg).as_ref(),
            "clusters/7312345678901234567/wal/00000002/00000002000000000000000A"
        );
        let hist: WalFileName = "00000002.history".parse().unwrap();
        assert_eq!(
            c.wal(&hist).as_ref(),
            "clusters/7312345678901234567/wal/00000002/00000002.history"
        );
        assert_eq!(format_marker().as_ref(), "pgkeep.json");
    }

    #[test]
    fn cluster_folder_names() {
        assert_eq!(
            parse_cluster_dir("7312345678901234567"),
            Some(7312345678901234567)
        );
        for bad in ["", "0", "012", "abc", "99999999999999999999", "1/2"] {
            assert_eq!(parse_cluster_dir(bad), None, "{bad}");
        }
    }
}
