//! The remote page store: Redis or Valkey through the `redis` crate (feature `redis`).
//!
//! Owns: [`RedisStore`] (a small pool of connections, each with connect / read / write timeouts;
//! every batch one pipeline), [`RedisOptions`], and the redaction of credentials from everything it
//! reports. Must never: wait on the network without a timeout, put a password or a full URL into
//! an error or `describe`, or retry a write it cannot prove idempotent (all writes are `SET` of
//! a content-addressed key, so a retried batch is harmless; every call is retried once on a fresh
//! connection after a dropped one, which also covers a server restart). Every call returns within
//! `connect_timeout + io_timeout`.
//!
//! AUTH: `redis://user:password@host:port/db` (or `redis://:password@...`). TLS: `rediss://...`
//! (rustls, verifying the server against the webpki roots or [`RedisOptions::ca_pem`], a private
//! CA; certificate checks cannot be switched off).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::{Client, Connection, RedisResult};

use super::store::{check_keys, ColdStore};
use crate::error::{Error, Result};

/// Timeouts, limits and TLS trust of a [`RedisStore`].
#[derive(Debug, Clone, PartialEq)]
pub struct RedisOptions {
    /// Connecting (TCP, TLS, AUTH).
    pub connect_timeout: Duration,
    /// Each read or write of a pipeline; a slower server is an error, not a wait.
    pub io_timeout: Duration,
    /// Idle connections kept.
    pub pool: usize,
    /// Records expire after this long on the server (`SET .. EX`); `None`: they live until the
    /// server's maxmemory policy evicts them.
    pub ttl: Option<Duration>,
    /// `rediss://` only: trust this CA (PEM) instead of the webpki roots (a private CA).
    pub ca_pem: Option<Vec<u8>>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            connect_timeout: Duration::from_secs(2),
            io_timeout: Duration::from_secs(2),
            pool: 4,
            ttl: None,
            ca_pem: None,
        }
    }
}

/// Pages in a Redis / Valkey server (or cluster proxy) shared by every node that connects.
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    /// `host:port` only: what errors and reports may show.
    target: String,
    opts: RedisOptions,
    idle: Mutex<Vec<Connection>>,
}

/// `host:port` of a URL, without user, password, path or query.
fn redact(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    rest.split(['/', '?', '#']).next().unwrap_or("").to_string()
}

fn remote(op: &'static str, target: &str, e: redis::RedisError) -> Error {
    // The crate's error text names the failure (refused, timed out, auth failed, server reply);
    // it does not carry the URL or its password.
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connection_refusal() {
        "connection refused"
    } else if e.is_connection_dropped() || e.is_io_error() {
        "connection lost"
    } else {
        "server error"
    };
    Error::Remote {
        op,
        reason: format!(
            "redis {target}: {kind}: {}",
            e.detail().unwrap_or(e.category())
        ),
    }
}

impl Inner {
    fn fresh(&self) -> RedisResult<Connection> {
        let c = self
            .client
            .get_connection_with_timeout(self.opts.connect_timeout)?;
        c.set_read_timeout(Some(self.opts.io_timeout))?;
        c.set_write_timeout(Some(self.opts.io_timeout))?;
        Ok(c)
    }

    /// `f` on a pooled (or new) connection; after a dropped connection (a killed client, a
    /// restarted server) once more on a new one. A timeout is not retried (the server is slow:
    /// waiting again would double the stall).
    fn run<T>(&self, f: &dyn Fn(&mut Connection) -> RedisResult<T>) -> RedisResult<T> {
        let pooled = self.idle.lock().ok().and_then(|mut v| v.pop());
        let mut c = match pooled {
            Some(c) => c,
            None => self.fresh()?,
        };
        let r = match f(&mut c) {
            Err(e)
                if !e.is_timeout()
                    && (e.is_connection_dropped()
                        || e.is_io_error()
                        || e.is_connection_refusal()) =>
            {
                if let Ok(mut v) = self.idle.lock() {
                    v.clear();
                }
                c = self.fresh()?;
                f(&mut c)
            }
            r => r,
        };
        if r.is_ok() {
            if let Ok(mut v) = self.idle.lock() {
                if v.len() < self.opts.pool {
                    v.push(c);
                }
            }
        }
        r
    }
}

