//! The remote page store against a real `redis-server` (feature `redis`): every test starts its
//! own server on a free loopback port (no persistence) and stops it after, so faults can be
//! injected: keys deleted, expired (TTL) and evicted (maxmemory), a record damaged, the
//! connection killed, a server that stalls, a server that restarts, a password. Each gives a
//! typed error or a shorter import (the caller prefills the rest), never wrong attention and
//! never a hang. Skips with a message when `redis-server` is absent, unless
//! `KVTIER_REQUIRE_REDIS=1` (CI sets it).
#![cfg(feature = "redis")]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtier::cold::redis::{RedisOptions, RedisStore};
use kvtier::cold::store::ColdStore;
use kvtier::prefix::{Fingerprint, PrefixStore};
use kvtier::{CacheConfig, Error, HotDtype, KvCache, SeqId};

const L: usize = 2;
const QH: usize = 4;
const KVH: usize = 2;
const D: usize = 32;
const PASSWORD: &str = "s3cret-Pa55";

/// One server at a time: tests that stop and restart a server must not lose its port to another
/// test's server.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Server {
    _serial: std::sync::MutexGuard<'static, ()>,
    child: Child,
    port: u16,
    args: Vec<String>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    /// Starts `redis-server` with `extra` arguments; `None` when there is none to start.
    fn start(extra: &[&str]) -> Option<Server> {
        let ok = Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            assert!(
                std::env::var("KVTIER_REQUIRE_REDIS").as_deref() != Ok("1"),
                "KVTIER_REQUIRE_REDIS=1 but redis-server is not installed"
            );
            eprintln!("SKIP: redis-server not found (apt-get install redis-server)");
            return None;
        }
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let port = free_port();
        let mut args: Vec<String> = [
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--enable-debug-command",
            "local",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let s = Server {
            _serial: serial,
            child: Self::spawn(port, &args),
            port,
            args,
        };
        s.wait_ready();
        Some(s)
    }

    fn spawn(port: u16, args: &[String]) -> Child {
        // A TLS server listens on `--tls-port` only.
        let flag = if args.iter().any(|a| a == "--tls-cert-file") {
            "--tls-port"
        } else {
            "--port"
        };
        Command::new("redis-server")
            .arg(flag)
            .arg(port.to_string())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server")
    }

    fn wait_ready(&self) {
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        if self.args.iter().any(|a| a == "--tls-cert-file") {
            return format!("rediss://127.0.0.1:{}/", self.port);
        }
        if self.args.iter().any(|a| a == "--requirepass") {
            format!("redis://:{PASSWORD}@127.0.0.1:{}/", self.port)
        } else {
            format!("redis://127.0.0.1:{}/", self.port)
        }
    }

    /// A raw command on a side connection (fault injection).
    fn cli(&self, args: &[&str]) -> redis::Value {
        let client = redis::Client::open(self.url()).unwrap();
        let mut c = client.get_connection().unwrap();
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut c).unwrap()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.stop();
        self.child = Self::spawn(self.port, &self.args);
        self.wait_ready();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn opts() -> RedisOptions {
    RedisOptions {
        connect_timeout: Duration::from_millis(500),
        io_timeout: Duration::from_millis(500),
        ..RedisOptions::default()
    }
}

fn cfg() -> CacheConfig {
    CacheConfig::builder(L, QH, KVH, D)
        .page_size(16)
        .hot_window(32)
        .hot_dtype(HotDtype::F16)
        .build()
        .unwrap()
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 13 + 5) % 700).collect()
}

fn kv(layer: usize, tokens: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let mut k = Vec::new();
    let mut v = Vec::new();
    for (pos, &t) in tokens.iter().enumerate() {
        for i in 0..KVH * D {
            let x = (t as f32 * 0.21 + pos as f32 * 0.017 + i as f32 * 0.11 + layer as f32).sin();
            k.push(x);
            v.push((x * 1.3).cos());
        }
    }
    (k, v)
}

fn filled(prompt: &[u32]) -> (KvCache, SeqId) {
    let mut c = KvCache::new(cfg()).unwrap();
    let s = c.add_sequence();
    for layer in 0..L {
        let (k, v) = kv(layer, prompt);
        c.append(s, layer, &k, &v).unwrap();
    }
    (c, s)
}

