//! Content-addressed page stores: where exact pages of shared prefixes live so that another cache
//! (in this process, another process, or another machine) can import them instead of prefilling.
//!
//! Owns: the [`ColdStore`] trait (batched put / get / exists by key), [`MemoryStore`] (host RAM,
//! LRU within a byte budget) and [`DirStore`] (one checked file per key in a directory); the
//! remote store is `cold::redis::RedisStore` (feature `redis`). Must never: interpret the bytes
//! it keeps (records are encoded and checked by `cold::disk::{encode, decode}` in
//! `crate::prefix`), or accept a key outside [`check_key`]'s alphabet (keys become file names and
//! server keys).
//!
//! A store is shared (`&self`, `Send + Sync`): every method may be called from several threads.
//! A missing key is not an error (`None` / `false`): stores may evict. Errors are
//! [`Error::Remote`] (network, server, I/O of the directory), with no secrets in their text.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// The longest key a store accepts.
pub const MAX_KEY: usize = 200;

/// Keys are `[A-Za-z0-9:_-]`, 1 to [`MAX_KEY`] bytes: safe as file names and as server keys.
pub fn check_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key.len() <= MAX_KEY
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'))
        && !key.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::Remote {
            op: "key",
            reason: format!(
                "a key of {} bytes outside [A-Za-z0-9:_-]{{1,{MAX_KEY}}}",
                key.len()
            ),
        })
    }
}

pub(crate) fn check_keys<'a>(keys: impl IntoIterator<Item = &'a str>) -> Result<()> {
    keys.into_iter().try_for_each(check_key)
}

/// A content-addressed store of page records.
pub trait ColdStore: Send + Sync {
    /// A short description for reports and errors (never a credential).
    fn describe(&self) -> String;
    /// Stores every `(key, record)`; an existing key is overwritten (same key, same content).
    fn put_many(&self, items: &[(String, Vec<u8>)]) -> Result<()>;
    /// The record of each key, `None` where the store has none.
    fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>>;
    /// Whether each key is present (cheaper than [`ColdStore::get_many`] on remote stores).
    fn exists_many(&self, keys: &[String]) -> Result<Vec<bool>> {
        Ok(self
            .get_many(keys)?
            .into_iter()
            .map(|r| r.is_some())
            .collect())
    }
}

/// Records by key, least recently used first, and the bytes they hold (keys included).
type Lru = (lru::LruCache<String, Vec<u8>>, usize);

/// Host RAM, least recently used records dropped past `budget_bytes`.
pub struct MemoryStore {
    inner: Mutex<Lru>,
    budget: usize,
}

impl MemoryStore {
    /// A store holding at most `budget_bytes` of records (keys included).
    pub fn new(budget_bytes: usize) -> Self {
        MemoryStore {
            inner: Mutex::new((lru::LruCache::unbounded(), 0)),
            budget: budget_bytes,
        }
    }

    /// Bytes held (records and keys).
    pub fn bytes(&self) -> usize {
        self.inner.lock().map_or(0, |g| g.1)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Lru>> {
        self.inner
            .lock()
            .map_err(|_| Error::internal("memory store lock poisoned"))
    }
}

impl ColdStore for MemoryStore {
    fn describe(&self) -> String {
        format!("host memory (budget {} bytes)", self.budget)
    }

    fn put_many(&self, items: &[(String, Vec<u8>)]) -> Result<()> {
        check_keys(items.iter().map(|(k, _)| k.as_str()))?;
        let mut g = self.lock()?;
        for (k, v) in items {
            let size = k.len() + v.len();
            if size > self.budget {
                continue;
            }
            if let Some(old) = g.0.put(k.clone(), v.clone()) {
                g.1 -= k.len() + old.len();
            }
            g.1 += size;
            while g.1 > self.budget {
                match g.0.pop_lru() {
                    Some((ok, ov)) => g.1 -= ok.len() + ov.len(),
                    None => break,
                }
            }
        }
        Ok(())
    }

    fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
        check_keys(keys.iter().map(String::as_str))?;
        let mut g = self.lock()?;
        Ok(keys.iter().map(|k| g.0.get(k).cloned()).collect())
    }

