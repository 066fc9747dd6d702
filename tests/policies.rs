//! Retention policies on concrete caches: each meets a budget that its protected pages leave room
//! for, evicts what its paper says goes first, and `tiered` lowers precision before deleting and
//! brings pages back when attention returns.

mod common;
use common::Rng;
use kvtier::policy::{self, Budget, RetentionPolicy, Tiered};
use kvtier::{CacheConfig, Error, KvCache, SeqId, Tier};

const QH: usize = 4;
const KVH: usize = 2;
const D: usize = 32;
const ROW: usize = KVH * D;

/// A cache of `layers` layers holding `len` tokens in one sequence, with masses from `steps`
/// observed decode steps.
fn observed(len: usize, layers: usize, steps: usize, seed: u64) -> (KvCache, SeqId) {
    let cfg = CacheConfig::builder(layers, QH, KVH, D)
        .hot_window(64)
        .sink_tokens(4)
        .build()
        .unwrap();
    let mut c = KvCache::new(cfg).unwrap();
    let s = c.add_sequence();
    let mut rng = Rng(seed);
    for l in 0..layers {
        c.append(s, l, &rng.vec(len * ROW, 1.0), &rng.vec(len * ROW, 1.0))
            .unwrap();
        for _ in 0..steps {
            let q = rng.vec(QH * D, 3.0);
            let att = c.attend(l, &[s], &q).unwrap();
            c.observe(l, &[s], &att).unwrap();
        }
    }
    (c, s)
}

#[test]
fn every_policy_meets_a_budget_its_protected_pages_allow() {
    for name in policy::NAMES {
        for bytes in [false, true] {
            let (mut c, s) = observed(1024, 1, 3, 1);
            let view = c.policy_view(s, 0).unwrap();
            // Half of what is there: far above what any window, sink or partial page protects.
            let budget = if bytes {
                Budget::device_bytes(view.device_bytes() / 2)
            } else {
                Budget::tokens(view.kept_tokens() / 2)
            };
            let mut p = policy::by_name(name).unwrap();
            c.enforce(p.as_mut(), s, 0, &budget).unwrap();
            let after = c.policy_view(s, 0).unwrap();
            match *name {
                "keep_all" | "anchor" => assert_eq!(after.kept_tokens(), 1024, "{name}"),
                // tiered never deletes: a token budget is not its concern, bytes are.
                "tiered" | "tiered_int2" if !bytes => assert_eq!(after.kept_tokens(), 1024),
                _ if bytes => assert!(
                    after.device_bytes() <= budget.device_bytes.unwrap(),
                    "{name}: {} > {:?}",
                    after.device_bytes(),
                    budget
                ),
                _ => assert!(after.kept_tokens() <= budget.tokens.unwrap(), "{name}"),
            }
        }
    }
    assert!(matches!(
        policy::by_name("lru"),
        Err(Error::InvalidConfig { .. })
    ));
}

#[test]
fn h2o_evicts_the_lightest_pages_outside_its_window_and_never_sinks() {
    let (mut c, s) = observed(1024, 1, 4, 2);
    let before = c.policy_view(s, 0).unwrap();
    let mut h2o = policy::H2o { recent: 128 };
    let moves = c.enforce(&mut h2o, s, 0, &Budget::tokens(512)).unwrap();
    assert!(!moves.is_empty());
    let after = c.policy_view(s, 0).unwrap();
    let evicted: Vec<usize> = after
        .pages
        .iter()
        .filter(|p| p.tier == Tier::Evicted)
        .map(|p| p.index)
        .collect();
    assert_eq!(after.pages[0].tier, Tier::Hot, "the sink page stays");
    let lightest_kept = before
        .pages
        .iter()
        .filter(|p| !evicted.contains(&p.index) && p.index != 0 && !before.in_window(p.index, 128))
        .map(|p| p.total_mass())
        .fold(f32::INFINITY, f32::min);
    for &i in &evicted {
        assert!(!before.in_window(i, 128));
        assert!(before.pages[i].total_mass() <= lightest_kept);
    }
}

#[test]
fn pyramidkv_keeps_more_in_lower_layers() {
    let (mut c, s) = observed(1024, 4, 2, 3);
    let mut p = policy::PyramidKv::default();
    let budget = Budget::tokens(400);
    let mut kept = Vec::new();
    for l in 0..4 {
        c.enforce(&mut p, s, l, &budget).unwrap();
        kept.push(c.policy_view(s, l).unwrap().kept_tokens());
    }
    assert!(kept.windows(2).all(|w| w[0] >= w[1]), "{kept:?}");
    assert!(kept[0] > kept[3]);
}