fn prefix(url: &str, o: RedisOptions) -> PrefixStore {
    let store: Arc<dyn ColdStore> = Arc::new(RedisStore::connect(url, o).unwrap());
    PrefixStore::new(store, "ci", Fingerprint::of_bytes(b"model")).unwrap()
}

/// Imports what the store has, prefills the rest locally, and checks the attention equals a
/// cache that computed everything.
fn import_and_check(px: &PrefixStore, prompt: &[u32]) -> kvtier::Result<usize> {
    let (a, sa) = filled(prompt);
    let mut b = KvCache::new(cfg()).unwrap();
    let sb = b.add_sequence();
    let got = px.import(&mut b, sb, prompt)?;
    for layer in 0..L {
        let (k, v) = kv(layer, prompt);
        let n = got.tokens * KVH * D;
        b.append(sb, layer, &k[n..], &v[n..]).unwrap();
    }
    let q: Vec<f32> = (0..QH * D).map(|i| (i as f32 * 0.05).sin()).collect();
    for layer in 0..L {
        assert_eq!(
            a.attend(layer, &[sa], &q).unwrap().output,
            b.attend(layer, &[sb], &q).unwrap().output,
            "layer {layer} after importing {} tokens",
            got.tokens
        );
    }
    Ok(got.tokens)
}

fn publish(px: &PrefixStore, prompt: &[u32]) {
    let (a, sa) = filled(prompt);
    let p = px.publish(&a, sa, prompt).unwrap();
    assert_eq!(p.written + p.present, (prompt.len() / 16) * L);
}

#[test]
fn pages_round_trip_through_redis() {
    let Some(srv) = Server::start(&[]) else {
        return;
    };
    let px = prefix(&srv.url(), opts());
    let prompt = tokens(400);
    assert_eq!(px.lookup(&cfg(), &prompt).unwrap(), 0);
    publish(&px, &prompt);
    assert_eq!(px.lookup(&cfg(), &prompt).unwrap(), 384);
    assert_eq!(import_and_check(&px, &prompt).unwrap(), 384);
    // A second node (a new connection pool) sees the same pages.
    let other = prefix(&srv.url(), opts());
    assert_eq!(import_and_check(&other, &prompt).unwrap(), 384);
    // Background publishing of a longer prompt extending it: only the new pages are sent.
    let longer = tokens(600);
    let (a, sa) = filled(&longer);
    px.publish_async(&a, sa, &longer).unwrap();
    let done = px.flush().unwrap();
    // 600 tokens: 37 full pages, 25 of them published with the 400-token prompt.
    assert_eq!((done.written, done.present), (12 * L, 25 * L));
    assert_eq!(import_and_check(&other, &longer).unwrap(), 592);
}

#[test]
fn missing_expired_evicted_and_damaged_records_shorten_the_import() {
    let Some(srv) = Server::start(&[]) else {
        return;
    };
    let px = prefix(&srv.url(), opts());
    let prompt = tokens(320);
    publish(&px, &prompt);
    let keys = px.keys(&cfg(), &prompt, 20);
    // A deleted key (evicted by the server, or removed by an operator) in page 12.
    srv.cli(&["DEL", &keys[12][1].0]);
    assert_eq!(px.lookup(&cfg(), &prompt).unwrap(), 12 * 16);
    assert_eq!(import_and_check(&px, &prompt).unwrap(), 12 * 16);
    // A damaged record in page 5: its checksum fails on import (lookup only sees existence).
    srv.cli(&["SETRANGE", &keys[5][0].0, "60", "garbage"]);
    assert_eq!(import_and_check(&px, &prompt).unwrap(), 5 * 16);
    // Another page's record under page 2's key (valid checksum, wrong identity).
    let foreign = match srv.cli(&["GET", &keys[3][0].0]) {
        redis::Value::BulkString(b) => b,
        v => panic!("{v:?}"),
    };
    let client = redis::Client::open(srv.url()).unwrap();
    let mut c = client.get_connection().unwrap();
    redis::cmd("SET")
        .arg(&keys[2][0].0)
        .arg(foreign)
        .query::<()>(&mut c)
        .unwrap();
    assert_eq!(import_and_check(&px, &prompt).unwrap(), 2 * 16);
    // Everything gone (FLUSHALL, or a restarted server without persistence).
    srv.cli(&["FLUSHALL"]);
    assert_eq!(import_and_check(&px, &prompt).unwrap(), 0);
}

