//! Asynchronous prefetch of spilled pages: a background thread reads page records ahead of use.
//!
//! Owns: [`Prefetcher`] (the thread, its queue, and the buffer of pages read ahead, bounded in
//! bytes) and [`DiskStats`]. A page is keyed by where its record lives (store, segment, offset),
//! so a read-ahead copy can never stand in for another page. A reader of a spilled page takes the
//! buffered copy when there is one, waits for it when its read is in flight (and records how long),
//! and reads synchronously otherwise. Must never: hand out a page that failed its check (failed
//! read-aheads are dropped; the synchronous read then reports the typed error), or grow the buffer
//! past its bound (read-aheads that do not fit are dropped).

use super::disk::{read_record, DiskRef};
use crate::backend::PageBytes;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// Where a record lives: (store tag, segment, offset).
pub type Key = (u8, u32, u64);

/// One read to do ahead of use.
pub struct Job {
    pub key: Key,
    pub file: Arc<File>,
    pub path: PathBuf,
    pub at: DiskRef,
    pub cache_id: u64,
    pub page_id: u32,
    pub layer: u32,
}

/// Counters of disk reads, cumulative over the cache's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Page reads requested of the prefetch thread, and how many it completed into the buffer.
    pub prefetch_requested: u64,
    pub prefetched: u64,
    /// Reads of spilled pages served from the buffer (without waiting / after waiting for a read
    /// in flight) and read synchronously.
    pub hits: u64,
    pub waited: u64,
    pub misses: u64,
    /// Total time readers waited for reads in flight, and for synchronous reads, in ns.
    pub wait_ns: u64,
    pub sync_read_ns: u64,
}

/// What reading spilled pages cost one call (a decode step's [`crate::Attention::disk`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStep {
    /// Spilled pages read, and their record bytes.
    pub pages: u32,
    pub bytes: u64,
    /// Of those: served from the read-ahead buffer, after waiting for a read in flight, and read
    /// synchronously.
    pub hits: u32,
    pub waited: u32,
    pub sync_reads: u32,
    /// Time the call spent waiting for disk bytes: reads in flight plus synchronous reads, in ns.
    pub wait_ns: u64,
}

impl DiskStep {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &DiskStep) {
        self.pages += other.pages;
        self.bytes += other.bytes;
        self.hits += other.hits;
        self.waited += other.waited;
        self.sync_reads += other.sync_reads;
        self.wait_ns += other.wait_ns;
    }
}

#[derive(Default)]
struct State {
    ready: HashMap<Key, PageBytes>,
    pending: HashSet<Key>,
    /// Reads in flight whose page was removed or moved since: their result is dropped.
    cancelled: HashSet<Key>,
    bytes: usize,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    cap: usize,
    requested: AtomicU64,
    prefetched: AtomicU64,
    hits: AtomicU64,
    waited: AtomicU64,
    misses: AtomicU64,
    wait_ns: AtomicU64,
    sync_ns: AtomicU64,
}

/// The prefetch thread of one cache and its read-ahead buffer.
pub struct Prefetcher {
    tx: Option<mpsc::Sender<Job>>,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prefetcher {
    /// Starts the thread; the buffer holds at most `cap` payload bytes.
    pub fn new(cap: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            cap,
            requested: AtomicU64::new(0),
            prefetched: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            waited: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            wait_ns: AtomicU64::new(0),
            sync_ns: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel::<Job>();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kvtier-prefetch".into())
            .spawn(move || {
                for job in rx {
                    let got = read_record(
                        &job.file,
                        &job.path,
                        &job.at,
                        job.cache_id,
                        job.page_id,
                        job.layer,
                    );
                    let mut st = sh.state.lock().unwrap_or_else(|p| p.into_inner());
                    st.pending.remove(&job.key);
                    let cancelled = st.cancelled.remove(&job.key);
                    if let (Ok(p), false) = (got, cancelled) {
                        let b = p.bytes();
                        if st.bytes + b <= sh.cap && !st.ready.contains_key(&job.key) {
                            st.bytes += b;
                            st.ready.insert(job.key, p);
                            sh.prefetched.fetch_add(1, Relaxed);
                        }
                    }
                    drop(st);
                    sh.cv.notify_all();
                }
            })?;
        Ok(Prefetcher {
            tx: Some(tx),
            shared,
            thread: Some(thread),
        })
    }

    /// Queues `job` unless its page is already buffered or in flight.
    pub fn request(&self, job: Job) {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.ready.contains_key(&job.key) || !st.pending.insert(job.key) {
            return;
        }
        // A key is never reused (segments only grow), but keep a re-request of it honest.
        st.cancelled.remove(&job.key);
        drop(st);
        self.shared.requested.fetch_add(1, Relaxed);
        let key = job.key;
        if self.tx.as_ref().is_none_or(|tx| tx.send(job).is_err()) {
            let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
            st.pending.remove(&key);
        }
    }

    /// The page at `key`: the buffered copy (taken out of the buffer), after waiting for its read
    /// when one is in flight; else `read()` now. What it cost is added to `step`.
    pub fn take_or_read<E>(
        &self,
        key: Key,
        step: &mut DiskStep,
        read: impl FnOnce() -> Result<PageBytes, E>,
    ) -> Result<PageBytes, E> {
        let sh = &self.shared;
        let mut st = sh.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.pending.contains(&key) {
            let t = Instant::now();
            while st.pending.contains(&key) {
                st = sh.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            let ns = t.elapsed().as_nanos() as u64;
            sh.wait_ns.fetch_add(ns, Relaxed);
            step.wait_ns += ns;
            if st.ready.contains_key(&key) {
                sh.waited.fetch_add(1, Relaxed);
                step.waited += 1;
            }
        } else if st.ready.contains_key(&key) {
            sh.hits.fetch_add(1, Relaxed);
            step.hits += 1;
        }
        if let Some(p) = st.ready.remove(&key) {
            st.bytes -= p.bytes();
            return Ok(p);
        }
        drop(st);
        sh.misses.fetch_add(1, Relaxed);
        step.sync_reads += 1;
        let t = Instant::now();
        let r = read();
        let ns = t.elapsed().as_nanos() as u64;
        sh.sync_ns.fetch_add(ns, Relaxed);
        step.wait_ns += ns;
        r
    }

    /// Drops the buffered copy of `key`, or the result of its read in flight (its page was
    /// removed or moved).
    pub fn forget(&self, key: Key) {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = st.ready.remove(&key) {
            st.bytes -= p.bytes();
        }
        if st.pending.contains(&key) {
            st.cancelled.insert(key);
        }
    }

    /// Payload bytes in the read-ahead buffer.
    pub fn buffered_bytes(&self) -> usize {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .bytes
    }

    /// The counters so far.
    pub fn stats(&self) -> DiskStats {
        let s = &self.shared;
        DiskStats {
            prefetch_requested: s.requested.load(Relaxed),
            prefetched: s.prefetched.load(Relaxed),
            hits: s.hits.load(Relaxed),
            waited: s.waited.load(Relaxed),
            misses: s.misses.load(Relaxed),
            wait_ns: s.wait_ns.load(Relaxed),
            sync_read_ns: s.sync_ns.load(Relaxed),
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Closing the queue ends the thread after its current read.
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