#[test]
fn tiered_lowers_precision_before_deleting_and_promotes_when_attention_returns() {
    let (mut c, s) = observed(2048, 1, 2, 4);
    let f16_bytes = 2048 * ROW * 2 * 2;
    let mut t = Tiered::default();
    for frac in [0.25, 0.125] {
        let budget = Budget::device_bytes((f16_bytes as f64 * frac) as usize);
        c.enforce(&mut t, s, 0, &budget).unwrap();
        let v = c.policy_view(s, 0).unwrap();
        assert!(v.device_bytes() <= budget.device_bytes.unwrap(), "{frac}");
        assert_eq!(v.kept_tokens(), 2048, "nothing deleted at {frac}");
        assert!(v.pages.iter().any(|p| p.tier == Tier::Cold) || frac == 0.25);
    }
    let r = c.memory_report();
    assert_eq!(r.evicted_pages, 0);
    // Attention returns to a cold page: each head's query is a multiple of one of its keys.
    let v = c.policy_view(s, 0).unwrap();
    let cold = v
        .pages
        .iter()
        .find(|p| p.tier == Tier::Cold)
        .expect("a cold page")
        .index;
    let (k, _) = c.read_tokens(s, 0).unwrap();
    let mut q = vec![0f32; QH * D];
    for h in 0..QH {
        let kv = h / (QH / KVH);
        for d in 0..D {
            q[h * D + d] = 40.0 * k[((cold * 32 + 5) * KVH + kv) * D + d];
        }
    }
    let att = c.attend(0, &[s], &q).unwrap();
    assert!(att.page_mass[0].iter().all(|m| m.is_finite()));
    c.observe(0, &[s], &att).unwrap();
    let lm = c.policy_view(s, 0).unwrap().pages[cold].last_mass;
    assert!(
        lm >= t.promote_mass,
        "last mass {lm}, page mass {}",
        att.page_mass[0][cold]
    );
    // Room for one more hot page: the budget allows the promotion.
    let room = c.policy_view(s, 0).unwrap().device_bytes() + 2 * 32 * ROW * 2;
    // The page moved recently (cooldown): wait it out with observed steps.
    for _ in 0..t.cooldown {
        let att = c.attend(0, &[s], &q).unwrap();
        c.observe(0, &[s], &att).unwrap();
    }
    let moves = c
        .enforce(&mut t, s, 0, &Budget::device_bytes(room))
        .unwrap();
    assert!(
        moves.contains(&kvtier::Move::Promote(kvtier::PageRef {
            seq: s,
            layer: 0,
            page: cold
        })),
        "{moves:?}"
    );
    assert_eq!(
        c.page(kvtier::PageRef {
            seq: s,
            layer: 0,
            page: cold
        })
        .unwrap()
        .tier,
        Tier::Hot
    );
}

#[test]
fn tiered_keeps_the_config_width_as_its_device_floor_unless_told_narrow() {
    let f16_bytes = 2048 * ROW * 2 * 2;
    let budget = Budget::device_bytes(f16_bytes / 8);
    let narrowest = |t: &mut Tiered| {
        let (mut c, s) = observed(2048, 1, 2, 4);
        c.enforce(t, s, 0, &budget).unwrap();
        let v = c.policy_view(s, 0).unwrap();
        assert!(v.device_bytes() <= budget.device_bytes.unwrap());
        assert_eq!(v.kept_tokens(), 2048);
        let warm: Vec<_> = v.pages.iter().filter(|p| p.tier == Tier::Warm).collect();
        assert!(!warm.is_empty());
        let cold = v.pages.iter().filter(|p| p.tier == Tier::Cold).count();
        (
            warm.iter().map(|p| p.format.k_bits.bits()).min().unwrap(),
            cold,
        )
    };
    let (bits, cold) = narrowest(&mut Tiered::default());
    assert_eq!(
        bits, 4,
        "the default never goes below the config's int4 on the device"
    );
    assert!(cold > 0);
    let mut narrow = Tiered::narrow();
    assert_eq!(narrow.name(), "tiered_int2");
    let (bits, cold_narrow) = narrowest(&mut narrow);
    assert_eq!(bits, 2, "tiered_int2 uses int2 before cold");
    assert!(cold_narrow < cold, "{cold_narrow} vs {cold}");
}

#[test]
fn user_policies_plug_in() {
    /// Evicts every other page outside the first and the last two.
    struct EveryOther;
    impl RetentionPolicy for EveryOther {
        fn name(&self) -> &str {
            "every_other"
        }
        fn plan(&mut self, v: &policy::SeqView, _: &Budget) -> Vec<kvtier::Move> {
            (1..v.pages.len().saturating_sub(2))
                .step_by(2)
                .filter(|&i| v.pages[i].movable())
                .map(|i| kvtier::Move::Evict(v.page_ref(i)))
                .collect()
        }
    }
    let (mut c, _) = observed(512, 1, 1, 5);
    let n = c.enforce_all(&mut EveryOther, &Budget::default()).unwrap();
    assert_eq!(n, 7);
    assert_eq!(c.memory_report().evicted_pages, 7);
}