#[test]
fn records_expire_with_a_ttl_and_maxmemory_eviction_is_safe() {
    let Some(srv) = Server::start(&["--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru"])
    else {
        return;
    };
    let ttl = prefix(
        &srv.url(),
        RedisOptions {
            ttl: Some(Duration::from_secs(1)),
            ..opts()
        },
    );

    let prompt = tokens(200);
    publish(&ttl, &prompt);
    assert_eq!(ttl.lookup(&cfg(), &prompt).unwrap(), 192);
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(ttl.lookup(&cfg(), &prompt).unwrap(), 0, "expired");
    // Far more pages than maxmemory holds: the server evicts; every import is a verified prefix
    // (maybe empty), never an error, never wrong attention.
    let px = prefix(&srv.url(), opts());
    let big = tokens(8000);
    let (a, sa) = filled(&big);
    // Writes past maxmemory may be refused (an error) or evict older records: either is safe.
    let _ = px.publish(&a, sa, &big);
    let n = import_and_check(&px, &big).unwrap();
    assert!(n < 7984, "2 MB cannot hold {} KB of pages", 500 * L * 4);
    eprintln!("after eviction: {n} of 7984 tokens importable");
}

#[test]
fn dropped_connections_and_restarts_reconnect() {
    let Some(mut srv) = Server::start(&[]) else {
        return;
    };
    let px = prefix(&srv.url(), opts());
    let prompt = tokens(200);
    publish(&px, &prompt);
    // Kill every client connection: the next call reconnects and succeeds.
    srv.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    assert_eq!(px.lookup(&cfg(), &prompt).unwrap(), 192);
    // Server down: a typed error, quickly, and the sequence is left empty.
    srv.stop();
    let mut b = KvCache::new(cfg()).unwrap();
    let sb = b.add_sequence();
    let t0 = Instant::now();
    match px.import(&mut b, sb, &prompt) {
        Err(Error::Remote { reason, .. }) => eprintln!("server down: {reason}"),
        other => panic!("expected Error::Remote, got {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(b.seq_len(sb, 0).unwrap(), 0);
    assert!(matches!(
        px.lookup(&cfg(), &prompt),
        Err(Error::Remote { .. })
    ));
    // Restarted (empty: no persistence): the store reconnects; nothing to import, publish again.
    srv.restart();
    assert_eq!(px.lookup(&cfg(), &prompt).unwrap(), 0);
    publish(&px, &prompt);
    assert_eq!(import_and_check(&px, &prompt).unwrap(), 192);
}

#[test]
fn a_stalled_server_is_a_timeout_not_a_hang() {
    let Some(srv) = Server::start(&[]) else {
        return;
    };
    let px = prefix(&srv.url(), opts());
    let prompt = tokens(200);
    publish(&px, &prompt);
    // The server sleeps 3 s (single-threaded: every client waits); io_timeout is 0.5 s.
    let url = srv.url();
    let sleeper = std::thread::spawn(move || {
        let client = redis::Client::open(url).unwrap();
        let mut c = client.get_connection().unwrap();
        let r: redis::RedisResult<()> = redis::cmd("DEBUG").arg("SLEEP").arg(3).query(&mut c);
        r.expect("DEBUG SLEEP");
    });
    std::thread::sleep(Duration::from_millis(200));
    let mut b = KvCache::new(cfg()).unwrap();
    let sb = b.add_sequence();
    let t0 = Instant::now();
    let r = px.import(&mut b, sb, &prompt);
    let waited = t0.elapsed();
    eprintln!("stalled server: {r:?} after {waited:?}");
    assert!(matches!(r, Err(Error::Remote { .. })), "{r:?}");
    // One attempt plus one retry on a fresh connection, each bounded by the timeouts.
    assert!(waited < Duration::from_millis(2500), "waited {waited:?}");
    assert_eq!(b.seq_len(sb, 0).unwrap(), 0, "nothing half-imported");
    sleeper.join().unwrap();
    // The server answers again: the same store works.
    assert_eq!(import_and_check(&px, &prompt).unwrap(), 192);
}

#[test]
fn auth_is_passed_through_and_never_shown() {
    let Some(srv) = Server::start(&["--requirepass", PASSWORD]) else {
        return;
    };
    // With the password in the URL.
    let px = prefix(&srv.url(), opts());
    let prompt = tokens(100);
    publish(&px, &prompt);
    assert_eq!(import_and_check(&px, &prompt).unwrap(), 96);
    // A wrong password, and none: a typed error that names the server but not the secret.
    for url in [
        format!("redis://:wrong-{PASSWORD}@127.0.0.1:{}/", srv.port),
        format!("redis://127.0.0.1:{}/", srv.port),
    ] {
        let e = match RedisStore::connect(&url, opts()) {
            Err(e) => e,
            Ok(s) => match s.exists_many(&["kvtier:ci:x".to_string()]) {
                Err(e) => e,
                Ok(_) => panic!("{url}: accepted without the password"),
            },
        };
        let text = format!("{e} {e:?}");
        assert!(matches!(e, Error::Remote { .. }), "{text}");
        assert!(text.contains(&format!("127.0.0.1:{}", srv.port)), "{text}");
        assert!(!text.contains(PASSWORD), "the password leaked: {text}");
    }
    let store = RedisStore::connect(&srv.url(), opts()).unwrap();
    assert!(!store.describe().contains(PASSWORD));
    // Keys outside the alphabet never reach the server.
    assert!(store
        .put_many(&[("a b\r\nFLUSHALL".into(), vec![1])])
        .is_err());
}

#[test]
fn no_server_is_a_typed_error() {
    if Server::start(&[]).is_none() {
        return;
    }
    let port = free_port();
    let t0 = Instant::now();
    match RedisStore::connect(&format!("redis://127.0.0.1:{port}/"), opts()) {
        Err(Error::Remote { reason, .. }) => assert!(reason.contains("127.0.0.1"), "{reason}"),
        Err(e) => panic!("expected Error::Remote, got {e}"),
        Ok(_) => panic!("connected to a closed port"),
    }
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(RedisStore::connect("not a url", opts()).is_err());
}

/// A CA and a server certificate for 127.0.0.1 signed by it (openssl), in `dir`.
fn make_certs(dir: &std::path::Path) -> bool {
    let run = |args: &[&str]| {
        Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=kvtier test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]) && run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
    ]) && run(&[
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "srv.pem",
    ])
}

