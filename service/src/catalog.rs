//! The integrations of a folder: every pipeline file in it, validated, by pipeline name.
//!
//! [`Catalog::scan`] is both the first load and the watcher: it lists the folder, stats every
//! file, reads only the files whose size or modification time changed, and validates only
//! those whose content hash changed. A file whose new content fails `pipe validate` keeps its
//! previous valid version in the catalog (so the service keeps running it) and the error is
//! reported as a [`Change::Invalid`]; a file that disappears is a [`Change::Removed`].
//!
//! The watcher polls (the service calls `scan` once a second) instead of using inotify,
//! FSEvents or kqueue: polling works the same on every OS, inside containers, on bind mounts
//! and network file systems where change notifications are lost, needs no new dependency,
//! and a one-second delay is below the schedules' own resolution. A stat per file per second
//! is cheap even for thousands of files; content is hashed only when the stat changed.

use engine::plan::Plan;
use engine::step::Registry;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// How deep below the folder pipeline files are looked for.
const MAX_DEPTH: usize = 8;
/// The most files one folder may hold (a service pointed at `/` must not walk the disk).
pub const MAX_FILES: usize = 100_000;

/// One integration: the valid version of a pipeline file that the service runs.
#[derive(Clone)]
pub struct Integration {
    /// The pipeline's name (`pipeline:`), the integration's key.
    pub name: String,
    /// The file it was loaded from.
    pub file: PathBuf,
    /// SHA-256 (hex) of the file content of the version in use.
    pub hash: String,
    /// The validated plan of that version.
    pub plan: Arc<Plan>,
    /// The file's modification time when that version was read.
    pub modified: Option<SystemTime>,
    /// Why the file's latest content is not in use (it failed validation), if so.
    pub load_error: Option<String>,
    /// The plan's `schedule:` ready for fire times (parsed once per version, not per tick).
    pub spec: Option<scheduler::ScheduleSpec>,
    /// The text of that version as validated: what its runs keep in their folders (read
    /// once per version, not once per run).
    pub source: Arc<str>,
}

impl std::fmt::Debug for Integration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Integration")
            .field("name", &self.name)
            .field("file", &self.file)
            .field("hash", &self.hash)
            .field("load_error", &self.load_error)
            .finish()
    }
}

/// The integrations in use, as one version of the catalog.
pub type Snapshot = Arc<BTreeMap<String, Integration>>;

/// The latest [`Snapshot`], shared between a service's tasks: the folder watcher publishes
/// each new version, the others read whichever is the latest.
#[derive(Default)]
pub struct Live(std::sync::RwLock<Snapshot>);

impl Live {
    pub fn new(snapshot: Snapshot) -> Live {
        Live(std::sync::RwLock::new(snapshot))
    }
    pub fn get(&self) -> Snapshot {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub fn set(&self, snapshot: Snapshot) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = snapshot;
    }
}

/// What a scan found different from the previous one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new integration (a new file, or an invalid file that became valid).
    Added(String),
    /// A new valid version of an integration.
    Changed(String),
    /// A file's content failed validation. `name` is the integration that keeps its previous
    /// version, when the file had one.
    Invalid {
        file: PathBuf,
        name: Option<String>,
        error: String,
    },
    /// An integration's file was removed (or now declares another name).
    Removed(String),
}

/// What is known about one file between scans.
#[derive(Debug, Clone)]
struct FileState {
    len: u64,
    modified: Option<SystemTime>,
    /// The hash of the content last read (valid or not).
    hash: String,
    /// The integration this file provides (its last valid version), if any.
    name: Option<String>,
    /// The latest content's validation error.
    error: Option<String>,
}

/// The integrations of one folder.
pub struct Catalog {
    dir: PathBuf,
    registry: Registry,
    /// By path; hashed, not ordered: a `Path` compares component by component, which made
    /// ordered lookups of 10,000 files a second a twentieth of a busy server's CPU.
    files: HashMap<PathBuf, FileState>,
    integrations: BTreeMap<String, Integration>,
}

