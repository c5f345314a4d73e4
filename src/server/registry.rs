//! Which adapter names the server knows and where their folders are: the `--adapter NAME=DIR`
//! ones, those loaded at run time (`POST /v1/adapters`), and every folder of `--adapters-dir`
//! (found on first use, so the directory may hold thousands). Whether an adapter sits in the
//! device prefix table is the engine's business; this is the catalogue.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The adapter catalogue.
#[derive(Debug, Default)]
pub struct Registry {
    named: BTreeMap<String, PathBuf>,
    dir: Option<PathBuf>,
    /// `--adapters-dir` entries unloaded with `DELETE` (hidden until loaded again).
    hidden: BTreeSet<String>,
}

/// Whether `name` can name an adapter: 1 to 256 characters, no path separator, no control
/// character, not `.` or `..` (a name is also a folder name in `--adapters-dir`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.chars().count() <= 256
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && !name.chars().any(char::is_control)
}

impl Registry {
    /// A catalogue over `dir` (if any), with no named adapter yet.
    pub fn new(dir: Option<PathBuf>) -> Registry {
        Registry {
            dir,
            ..Registry::default()
        }
    }

    /// The folder of adapter `name`, if the catalogue has it.
    pub fn resolve(&self, name: &str) -> Option<PathBuf> {
        if let Some(p) = self.named.get(name) {
            return Some(p.clone());
        }
        if self.hidden.contains(name) || !valid_name(name) {
            return None;
        }
        let dir = self.dir.as_ref()?.join(name);
        dir.join("adapter_config.json").is_file().then_some(dir)
    }

    /// Every adapter name, sorted: the named ones and the folders of the adapters directory
    /// that hold an `adapter_config.json`.
    pub fn names(&self) -> Vec<String> {
        let mut all: BTreeSet<String> = self.named.keys().cloned().collect();
        if let Some(dir) = &self.dir {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    let Ok(name) = e.file_name().into_string() else {
                        continue;
                    };
                    if valid_name(&name)
                        && !self.hidden.contains(&name)
                        && e.path().join("adapter_config.json").is_file()
                    {
                        all.insert(name);
                    }
                }
            }
        }
        all.into_iter().collect()
    }

    /// Adds (or re-adds) `name` at `dir`.
    pub fn insert(&mut self, name: &str, dir: &Path) {
        self.hidden.remove(name);
        self.named.insert(name.to_string(), dir.to_path_buf());
    }

    /// Removes `name`; returns whether it was known.
    pub fn remove(&mut self, name: &str) -> bool {
        let known = self.resolve(name).is_some();
        self.named.remove(name);
        if known {
            self.hidden.insert(name.to_string());
        }
        known
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_leave_the_directory_are_refused() {
        for bad in ["", ".", "..", "a/b", "..\\x", "a\nb", &"x".repeat(257)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        for good in ["task-1", "my.adapter", "ü", "a b"] {
            assert!(valid_name(good), "{good:?}");
        }
    }

    #[test]
    fn directory_entries_are_found_hidden_and_restored() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["a", "b"] {
            std::fs::create_dir(dir.path().join(n)).unwrap();
            std::fs::write(dir.path().join(n).join("adapter_config.json"), "{}").unwrap();
        }
        std::fs::create_dir(dir.path().join("not-an-adapter")).unwrap();
        let mut r = Registry::new(Some(dir.path().to_path_buf()));
        r.insert("x", Path::new("/elsewhere"));
        assert_eq!(r.names(), ["a", "b", "x"]);
        assert_eq!(r.resolve("a"), Some(dir.path().join("a")));
        assert_eq!(r.resolve("not-an-adapter"), None);
        assert_eq!(r.resolve("../a"), None);
        assert!(r.remove("a"));
        assert!(!r.remove("a"));
        assert_eq!(r.resolve("a"), None);
        assert_eq!(r.names(), ["b", "x"]);
        r.insert("a", &dir.path().join("b"));
        assert_eq!(r.resolve("a"), Some(dir.path().join("b")));
        assert!(r.remove("x"));
        assert_eq!(r.names(), ["a", "b"]);
    }
}
