//! The cores this process may run on: its cgroup's cpuset, narrowed by its
//! affinity mask and by the cores that are online.
//!
//! Operators reserve the shard cores with a cgroup (`cgroups/`): a systemd
//! slice with `AllowedCPUs=` on cgroup v2, or a cpuset directory on v1. With
//! `--placement fenced` and no `--cores`, shardgate starts one shard per core
//! of that set, so the slice is the one place the cores are written down.
//!
//! The cpuset is read from the cgroup files rather than inferred from the
//! affinity mask alone because the mask can be narrower for reasons that have
//! nothing to do with the reservation (`taskset` in a wrapper script); both
//! are honoured, and the log says which source decided.
//!
//! Layout assumptions, the common ones: cgroup v1's cpuset hierarchy is
//! mounted at `/sys/fs/cgroup/cpuset`, the v2 hierarchy at `/sys/fs/cgroup`.
//! When neither file can be read, the affinity mask alone decides.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::host::config::ConfigError;
use crate::host::placement::parse_core_list;

/// Where the allowed set came from, for the startup log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A cgroup cpuset file, named.
    Cgroup(PathBuf),
    /// No cpuset file was readable: the affinity mask alone.
    AffinityOnly,
}

/// The cores this process may use, sorted, never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    pub cores: Vec<usize>,
    pub source: Source,
}

/// Reads the real host: `/proc/self/cgroup`, the cpuset under `/sys`, the
/// affinity mask and the online cores.
pub fn allowed() -> Result<Allowed, ConfigError> {
    let affinity = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map_err(|error| ConfigError::new(format!("cannot read the cpu affinity mask: {error}")))?;
    let online: BTreeSet<usize> = glommio::CpuSet::online()
        .map_err(|error| ConfigError::new(format!("cannot read the online cpus: {error}")))?
        .into_iter()
        .map(|location| location.cpu)
        .collect();
    let usable: BTreeSet<usize> = online
        .into_iter()
        .filter(|&cpu| affinity.is_set(cpu).unwrap_or(false))
        .collect();
    let proc_self_cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    allowed_in(Path::new("/sys"), &proc_self_cgroup, &usable)
}

/// The pure part of [`allowed`]: `usable` is online ∩ affinity; the cgroup's
/// cpuset, when one of its files under `sys_root` can be read, narrows it.
pub fn allowed_in(sys_root: &Path, proc_self_cgroup: &str, usable: &BTreeSet<usize>) -> Result<Allowed, ConfigError> {
    let found = cpuset_files(sys_root, proc_self_cgroup)
        .into_iter()
        .find_map(|path| std::fs::read_to_string(&path).ok().map(|text| (path, text)));
    let (cores, source) = match found {
        Some((path, text)) => {
            let cpuset = parse_core_list(text.trim()).map_err(|_| {
                ConfigError::new(format!(
                    "cannot parse the cgroup cpuset {}: {:?}",
                    path.display(),
                    text.trim()
                ))
            })?;
            let cores = cpuset.into_iter().filter(|core| usable.contains(core)).collect();
            (cores, Source::Cgroup(path))
        }
        None => (usable.iter().copied().collect(), Source::AffinityOnly),
    };
    let allowed = Allowed { cores, source };
    if allowed.cores.is_empty() {
        return Err(ConfigError::new(format!(
            "no core is both in {} and in this process's affinity mask",
            allowed.source_name()
        )));
    }
    Ok(allowed)
}

impl Allowed {
    /// Fails, naming the allowed set and where it came from, unless every
    /// listed core is in it.
    pub fn check(&self, cores: &[usize]) -> Result<(), ConfigError> {
        match cores.iter().find(|core| !self.cores.contains(core)) {
            None => Ok(()),
            Some(core) => Err(ConfigError::new(format!(
                "core {core} is not available to this process: the allowed cores are {} (from {})",
                self.cores_text(),
                self.source_name()
            ))),
        }
    }

    pub fn source_name(&self) -> String {
        match &self.source {
            Source::Cgroup(path) => format!("the cgroup cpuset {}", path.display()),
            Source::AffinityOnly => "the affinity mask (no cgroup cpuset file was readable)".into(),
        }
    }

    pub fn cores_text(&self) -> String {
        let cores: Vec<String> = self.cores.iter().map(usize::to_string).collect();
        cores.join(",")
    }
}