/// The simulator on a heavy-hitter stream: keep_all loses nothing; at a quarter of the tokens,
/// attention-aware H2O keeps more of the reference's attention mass than a recency window, and
/// tiered (which never deletes) keeps all of it within a quarter of the f16 bytes.
#[test]
fn simulator_ranks_policies_on_heavy_hitter_streams() {
    use policy::sim::{simulate, SimConfig};
    let cfg = CacheConfig::builder(1, QH, KVH, D)
        .hot_window(64)
        .sink_tokens(4)
        .build()
        .unwrap();
    let sim = SimConfig {
        prompt: 1024,
        steps: 24,
        ..SimConfig::default()
    };
    let run = |name: &str, b: Budget| {
        simulate(&cfg, policy::by_name(name).unwrap().as_mut(), &b, &sim).unwrap()
    };
    let all = run("keep_all", Budget::default());
    assert_eq!(all.kept_ratio, 1.0);
    assert!((all.mass_retained - 1.0).abs() < 1e-4);
    assert_eq!(all.heavy_hitter_recall, 1.0);
    let quarter = Budget::tokens(1024 / 4);
    let (h2o, recent) = (run("h2o", quarter), run("recent", quarter));
    assert!(h2o.kept_ratio <= 0.26 && recent.kept_ratio <= 0.26);
    assert!(
        h2o.mass_retained > recent.mass_retained,
        "h2o {h2o:?} recent {recent:?}"
    );
    assert!(h2o.heavy_hitter_recall > recent.heavy_hitter_recall);
    let bytes = Budget::device_bytes(1024 * 2 * KVH * D * 2 / 4);
    let tiered = run("tiered", bytes);
    assert_eq!(tiered.kept_ratio, 1.0);
    assert!(
        tiered.device_bytes <= bytes.device_bytes.unwrap() as f64 + (2 * 32 * KVH * D * 2) as f64
    );
    assert!(tiered.mass_retained > 0.9999, "{tiered:?}");
    assert!(
        tiered.output_error < h2o.output_error,
        "tiered {tiered:?} h2o {h2o:?}"
    );
}

/// A shared in-memory sink for traces.
#[derive(Clone, Default)]
struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
impl std::io::Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Capture through the engine adapter, read back, replay: keep_all keeps all the mass, a policy at a
/// quarter of the tokens keeps less, corrupt files are typed errors.
#[test]
fn traces_capture_read_back_and_replay() {
    use kvtier::policy::trace::{read_trace, replay};
    use kvtier::{AttentionCache, KvTierAttention};
    let sink = Shared::default();
    let cfg = CacheConfig::builder(2, QH, KVH, D)
        .full_precision()
        .build()
        .unwrap();
    let mut a = KvTierAttention::new(cfg)
        .unwrap()
        .with_trace(Box::new(sink.clone()), true)
        .unwrap();
    let mut rng = Rng(9);
    let (k0, v0) = (rng.vec(512 * ROW, 1.0), rng.vec(512 * ROW, 1.0));
    for l in 0..2 {
        a.append(l, &k0, &v0).unwrap();
    }
    for _ in 0..20 {
        for l in 0..2 {
            let (q, k, v) = (rng.vec(QH * D, 3.0), rng.vec(ROW, 1.0), rng.vec(ROW, 1.0));
            a.decode(l, &q, &k, &v).unwrap();
        }
    }
    a.finish_trace().unwrap();
    let bytes = sink.0.lock().unwrap().clone();
    let (h, steps) = read_trace(&bytes[..]).unwrap();
    assert_eq!(
        (h.num_layers, h.num_q_heads, h.page_size),
        (2, QH as u32, 32)
    );
    assert!(h.with_qk);
    assert_eq!(steps.len(), 40);
    assert_eq!(steps[0].len, 513);
    assert_eq!(steps[39].len, 532);
    assert_eq!(steps[0].mass.len(), 17 * KVH);
    let all = replay(
        &h,
        &steps,
        policy::by_name("keep_all").unwrap().as_mut(),
        &Budget::default(),
    )
    .unwrap();
    assert!((all.mass_retained - 1.0).abs() < 1e-4 && all.kept_ratio == 1.0);
    let h2o = replay(
        &h,
        &steps,
        policy::by_name("h2o").unwrap().as_mut(),
        &Budget::tokens(128),
    )
    .unwrap();
    assert!(
        h2o.kept_ratio < 0.4 && h2o.mass_retained < all.mass_retained,
        "{h2o:?}"
    );
    let tiered = replay(
        &h,
        &steps,
        policy::by_name("tiered").unwrap().as_mut(),
        &Budget::device_bytes(4 * 2 * 32 * ROW * 2),
    )
    .unwrap();
    assert_eq!(tiered.kept_ratio, 1.0);
    assert!(tiered.demoted_pages > 0.0);
    // Corrupt files: typed errors, never a panic.
    assert!(matches!(
        read_trace(&b"NOTATRACE"[..]),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        read_trace(&bytes[..bytes.len() - 3]),
        Err(Error::Shape { .. })
    ));
    let mut v2 = bytes.clone();
    v2[8] = 2;
    assert!(matches!(read_trace(&v2[..]), Err(Error::Shape { .. })));
}
