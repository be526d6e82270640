//! [`Archive`]: one cluster's archive in one store, the handle commands and the daemon open (and
//! check) once and pass down. Its catalog operations are in `catalog.rs`.

use super::layout::ClusterLayout;
use super::repo::Repo;

/// A store and the cluster whose objects are read and written in it.
#[derive(Clone, Debug)]
pub struct Archive {
    repo: Repo,
    cluster: ClusterLayout,
}

impl Archive {
    /// The archive of cluster `system_identifier` in `repo` (nothing is checked: see
    /// [`Repo::ensure_cluster`] for writers and `cluster::open_archive` for readers).
    pub fn new(repo: Repo, system_identifier: u64) -> Archive {
        Archive {
            repo,
            cluster: ClusterLayout::new(system_identifier),
        }
    }

    pub fn repo(&self) -> &Repo {
        &self.repo
    }

    /// The keys of this cluster's objects.
    pub fn layout(&self) -> &ClusterLayout {
        &self.cluster
    }

    pub fn system_identifier(&self) -> u64 {
        self.cluster.system_identifier
    }
}