impl Catalog {
    /// An empty catalog of `dir`; call [`Catalog::scan`] to load it.
    pub fn new(dir: &Path, registry: Registry) -> Catalog {
        Catalog {
            dir: dir.to_path_buf(),
            registry,
            files: HashMap::new(),
            integrations: BTreeMap::new(),
        }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The integrations in use, by name.
    pub fn integrations(&self) -> &BTreeMap<String, Integration> {
        &self.integrations
    }

    /// One integration.
    pub fn get(&self, name: &str) -> Option<&Integration> {
        self.integrations.get(name)
    }

    /// Files whose latest content is invalid and that provide no integration, with the error.
    pub fn invalid_files(&self) -> Vec<(PathBuf, String)> {
        let mut out: Vec<(PathBuf, String)> = self
            .files
            .iter()
            .filter(|(_, s)| s.name.is_none())
            .filter_map(|(p, s)| s.error.clone().map(|e| (p.clone(), e)))
            .collect();
        out.sort();
        out
    }

    /// Look at the folder again; what changed since the last scan. An unreadable folder is
    /// an error (the catalog is left as it was: a folder on a network share that blinks
    /// away must not remove every integration).
    pub fn scan(&mut self) -> std::io::Result<Vec<Change>> {
        let mut found = Vec::new();
        list_files(&self.dir, 0, &mut found)?;
        // By bytes: the order changes are reported in, cheaper than by components.
        found.sort_by(|a, b| a.0.as_os_str().cmp(b.0.as_os_str()));
        let mut changes = Vec::new();
        let present: std::collections::HashSet<&Path> =
            found.iter().map(|(p, _)| p.as_path()).collect();

        // Removed files first, so a pipeline moved to another file is not a name clash.
        let mut gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !present.contains(p.as_path()))
            .cloned()
            .collect();
        gone.sort();
        drop(present);
        for path in gone {
            if let Some(state) = self.files.remove(&path) {
                if let Some(name) = state.name {
                    self.integrations.remove(&name);
                    changes.push(Change::Removed(name));
                }
            }
        }

        for (path, meta) in found {
            let len = meta.len();
            let modified = meta.modified().ok();
            if let Some(s) = self.files.get(&path) {
                if s.len == len && s.modified == modified && modified.is_some() {
                    continue;
                }
            }
            let Ok(bytes) = read_capped(&path) else {
                // Vanished or unreadable between the listing and the read: next scan.
                continue;
            };
            let hash = hex::encode(Sha256::digest(&bytes));
            if let Some(s) = self.files.get_mut(&path) {
                if s.hash == hash {
                    s.len = len;
                    s.modified = modified;
                    continue;
                }
            }
            changes.extend(self.load(&path, len, modified, hash));
        }
        Ok(changes)
    }

    /// Validate one file's new content and update the catalog.
    fn load(
        &mut self,
        path: &Path,
        len: u64,
        modified: Option<SystemTime>,
        hash: String,
    ) -> Vec<Change> {
        let display = path
            .strip_prefix(&self.dir)
            .unwrap_or(path)
            .display()
            .to_string();
        let (outcome, text) =
            engine::validate::validate_file_with_text(path, &display, &self.registry);
        let previous = self.files.get(path).and_then(|s| s.name.clone());
        let mut changes = Vec::new();
        let mut state = FileState {
            len,
            modified,
            hash: hash.clone(),
            name: previous.clone(),
            error: None,
        };
        let result = match outcome.plan.zip(text) {
            None => Err(outcome
                .diagnostics
                .iter()
                .filter(|d| d.severity == engine::diag::Severity::Error)
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("\n")),
            Some((plan, text)) => match self.integrations.get(&plan.name) {
                Some(other) if other.file != path => Err(format!(
                    "{display}: pipeline `{}` is already defined by {}",
                    plan.name,
                    other.file.display()
                )),
                _ => match scheduler::ScheduleSpec::from_plan(&plan) {
                    Ok(spec) => Ok((plan, spec, text)),
                    Err(e) => Err(format!("{display}: schedule: {e}")),
                },
            },
        };
        match result {
            Ok((plan, spec, text)) => {
                let name = plan.name.clone();
                if let Some(old) = previous.as_ref().filter(|old| **old != name) {
                    self.integrations.remove(old);
                    changes.push(Change::Removed(old.clone()));
                }
                let existed = self.integrations.contains_key(&name);
                self.integrations.insert(
                    name.clone(),
                    Integration {
                        name: name.clone(),
                        file: path.to_path_buf(),
                        hash,
                        plan: Arc::new(plan),
                        modified,
                        load_error: None,
                        spec,
                        source: text.into(),
                    },
                );
                state.name = Some(name.clone());
                changes.push(if existed {
                    Change::Changed(name)
                } else {
                    Change::Added(name)
                });
            }
            Err(error) => {
                let error = if error.trim().is_empty() {
                    format!("{display} is not a valid pipeline")
                } else {
                    error
                };
                if let Some(i) = previous.as_ref().and_then(|n| self.integrations.get_mut(n)) {
                    i.load_error = Some(error.clone());
                }
                state.error = Some(error.clone());
                changes.push(Change::Invalid {
                    file: path.to_path_buf(),
                    name: previous,
                    error,
                });
            }
        }
        self.files.insert(path.to_path_buf(), state);
        changes
    }
}

