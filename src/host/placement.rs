//! Which cores the shards run on, and how tightly they are held there.
//!
//! `pinned` fixes each shard's thread to its own core (glommio
//! `Placement::Fixed`): the fastest shape on a dedicated host, because a
//! shard's caches and its NIC queue's interrupts stay on one core. `fenced`
//! lets every shard run on any listed core (`Placement::Fenced`), which is what
//! a cgroup cpuset under host pressure needs: the kernel may move a thread
//! instead of stalling it behind another.
//!
//! Both are checked at start against the cores this process may use
//! (`cpuset.rs`: the cgroup's cpuset, the affinity mask, the online cores), so
//! an operator learns about a wrong `--cores` before any traffic. With
//! `fenced`, `--cores` may be left out: the shards then take every allowed
//! core, one each.

use std::collections::BTreeSet;

use glommio::{CpuSet, Placement};
use serde::Deserialize;

use crate::host::config::ConfigError;
use crate::limits;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlacementMode {
    Pinned,
    Fenced,
}

impl PlacementMode {
    pub fn name(self) -> &'static str {
        match self {
            PlacementMode::Pinned => "pinned",
            PlacementMode::Fenced => "fenced",
        }
    }
}

/// Parses `0,1`, `0-3` or `0-1,4`: sorted, without repeats, never empty.
pub fn parse_core_list(text: &str) -> Result<Vec<usize>, ConfigError> {
    let invalid = || {
        ConfigError::new(format!(
            "--cores {text:?} must be a list of cores or ranges, e.g. 0,1 or 0-3"
        ))
    };
    let mut cores = BTreeSet::new();
    for part in text.split(',').map(str::trim) {
        let (first, last) = match part.split_once('-') {
            Some((first, last)) => (first.trim(), last.trim()),
            None => (part, part),
        };
        let first: usize = first.parse().map_err(|_| invalid())?;
        let last: usize = last.parse().map_err(|_| invalid())?;
        if first > last || last - first >= limits::SHARDS_MAX {
            return Err(invalid());
        }
        cores.extend(first..=last);
    }
    if cores.is_empty() {
        return Err(invalid());
    }
    Ok(cores.into_iter().collect())
}

/// The glommio placement of the shard that serves `core`.
pub fn placement_for(mode: PlacementMode, core: usize, cores: &[usize]) -> Result<Placement, ConfigError> {
    debug_assert!(cores.contains(&core));
    match mode {
        PlacementMode::Pinned => Ok(Placement::Fixed(core)),
        PlacementMode::Fenced => {
            let set = CpuSet::online()
                .map_err(|error| ConfigError::new(format!("cannot read the online cpus: {error}")))?
                .filter(|location| cores.contains(&location.cpu));
            assert!(!set.is_empty(), "the listed cores were checked to be online");
            Ok(Placement::Fenced(set))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lists, ranges and mixes parse to sorted unique cores; nonsense fails.
    #[test]
    fn core_lists() {
        assert_eq!(parse_core_list("0,1").unwrap(), vec![0, 1]);
        assert_eq!(parse_core_list("0-3").unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(parse_core_list("3, 0-1,1").unwrap(), vec![0, 1, 3]);
        for bad in ["", "a", "1-0", "0-", ",", "0-100000"] {
            assert!(parse_core_list(bad).is_err(), "{bad:?} should fail");
        }
    }
}