#[test]
fn tls_is_passed_through() {
    let dir = std::env::temp_dir().join(format!("kvtier-redis-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if !make_certs(&dir) {
        eprintln!("SKIP: openssl cannot make test certificates");
        return;
    }
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let (ca, cert, key) = (p("ca.pem"), p("srv.pem"), p("srv.key"));
    let Some(srv) = Server::start(&[
        "--port",
        "0",
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
    ]) else {
        return;
    };
    let url = srv.url();
    let with_ca = RedisOptions {
        ca_pem: Some(std::fs::read(&ca).unwrap()),
        ..opts()
    };
    let px = prefix(&url, with_ca.clone());
    let prompt = tokens(200);
    publish(&px, &prompt);
    assert_eq!(import_and_check(&px, &prompt).unwrap(), 192);
    // Without the private CA the server's certificate is not trusted: a typed error.
    assert!(matches!(
        RedisStore::connect(&url, opts()),
        Err(Error::Remote { .. })
    ));
    // Plain text to the TLS port is an error, not a hang.
    let t0 = Instant::now();
    assert!(RedisStore::connect(&format!("redis://127.0.0.1:{}/", srv.port), opts()).is_err());
    assert!(t0.elapsed() < Duration::from_secs(2));
    // A CA with a plain-text URL is a configuration error.
    assert!(RedisStore::connect(&format!("redis://127.0.0.1:{}/", srv.port), with_ca).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