/// Is this a pipeline file by its name?
fn is_pipeline_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

/// Pipeline files below `dir` (hidden folders skipped), with their metadata.
fn list_files(
    dir: &Path,
    depth: usize,
    out: &mut Vec<(PathBuf, std::fs::Metadata)>,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let Ok(entry) = entry else { continue };
        let path = entry.path();
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            let hidden = entry.file_name().to_string_lossy().starts_with('.');
            if !hidden && depth + 1 < MAX_DEPTH {
                // A subfolder that cannot be read is skipped, not fatal.
                let _ = list_files(&path, depth + 1, out);
            }
        } else if meta.is_file() && is_pipeline_file(&path) {
            if out.len() >= MAX_FILES {
                return Err(std::io::Error::other(format!(
                    "{} holds more than {MAX_FILES} pipeline files",
                    dir.display()
                )));
            }
            out.push((path, meta));
        }
    }
    Ok(())
}

/// A file's bytes, at most the validator's limit (a bigger file is hashed by its head; the
/// validator reports it as too big).
fn read_capped(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(engine::validate::MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "pipeline: a\nsteps:\n  s: { type: log, with: { message: hi } }\n";

    fn registry() -> Registry {
        crate::test_support::registry()
    }

    fn touch_later(path: &Path) {
        // Make sure the modification time differs from the previous write.
        let t = std::fs::metadata(path).unwrap().modified().unwrap()
            + std::time::Duration::from_secs(2);
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(t).unwrap();
    }

    #[test]
    fn added_changed_invalid_kept_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, OK).unwrap();
        let mut c = Catalog::new(dir.path(), registry());
        assert_eq!(c.scan().unwrap(), vec![Change::Added("a".into())]);
        assert_eq!(c.scan().unwrap(), vec![]);
        let first_hash = c.get("a").unwrap().hash.clone();

        std::fs::write(&file, "pipeline: a\nsteps: [oops\n").unwrap();
        touch_later(&file);
        let changes = c.scan().unwrap();
        assert!(
            matches!(&changes[..], [Change::Invalid { name: Some(n), .. }] if n == "a"),
            "{changes:?}"
        );
        let kept = c.get("a").expect("the previous version is kept");
        assert_eq!(kept.hash, first_hash);
        assert!(kept.load_error.is_some());

        std::fs::write(&file, OK.replace("hi", "hello")).unwrap();
        touch_later(&file);
        assert_eq!(c.scan().unwrap(), vec![Change::Changed("a".into())]);
        assert!(c.get("a").unwrap().load_error.is_none());
        assert_ne!(c.get("a").unwrap().hash, first_hash);

        std::fs::remove_file(&file).unwrap();
        assert_eq!(c.scan().unwrap(), vec![Change::Removed("a".into())]);
        assert!(c.integrations().is_empty());
    }

    #[test]
    fn a_name_defined_twice_is_an_error_for_the_second_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), OK).unwrap();
        std::fs::write(dir.path().join("b.yml"), OK).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a pipeline").unwrap();
        let mut c = Catalog::new(dir.path(), registry());
        let changes = c.scan().unwrap();
        assert_eq!(changes[0], Change::Added("a".into()));
        assert!(
            matches!(&changes[1], Change::Invalid { name: None, error, .. } if error.contains("already defined")),
            "{changes:?}"
        );
        assert_eq!(c.invalid_files().len(), 1);
    }

    #[test]
    fn a_missing_folder_is_an_error_and_keeps_the_catalog() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("p");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("a.yaml"), OK).unwrap();
        let mut c = Catalog::new(&sub, registry());
        c.scan().unwrap();
        std::fs::remove_dir_all(&sub).unwrap();
        assert!(c.scan().is_err());
        assert!(c.get("a").is_some());
    }
}
