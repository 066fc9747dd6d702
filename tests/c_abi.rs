//! The C ABI, from C.
//!
//! Compiles the C tests in `tests/c` as C11 (`-Wall -Wextra -Werror -pedantic`), `tests/c/header.cpp`
//! as C++17 and the example `examples/c/decode_loop.c`, links them against the `libkvtier` that this
//! `cargo test` built (the cdylib, and the staticlib for the example), and runs them:
//! - `lifecycle.c` and `errors.c` check themselves (every error path the CPU build can reach);
//! - `attention.c` prints its results bit for bit and `attention_matches_rust` replays the same
//!   scenario through the Rust API and compares every line;
//! - the C tests run again under AddressSanitizer + UBSan when the compiler supports them (skipped
//!   with a message otherwise), and under valgrind when `KVTIER_C_TESTS_VALGRIND=1` (set by
//!   `scripts/c-tests.sh`) and valgrind is installed.
//!
//! `CC` / `CXX` choose the compilers (default `cc` / `c++`). Without a C compiler every test here
//! prints why and passes.
#![cfg(unix)]

mod common;

use common::Rng;
use kvtier::{Bits, CacheConfig, KvCache, SeqId};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Paths and tools, found once.
struct Toolchain {
    root: PathBuf,
    /// Where cargo put this build's `libkvtier.so` / `libkvtier.a`.
    lib_dir: PathBuf,
    out_dir: PathBuf,
    cc: String,
    cxx: String,
}