/// The cpuset files to try, most specific first: the v1 cpuset controller's
/// directory if the process has one, else the v2 group and its ancestors
/// (a v2 group without the cpuset controller enabled has no such file; its
/// nearest ancestor that has one bounds it).
fn cpuset_files(sys_root: &Path, proc_self_cgroup: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for line in proc_self_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if controllers.split(',').any(|controller| controller == "cpuset") {
            let directory = join(&sys_root.join("fs/cgroup/cpuset"), path);
            files.push(directory.join("cpuset.effective_cpus"));
            files.push(directory.join("cpuset.cpus"));
            return files;
        }
    }
    let unified = proc_self_cgroup.lines().find_map(|line| line.strip_prefix("0::"));
    if let Some(path) = unified {
        let mut directory = Some(join(&sys_root.join("fs/cgroup"), path));
        let top = sys_root.join("fs/cgroup");
        while let Some(current) = directory {
            files.push(current.join("cpuset.cpus.effective"));
            directory = (current != top)
                .then(|| current.parent().map(Path::to_path_buf))
                .flatten();
        }
    }
    files
}

/// `root` joined with an absolute cgroup path, which must stay under `root`.
fn join(root: &Path, cgroup_path: &str) -> PathBuf {
    let relative = cgroup_path.trim_start_matches('/');
    let mut joined = root.to_path_buf();
    for part in relative.split('/').filter(|part| !part.is_empty() && *part != "..") {
        joined.push(part);
    }
    joined
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usable(cores: &[usize]) -> BTreeSet<usize> {
        cores.iter().copied().collect()
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// cgroup v1 (this CI machine's layout): the cpuset controller's own line decides.
    #[test]
    fn v1_cpuset_is_read() {
        let root = tempfile::tempdir().unwrap();
        write(
            &root.path().join("fs/cgroup/cpuset/shardgate/cpuset.effective_cpus"),
            "2-3,6\n",
        );
        let cgroup = "4:memory:/other\n3:cpuset:/shardgate\n0::/\n";
        let allowed = allowed_in(root.path(), cgroup, &usable(&[0, 1, 2, 3, 4, 5, 6, 7])).unwrap();
        assert_eq!(allowed.cores, vec![2, 3, 6]);
        assert!(
            matches!(allowed.source, Source::Cgroup(ref path) if path.ends_with("shardgate/cpuset.effective_cpus"))
        );
    }

    /// cgroup v2: the slice's effective set, narrowed by the affinity mask.
    #[test]
    fn v2_cpuset_is_narrowed_by_affinity() {
        let root = tempfile::tempdir().unwrap();
        let slice = "fs/cgroup/shardgate.slice/shardgate.service";
        write(&root.path().join(slice).join("cpuset.cpus.effective"), "2-7\n");
        let allowed = allowed_in(
            root.path(),
            "0::/shardgate.slice/shardgate.service\n",
            &usable(&[0, 1, 2, 3]),
        )
        .unwrap();
        assert_eq!(allowed.cores, vec![2, 3]);
    }

    /// A v2 group without the cpuset file is bounded by its nearest ancestor's.
    #[test]
    fn v2_falls_back_to_an_ancestor() {
        let root = tempfile::tempdir().unwrap();
        write(
            &root.path().join("fs/cgroup/shardgate.slice/cpuset.cpus.effective"),
            "1\n",
        );
        let allowed = allowed_in(root.path(), "0::/shardgate.slice/shardgate.service\n", &usable(&[0, 1])).unwrap();
        assert_eq!(allowed.cores, vec![1]);
    }

    /// No cpuset file anywhere: the affinity mask alone decides, and says so.
    #[test]
    fn no_cgroup_means_affinity_only() {
        let root = tempfile::tempdir().unwrap();
        let allowed = allowed_in(root.path(), "0::/\n", &usable(&[0, 1])).unwrap();
        assert_eq!(
            allowed,
            Allowed {
                cores: vec![0, 1],
                source: Source::AffinityOnly
            }
        );
    }

    /// A cpuset and a mask with nothing in common is an error, not zero shards.
    #[test]
    fn disjoint_sets_are_refused() {
        let root = tempfile::tempdir().unwrap();
        write(&root.path().join("fs/cgroup/cpuset.cpus.effective"), "4-5\n");
        let error = allowed_in(root.path(), "0::/\n", &usable(&[0, 1])).unwrap_err();
        assert!(error.to_string().contains("no core"), "{error}");
    }

    /// A listed core outside the set is named, with the set and its source.
    #[test]
    fn check_names_the_core_and_the_set() {
        let allowed = Allowed {
            cores: vec![2, 3],
            source: Source::Cgroup("/x/cpuset.cpus".into()),
        };
        assert!(allowed.check(&[2, 3]).is_ok());
        let error = allowed.check(&[1, 2]).unwrap_err().to_string();
        assert!(
            error.contains("core 1") && error.contains("2,3") && error.contains("/x/cpuset.cpus"),
            "{error}"
        );
    }

    /// A cgroup path cannot climb out of the cgroup root.
    #[test]
    fn cgroup_paths_stay_under_the_root() {
        assert_eq!(
            join(Path::new("/sys/fs/cgroup"), "/../../etc"),
            PathBuf::from("/sys/fs/cgroup/etc")
        );
    }
}