    fn exists_many(&self, keys: &[String]) -> Result<Vec<bool>> {
        check_keys(keys.iter().map(String::as_str))?;
        let g = self.lock()?;
        Ok(keys.iter().map(|k| g.0.contains(k)).collect())
    }
}

/// One file per key (`<dir>/<key with ':' as '_'>.kvr`, mode 0600), written to a temporary name
/// and renamed, so a reader sees a whole record or none. Shared by processes on one machine (or a
/// network file system).
pub struct DirStore {
    dir: PathBuf,
}

fn io_err(op: &'static str, path: &Path, e: std::io::Error) -> Error {
    Error::Remote {
        op,
        reason: format!("{}: {e}", path.display()),
    }
}

impl DirStore {
    /// A store in `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| io_err("open", &dir, e))?;
        Ok(DirStore { dir })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{}.kvr", key.replace(':', "_")))
    }
}

impl ColdStore for DirStore {
    fn describe(&self) -> String {
        format!("directory {}", self.dir.display())
    }

    fn put_many(&self, items: &[(String, Vec<u8>)]) -> Result<()> {
        use std::io::Write;
        check_keys(items.iter().map(|(k, _)| k.as_str()))?;
        for (k, v) in items {
            let path = self.path(k);
            let tmp = self.dir.join(format!(
                ".{}.{}.tmp",
                k.replace(':', "_"),
                std::process::id()
            ));
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let res = opts
                .open(&tmp)
                .and_then(|mut f| f.write_all(v))
                .and_then(|_| std::fs::rename(&tmp, &path));
            if let Err(e) = res {
                let _ = std::fs::remove_file(&tmp);
                return Err(io_err("put", &path, e));
            }
        }
        Ok(())
    }

    fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
        check_keys(keys.iter().map(String::as_str))?;
        keys.iter()
            .map(|k| {
                let path = self.path(k);
                match std::fs::read(&path) {
                    Ok(b) => Ok(Some(b)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(io_err("get", &path, e)),
                }
            })
            .collect()
    }

    fn exists_many(&self, keys: &[String]) -> Result<Vec<bool>> {
        check_keys(keys.iter().map(String::as_str))?;
        Ok(keys.iter().map(|k| self.path(k).is_file()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_outside_the_alphabet_are_refused() {
        for bad in [
            "",
            "a b",
            "../x",
            "a/b",
            "-x",
            "é",
            &"k".repeat(MAX_KEY + 1),
        ] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
        check_key("kvtier:prod-1:p1:00ff").unwrap();
        let s = MemoryStore::new(1 << 20);
        assert!(s.put_many(&[("a/b".into(), vec![1])]).is_err());
        assert!(s.get_many(&["../etc".into()]).is_err());
    }

    #[test]
    fn memory_store_keeps_its_budget() {
        let s = MemoryStore::new(100);
        for i in 0..10 {
            s.put_many(&[(format!("k{i}"), vec![0u8; 30])]).unwrap();
        }
        assert!(s.bytes() <= 100);
        let got = s.get_many(&["k9".into(), "k0".into()]).unwrap();
        assert!(got[0].is_some(), "the newest record stays");
        assert!(got[1].is_none(), "the oldest is dropped");
        // A record larger than the budget is not kept (and evicts nothing).
        s.put_many(&[("big".into(), vec![0u8; 500])]).unwrap();
        assert_eq!(
            s.exists_many(&["big".into(), "k9".into()]).unwrap(),
            vec![false, true]
        );
    }

    #[test]
    fn dir_store_round_trips_and_reports_absence() {
        let dir = std::env::temp_dir().join(format!("kvtier-dirstore-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = DirStore::new(&dir).unwrap();
        s.put_many(&[("ns:a".into(), vec![1, 2, 3])]).unwrap();
        assert_eq!(
            s.get_many(&["ns:a".into(), "ns:b".into()]).unwrap(),
            vec![Some(vec![1, 2, 3]), None]
        );
        assert_eq!(s.exists_many(&["ns:a".into()]).unwrap(), vec![true]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("ns_a.kvr"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