fn works(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The toolchain, or `None` (after saying why) when there is no C compiler.
fn toolchain() -> Option<&'static Toolchain> {
    static T: OnceLock<Option<Toolchain>> = OnceLock::new();
    T.get_or_init(|| {
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        if !works(&cc, "--version") {
            eprintln!("SKIPPED: no C compiler (`{cc}`); set CC to run the C ABI tests");
            return None;
        }
        // The test executable lives in target/<profile>/deps, next to the cdylib and staticlib
        // that cargo built for this very run (cargo test does not copy them up a level).
        let exe = std::env::current_exe().expect("test executable path");
        let deps = exe.parent().expect("deps dir").to_path_buf();
        let so = format!(
            "{}kvtier{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        );
        let lib_dir = [
            deps.clone(),
            deps.parent().expect("profile dir").to_path_buf(),
        ]
        .into_iter()
        .find(|d| d.join(&so).exists())
        .unwrap_or_else(|| {
            panic!(
                "{so} not found near {}: is `cdylib` in crate-type?",
                exe.display()
            )
        });
        let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c-abi");
        std::fs::create_dir_all(&out_dir).expect("create output dir");
        Some(Toolchain {
            root: PathBuf::from(env!("CARGO_MANIFEST_DIR")),
            lib_dir,
            out_dir,
            cc,
            cxx,
        })
    })
    .as_ref()
}

const C_FLAGS: &[&str] = &["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-g"];
const CXX_FLAGS: &[&str] = &[
    "-std=c++17",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-pedantic",
    "-g",
];
const SAN_FLAGS: &[&str] = &[
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
];

/// How to link the library.
#[derive(Clone, Copy, PartialEq)]
enum Link {
    Dynamic,
    Static,
}

impl Toolchain {
    /// Compiles `src` (relative to the repository root) into `out_dir/name`; panics with the
    /// compiler's output on failure.
    fn build(&self, src: &str, name: &str, extra: &[&str], link: Link) -> PathBuf {
        let cpp = src.ends_with(".cpp");
        let exe = self.out_dir.join(name);
        let mut cmd = Command::new(if cpp { &self.cxx } else { &self.cc });
        cmd.args(if cpp { CXX_FLAGS } else { C_FLAGS })
            .args(extra)
            .arg("-I")
            .arg(self.root.join("include"))
            .arg("-I")
            .arg(self.root.join("tests/c"))
            .arg(self.root.join(src))
            .arg("-o")
            .arg(&exe);
        match link {
            Link::Dynamic => {
                cmd.arg(format!("-L{}", self.lib_dir.display()))
                    .arg("-lkvtier")
                    .arg(format!("-Wl,-rpath,{}", self.lib_dir.display()));
                if cfg!(target_os = "linux") {
                    // DT_RPATH, which (unlike DT_RUNPATH) outranks LD_LIBRARY_PATH.
                    cmd.arg("-Wl,--disable-new-dtags");
                }
            }
            Link::Static => {
                // The system libraries Rust's std needs on Linux
                // (`rustc --print native-static-libs`).
                cmd.arg(self.lib_dir.join("libkvtier.a")).args([
                    "-Wl,--gc-sections",
                    "-lgcc_s",
                    "-lutil",
                    "-lrt",
                    "-lpthread",
                    "-ldl",
                    "-lc",
                ]);
            }
        }
        cmd.arg("-lm");
        let out = cmd.output().expect("run the compiler");
        assert!(
            out.status.success(),
            "compiling {src} failed:\n{:?}\n{}",
            cmd,
            String::from_utf8_lossy(&out.stderr)
        );
        exe
    }

    /// Whether the C compiler can build and run a program with the sanitizers.
    fn has_sanitizers(&self) -> bool {
        self.runs_with(SAN_FLAGS)
    }

    /// Whether the C compiler can build and run a program with `flags`.
    fn runs_with(&self, flags: &[&str]) -> bool {
        let src = self.out_dir.join("probe.c");
        let exe = self.out_dir.join(format!(
            "probe-{}",
            flags.join("").replace(['-', '=', ','], "")
        ));
        std::fs::write(&src, "int main(void) { return 0; }\n").expect("write probe");
        Command::new(&self.cc)
            .args(flags)
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .output()
            .is_ok_and(|o| o.status.success())
            && Command::new(&exe)
                .output()
                .is_ok_and(|o| o.status.success())
    }
}

/// Runs `exe` (under `wrapper` when given); panics with its output unless it exits 0.
fn run(exe: &Path, wrapper: &[&str]) -> Output {
    run_env(exe, wrapper, &[])
}

/// [`run`] with extra environment variables.
fn run_env(exe: &Path, wrapper: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = match wrapper.split_first() {
        Some((w, args)) => {
            let mut c = Command::new(w);
            c.args(args).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    // `cargo test` puts target/<profile> ahead of target/<profile>/deps on LD_LIBRARY_PATH, and
    // target/<profile>/libkvtier.so is whatever `cargo build` left there last, possibly stale:
    // the program must load the library this test run built (its rpath), nothing else.
    cmd.env_remove("LD_LIBRARY_PATH")
        .env_remove("DYLD_LIBRARY_PATH")
        .env_remove("DYLD_FALLBACK_LIBRARY_PATH");
    // LeakSanitizer on; the sanitizers' reports go to stderr, printed below on failure.
    cmd.env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
        .env("UBSAN_OPTIONS", "print_stacktrace=1");
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("run test program");
    assert!(
        out.status.success(),
        "{} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        exe.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("UTF-8 output")
}

#[test]
fn c11_lifecycle() {
    let Some(t) = toolchain() else { return };
    let exe = t.build("tests/c/lifecycle.c", "lifecycle", &[], Link::Dynamic);
    assert!(stdout(&run(&exe, &[])).contains("lifecycle: ok"));
}

#[test]
fn c11_error_paths() {
    let Some(t) = toolchain() else { return };
    let exe = t.build("tests/c/errors.c", "errors", &[], Link::Dynamic);
    assert!(stdout(&run(&exe, &[])).contains("errors: ok"));
}

#[test]
fn c11_pages_moves_selection() {
    let Some(t) = toolchain() else { return };
    let exe = t.build("tests/c/pages.c", "pages", &[], Link::Dynamic);
    assert!(stdout(&run(&exe, &[])).contains("pages: ok"));
}

/// The protect session: monitor, healing, events and bad input, through the C ABI.
#[test]
fn c11_protect_session() {
    let Some(t) = toolchain() else { return };
    let exe = t.build("tests/c/protect.c", "protect", &[], Link::Dynamic);
    assert!(stdout(&run(&exe, &[])).contains("protect: ok"));
}

/// Prefix sharing: publish, lookup, import from memory and directory stores, bad input.
#[test]
fn c11_prefix_sharing() {
    let Some(t) = toolchain() else { return };
    let exe = t.build("tests/c/prefix.c", "prefix", &[], Link::Dynamic);
    assert!(stdout(&run(&exe, &[])).contains("prefix: ok"));
}

/// Fork, reorder, save / restore and a pthreads stress test, through the C ABI.
#[test]
fn c11_sequences_and_threads() {
    let Some(t) = toolchain() else { return };
    let exe = t.build(
        "tests/c/sequences.c",
        "sequences",
        &["-pthread"],
        Link::Dynamic,
    );
    assert!(stdout(&run(&exe, &[])).contains("sequences: ok"));
}

/// The pthreads stress test under ThreadSanitizer, where the compiler has it.
#[test]
fn c11_threads_under_tsan() {
    let Some(t) = toolchain() else { return };
    if !t.runs_with(&["-fsanitize=thread"]) {
        eprintln!(
            "SKIPPED: `{}` cannot build and run with -fsanitize=thread",
            t.cc
        );
        return;
    }
    let exe = t.build(
        "tests/c/sequences.c",
        "sequences-tsan",
        &["-pthread", "-fsanitize=thread", "-g"],
        Link::Dynamic,
    );
    // The Rust library is not built with TSan (that needs nightly): its own synchronisation
    // (futexes, rayon's atomics) is invisible to TSan, which would report its allocator calls
    // as races. The suppression stops TSan intercepting calls made from inside the library; every
    // access by the C program (its threads, its buffers, the handle) is still checked. The Rust
    // side of concurrency is covered by tests/concurrency.rs and the type system (Send + Sync).
    let supp = t.out_dir.join("tsan.supp");
    std::fs::write(&supp, "called_from_lib:libkvtier.so\n").expect("write suppressions");
    let opts = format!("suppressions={}:halt_on_error=1", supp.display());
    let out = run_env(&exe, &[], &[("TSAN_OPTIONS", &opts)]);
    assert!(stdout(&out).contains("sequences: ok"));
}

/// Batch invariance and the documented preset ratios, through the C ABI (natively and under the
/// sanitizers; not under valgrind, which would take minutes over 32K-token caches).
#[test]
fn c11_batch_invariance_and_preset_ratios() {
    let Some(t) = toolchain() else { return };
    let exe = t.build("tests/c/invariance.c", "invariance", &[], Link::Dynamic);
    assert!(stdout(&run(&exe, &[])).contains("invariance: ok"));
}

#[test]
fn cpp17_header() {
    let Some(t) = toolchain() else { return };
    if !works(&t.cxx, "--version") {
        eprintln!("SKIPPED: no C++ compiler (`{}`)", t.cxx);
        return;
    }
    let exe = t.build("tests/c/header.cpp", "header_cpp", &[], Link::Dynamic);
    assert!(stdout(&run(&exe, &[])).contains("c++17: ok"));
}

/// The example, linked against the static library (so the staticlib is exercised too).
#[test]
fn c_example_decode_loop() {
    let Some(t) = toolchain() else { return };
    let link = if cfg!(target_os = "linux") && t.lib_dir.join("libkvtier.a").exists() {
        Link::Static
    } else {
        Link::Dynamic
    };
    let exe = t.build("examples/c/decode_loop.c", "decode_loop", &[], link);
    let out = stdout(&run(&exe, &[]));
    assert!(out.contains("step 31:"), "{out}");
    assert!(
        out.contains("warm pages") && out.trim_end().ends_with("done"),
        "{out}"
    );
}

#[test]
fn c_tests_under_sanitizers() {
    let Some(t) = toolchain() else { return };
    if !t.has_sanitizers() {
        eprintln!(
            "SKIPPED: `{}` cannot build with -fsanitize=address,undefined",
            t.cc
        );
        return;
    }
    for name in [
        "lifecycle",
        "errors",
        "attention",
        "pages",
        "invariance",
        "protect",
        "sequences",
        "prefix",
    ] {
        let flags: Vec<&str> = SAN_FLAGS.iter().copied().chain(["-pthread"]).collect();
        let exe = t.build(
            &format!("tests/c/{name}.c"),
            &format!("{name}-asan"),
            &flags,
            Link::Dynamic,
        );
        run(&exe, &[]);
    }
    if works(&t.cxx, "--version") {
        let exe = t.build(
            "tests/c/header.cpp",
            "header_cpp-asan",
            SAN_FLAGS,
            Link::Dynamic,
        );
        run(&exe, &[]);
    }
}

#[test]
fn c_tests_under_valgrind() {
    let Some(t) = toolchain() else { return };
    if std::env::var("KVTIER_C_TESTS_VALGRIND").as_deref() != Ok("1") {
        eprintln!(
            "SKIPPED: valgrind run (set KVTIER_C_TESTS_VALGRIND=1, as scripts/c-tests.sh does)"
        );
        return;
    }
    if !works("valgrind", "--version") {
        eprintln!("SKIPPED: valgrind is not installed");
        return;
    }
    // Rayon's global pool threads live until exit: their stacks are "possibly lost", never
    // "definitely"; only definite leaks and memory errors fail the run.
    let vg = [
        "valgrind",
        "--quiet",
        "--error-exitcode=99",
        "--leak-check=full",
        "--show-possibly-lost=no",
        "--errors-for-leak-kinds=definite",
    ];
    for name in [
        "lifecycle",
        "errors",
        "attention",
        "pages",
        "protect",
        "sequences",
        "prefix",
    ] {
        let exe = t.build(
            &format!("tests/c/{name}.c"),
            &format!("{name}-vg"),
            &["-pthread"],
            Link::Dynamic,
        );
        run(&exe, &vg);
    }
}

/// The scenario of `tests/c/attention.c`, through the Rust API, printed in the same format.
fn attention_scenario_in_rust() -> String {
    const QH: usize = 4;
    const KVH: usize = 2;
    const D: usize = 32;
    const ROWQ: usize = QH * D;
    const ROWKV: usize = KVH * D;
    let bits =
        |v: &[f32]| -> String { v.iter().map(|x| format!(" {:08x}", x.to_bits())).collect() };
    // kvtier_config_new (the builder's defaults) and the same setters.
    let cfg = CacheConfig::builder(2, QH, KVH, D)
        .page_size(16)
        .hot_window(16)
        .sink_tokens(0)
        .k_bits(Bits::B4)
        .v_bits(Bits::B2)
        .build()
        .unwrap();
    let mut cache = KvCache::new(cfg).unwrap();
    let (a, b, c, d) = (
        cache.add_sequence(),
        cache.add_sequence(),
        cache.add_sequence(),
        cache.add_sequence(),
    );
    let mut rng = Rng(2024);
    let mut out = String::new();
    for layer in 0..2 {
        let n = 40;
        let (q, k, v) = (
            rng.vec(n * ROWQ, 1.0),
            rng.vec(n * ROWKV, 1.0),
            rng.vec(n * ROWKV, 1.0),
        );
        let o = cache.prefill(a, layer, &q, &k, &v).unwrap();
        out += &format!("prefill{layer}{}\n", bits(&o));
    }
    fn append(cache: &mut KvCache, rng: &mut Rng, seq: SeqId, n: usize) {
        let (k, v) = (rng.vec(n * ROWKV, 1.0), rng.vec(n * ROWKV, 1.0));
        cache.append(seq, 1, &k, &v).unwrap();
    }
    for _ in 0..10 {
        append(&mut cache, &mut rng, b, 7);
    }
    append(&mut cache, &mut rng, c, 3);
    let batch = [c, a, d, b];
    for step in 0..5 {
        for s in [a, b, c] {
            append(&mut cache, &mut rng, s, 1);
        }
        let q = rng.vec(4 * ROWQ, 2.0);
        let att = cache.attend(1, &batch, &q).unwrap();
        out += &format!("step {step}\n");
        out += &format!("output{}\n", bits(&att.output));
        let heads: Vec<f32> = att
            .heads
            .iter()
            .flat_map(|h| [h.entropy, h.varentropy, h.max_score, h.log_z])
            .collect();
        out += &format!("heads{}\n", bits(&heads));
        let mut offsets = vec![0usize];
        for m in &att.page_mass {
            offsets.push(offsets.last().unwrap() + m.len());
        }
        out += "offsets";
        for o in offsets {
            out += &format!(" {o}");
        }
        out += "\n";
        let masses: Vec<f32> = att.page_mass.concat();
        out += &format!("mass{}\n", bits(&masses));
    }
    let r = cache.memory_report();
    out += &format!(
        "report {} {} {} {} {}\n",
        r.tokens, r.hot_pages, r.warm_pages, r.hot_bytes, r.warm_bytes
    );
    out
}

#[test]
fn attention_matches_rust() {
    let Some(t) = toolchain() else { return };
    let exe = t.build("tests/c/attention.c", "attention", &[], Link::Dynamic);
    let from_c = stdout(&run(&exe, &[]));
    let from_rust = attention_scenario_in_rust();
    let (c_lines, rust_lines): (Vec<&str>, Vec<&str>) =
        (from_c.lines().collect(), from_rust.lines().collect());
    assert_eq!(c_lines.len(), rust_lines.len(), "line counts differ");
    assert_eq!(
        c_lines.len(),
        2 + 5 * 5 + 1,
        "prefill x2, 5 steps of 5 lines, report"
    );
    for (i, (c, r)) in c_lines.iter().zip(&rust_lines).enumerate() {
        if c != r {
            let key = r.split(' ').next().unwrap_or("");
            let diff = c
                .split(' ')
                .zip(r.split(' '))
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            panic!(
                "line {i} (`{key}`) differs at field {diff}:\n  C:    {c:.200}\n  Rust: {r:.200}"
            );
        }
    }
}

/// A cheap drift check that needs neither cbindgen nor a C compiler (scripts/c-tests.sh runs the
/// full one): the committed header declares exactly the functions src/ffi exports, and its version
/// macros are this package's version.
#[test]
fn header_declares_every_exported_function() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let header = std::fs::read_to_string(root.join("include/kvtier.h")).expect("read header");
    let mut exported = Vec::new();
    for entry in std::fs::read_dir(root.join("src/ffi")).expect("src/ffi") {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text.lines() {
            let line = line.trim_start();
            if let Some(rest) = line
                .strip_prefix("pub unsafe extern \"C\" fn ")
                .or_else(|| line.strip_prefix("pub extern \"C\" fn "))
            {
                exported.push(rest.split('(').next().unwrap().to_string());
            }
        }
    }
    exported.sort();
    let mut declared: Vec<String> = header
        .lines()
        .filter(|l| !l.starts_with(' ') && l.contains("kvtier_") && l.contains('('))
        .filter_map(|l| {
            let name = l.split('(').next()?.rsplit([' ', '*']).next()?;
            name.starts_with("kvtier_").then(|| name.to_string())
        })
        .collect();
    declared.sort();
    assert!(exported.len() >= 30, "found only {exported:?}");
    assert_eq!(
        exported, declared,
        "include/kvtier.h is stale: run `cargo check --features generate-header`"
    );
    for (macro_name, value) in [
        ("KVTIER_VERSION_MAJOR", env!("CARGO_PKG_VERSION_MAJOR")),
        ("KVTIER_VERSION_MINOR", env!("CARGO_PKG_VERSION_MINOR")),
        ("KVTIER_VERSION_PATCH", env!("CARGO_PKG_VERSION_PATCH")),
        (
            "KVTIER_VERSION_STRING",
            concat!("\"", env!("CARGO_PKG_VERSION"), "\""),
        ),
    ] {
        let line = format!("#define {macro_name} {value}\n");
        assert!(header.contains(&line), "header lacks `{}`", line.trim());
    }
    let abi = format!(
        "#define KVTIER_ABI_VERSION 0x{:06x}u\n",
        kvtier::ffi::kvtier_abi_version()
    );
    assert!(header.contains(&abi), "header lacks `{}`", abi.trim());
}