impl RedisStore {
    /// A store on the server at `url` (`redis://` or `rediss://`, see the module docs). Connects
    /// once now, so a wrong address or password is reported here.
    pub fn connect(url: &str, opts: RedisOptions) -> Result<Self> {
        let target = redact(url);
        if opts.connect_timeout.is_zero() || opts.io_timeout.is_zero() {
            return Err(Error::config("redis timeouts", "must be positive"));
        }
        if url.starts_with("rediss://") {
            // Another component may have installed a provider already; either one serves.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = match &opts.ca_pem {
            Some(pem) if url.starts_with("rediss://") => Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            ),
            Some(_) => {
                return Err(Error::config(
                    "redis ca_pem",
                    "a CA certificate needs a rediss:// (TLS) URL",
                ))
            }
            None => Client::open(url),
        }
        .map_err(|e| Error::Remote {
            op: "connect",
            reason: format!("redis {target}: bad URL or TLS settings ({})", e.category()),
        })?;
        let s = RedisStore {
            inner: Arc::new(Inner {
                client,
                target,
                opts,
                idle: Mutex::new(Vec::new()),
            }),
        };
        s.with("connect", |c| redis::cmd("PING").query::<String>(c))?;
        Ok(s)
    }

    /// Runs `f` on a helper thread and waits at most `connect_timeout + io_timeout` for it: the
    /// crate bounds each socket read, but a pipeline reads every reply (N replies can take N
    /// timeouts) and a connection's setup commands are not bounded at all. A late call is
    /// abandoned (the thread finishes on its own and drops its connection).
    fn with<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl Fn(&mut Connection) -> RedisResult<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("kvtier-redis".into())
            .spawn(move || {
                let _ = tx.send(inner.run(&f));
            })
            .map_err(|e| Error::Remote {
                op,
                reason: format!("cannot start a thread: {e}"),
            })?;
        let limit = self.inner.opts.connect_timeout + self.inner.opts.io_timeout;
        match rx.recv_timeout(limit) {
            Ok(r) => r.map_err(|e| remote(op, &self.inner.target, e)),
            Err(_) => Err(Error::Remote {
                op,
                reason: format!(
                    "redis {}: timed out: no reply within {limit:?}",
                    self.inner.target
                ),
            }),
        }
    }
}

impl ColdStore for RedisStore {
    fn describe(&self) -> String {
        format!("redis {}", self.inner.target)
    }

    fn put_many(&self, items: &[(String, Vec<u8>)]) -> Result<()> {
        check_keys(items.iter().map(|(k, _)| k.as_str()))?;
        if items.is_empty() {
            return Ok(());
        }
        // The helper thread owns what it sends (the publisher calls this off the decode path).
        let items: Vec<(String, Vec<u8>)> = items.to_vec();
        let ttl = self.inner.opts.ttl;
        self.with("put", move |c| {
            let mut p = redis::pipe();
            for (k, v) in &items {
                match ttl {
                    Some(t) => p
                        .cmd("SET")
                        .arg(k)
                        .arg(v.as_slice())
                        .arg("EX")
                        .arg(t.as_secs().max(1)),
                    None => p.cmd("SET").arg(k).arg(v.as_slice()),
                };
                p.ignore();
            }
            p.query::<()>(c)
        })
    }

    fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
        check_keys(keys.iter().map(String::as_str))?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let keys = keys.to_vec();
        self.with("get", move |c| {
            let mut p = redis::pipe();
            for k in &keys {
                p.cmd("GET").arg(k);
            }
            p.query::<Vec<Option<Vec<u8>>>>(c)
        })
    }

    fn exists_many(&self, keys: &[String]) -> Result<Vec<bool>> {
        check_keys(keys.iter().map(String::as_str))?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let keys = keys.to_vec();
        self.with("exists", move |c| {
            let mut p = redis::pipe();
            for k in &keys {
                p.cmd("EXISTS").arg(k);
            }
            p.query::<Vec<bool>>(c)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn urls_are_redacted_to_host_and_port() {
        assert_eq!(
            redact("redis://user:s3cret@db.example:6380/2"),
            "db.example:6380"
        );
        assert_eq!(
            redact("rediss://:pw@10.0.0.1:6379#insecure"),
            "10.0.0.1:6379"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "127.0.0.1:6379");
    }
}
