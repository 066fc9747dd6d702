//! Property tests of the cache bookkeeping: random token streams across page boundaries keep every
//! token's position and order, in every tier.

mod common;
use common::Rng;
use kvtier::{Bits, CacheConfig, HotDtype, KvCache, Tier};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn random_streams_keep_position_and_order(
        chunks in proptest::collection::vec(1usize..80, 1..20),
        page_size in prop_oneof![Just(8usize), Just(16), Just(32), Just(64)],
        window in 0usize..100,
        sinks in 0usize..40,
        warm in any::<bool>(),
        seqs in 1usize..4,
    ) {
        let (kvh, d) = (2, 64);
        let mut b = CacheConfig::builder(2, 4, kvh, d).hot_dtype(HotDtype::F32).page_size(page_size)
            .hot_window(window).sink_tokens(sinks).k_bits(Bits::B8).v_bits(Bits::B8);
        if !warm { b = b.full_precision(); }
        let mut cache = KvCache::new(b.build().unwrap()).unwrap();
        let ids: Vec<_> = (0..seqs).map(|_| cache.add_sequence()).collect();
        let mut rng = Rng(chunks.len() as u64);
        let mut sent: Vec<Vec<f32>> = vec![Vec::new(); seqs];
        // Each token carries its position as (offset in page, page index + head) in channels that
        // int8 quantisation reproduces to within half a step < 0.5: keys in channels 0 and 1
        // (per-channel ranges), values in channels 0 and 32 (separate per-token groups).
        for (ci, &n) in chunks.iter().enumerate() {
            let s = ci % seqs;
            let start = sent[s].len() / (kvh * d);
            let mut k = rng.vec(n * kvh * d, 0.1);
            let mut v = vec![0f32; n * kvh * d];
            for t in 0..n {
                for h in 0..kvh {
                    let (off, page) = (((start + t) % page_size) as f32, ((start + t) / page_size + h) as f32);
                    let r = (t * kvh + h) * d;
                    k[r] = off;
                    k[r + 1] = page;
                    v[r] = off;
                    v[r + 32] = page;
                }
            }
            cache.append(ids[s], 1, &k, &v).unwrap();
            sent[s].extend_from_slice(&k);
        }
        for s in 0..seqs {
            let len = sent[s].len() / (kvh * d);
            prop_assert_eq!(cache.seq_len(ids[s], 1).unwrap(), len);
            prop_assert_eq!(cache.seq_len(ids[s], 0).unwrap(), 0);
            let table = cache.page_table(ids[s], 1).unwrap();
            prop_assert_eq!(table.pages().len(), len.div_ceil(page_size));
            for (i, p) in table.pages().iter().enumerate() {
                let full = if i + 1 < table.pages().len() { page_size } else { len - i * page_size };
                prop_assert_eq!(p.n_tokens as usize, full);
                let expect_warm = warm && {
                    // The hot-window rule, restated independently of the implementation.
                    let (start, end) = (i * page_size, (i + 1) * page_size);
                    start >= sinks && end <= len && end + window <= len
                };
                prop_assert_eq!(p.tier, if expect_warm { Tier::Warm } else { Tier::Hot }, "page {}", i);
            }
            let (k, v) = cache.read_tokens(ids[s], 1).unwrap();
            for t in 0..len {
                for h in 0..kvh {
                    let r = (t * kvh + h) * d;
                    let want = ((t % page_size) as f32, (t / page_size + h) as f32);
                    prop_assert_eq!((k[r].round(), k[r + 1].round()), want, "seq {} token {} head {} (keys)", s, t, h);
                    prop_assert_eq!((v[r].round(), v[r + 32].round()), want, "seq {} token {} head {} (values)", s, t, h);
                }
            }
            if !warm {
                prop_assert_eq!(&k, &sent[s]);
            }
        }
        // Removing and resetting frees every page.
        for &id in &ids { cache.reset_sequence(id).unwrap(); }
        let r = cache.memory_report();
        prop_assert_eq!((r.hot_pages, r.warm_pages, r.hot_bytes, r.warm_bytes, r.tokens), (0, 0, 0, 0, 0));
    }
}

#[test]
fn memory_report_counts_real_bytes() {
    // 32K tokens, 8 kv heads, d128, one layer.
    let (kvh, d, n) = (8, 128, 32 * 1024);
    for (kb, vb) in [(Bits::B4, Bits::B4), (Bits::B2, Bits::B2)] {
        let cfg = CacheConfig::builder(1, 32, kvh, d)
            .k_bits(kb)
            .v_bits(vb)
            .build()
            .unwrap();
        let mut cache = KvCache::new(cfg).unwrap();
        let s = cache.add_sequence();
        let mut rng = Rng(1);
        let chunk = 1024;
        for _ in 0..n / chunk {
            let k = rng.vec(chunk * kvh * d, 1.0);
            cache.append(s, 0, &k, &k).unwrap();
        }
        let r = cache.memory_report();
        assert_eq!(r.tokens, n);
        assert_eq!(r.f16_equivalent_bytes, n * kvh * d * 2 * 2);
        // hot: sink page + window pages; warm: the rest.
        assert!(r.hot_pages <= 1 + 128 / 32 + 1, "{r}");
        assert_eq!(r.hot_pages + r.warm_pages, n / 32);
        // Payload bytes are exactly the pages' allocations: f16 hot pages, packed warm pages.
        assert_eq!(r.hot_bytes, r.hot_pages * 2 * kvh * 32 * d * 2);
        let layout = kvtier::quant::WarmLayout::new(32, d, kb, vb, 32);
        assert_eq!(r.warm_bytes, r.warm_pages * kvh * layout.head_bytes);
        // per token per head: codes d*(kb+vb)/8, key min+step 4*d/32, value min+step 4*d/32
        assert_eq!(
            layout.head_bytes,
            32 * d * (kb.bits() + vb.bits()) / 8 + 4 * d + 4 * 32 * (d / 32)
        );
        assert!(
            r.metadata_bytes > 0 && r.metadata_bytes < r.device_bytes() / 100,
            "{r}"
        );
        eprintln!("{kb:?}/{vb:?}: {r}");
    }
}
