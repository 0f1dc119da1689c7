//! Properties of dense and two-level sparse decode over random caches, for
//! GQA (any head ratio, head dims 64/128/256) and MLA (absorbed latent).
//! Every case draws fresh random keys, values and queries from its seed.

use asynctls_attn::metrics::{dense_probabilities, recall, relative_l2};
use asynctls_attn::select::{block_bounds, forced_blocks};
use asynctls_attn::{decode, AttnShape, GroupReduce, Policy, SparseConfig};
use asynctls_kvcache::{
    bf16_at_least, bf16_at_most, CacheConfig, HostKvStorage, HostReadable, KvDType, LabelChannels, PagedKvCache, SeqId,
    ValueLayout,
};
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// A one-layer cache holding `lens.len()` sequences of random tokens, and the
/// keys/values as stored (`[len, kv_heads, dim]` per sequence).
struct Fixture {
    shape: AttnShape,
    cache: PagedKvCache<HostKvStorage>,
    seqs: Vec<SeqId>,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    q: Vec<f32>,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Gqa {
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
    },
    Mla {
        heads: usize,
        rank: usize,
        rope: usize,
    },
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        (
            prop::sample::select(vec![(1usize, 1usize), (4, 4), (8, 2), (7, 1), (12, 3), (32, 8)]),
            prop::sample::select(vec![64usize, 128, 256])
        )
            .prop_map(|((q, kv), d)| Kind::Gqa {
                q_heads: q,
                kv_heads: kv,
                head_dim: d
            }),
        prop::sample::select(vec![(4usize, 64usize, 32usize), (16, 128, 64), (20, 512, 64)])
            .prop_map(|(heads, rank, rope)| Kind::Mla { heads, rank, rope }),
    ]
}

impl Fixture {
    fn new(kind: Kind, lens: &[usize], block_size: usize, kv_dtype: KvDType, seed: u64) -> Fixture {
        let mut rng = StdRng::seed_from_u64(seed);
        let (shape, mut config) = match kind {
            Kind::Gqa {
                q_heads,
                kv_heads,
                head_dim,
            } => (
                AttnShape::gqa(q_heads, kv_heads, head_dim),
                CacheConfig::gqa(1, kv_heads, head_dim, 1),
            ),
            Kind::Mla { heads, rank, rope } => (
                AttnShape::mla(heads, rank, rope, 1.0 / ((rank / 4 + rope) as f32).sqrt()),
                CacheConfig::mla(1, rank, rope, 1),
            ),
        };
        config.block_size = block_size;
        config.kv_dtype = kv_dtype;
        config.num_blocks = lens.iter().map(|l| l.div_ceil(block_size)).sum::<usize>().max(1);
        // Random distinct label channels, as calibration would give.
        let mut channels = Vec::new();
        for _ in 0..config.kv_heads {
            let mut all: Vec<u16> = (0..config.key_dim as u16).collect();
            for i in (1..all.len()).rev() {
                all.swap(i, rng.random_range(0..=i));
            }
            all.truncate(config.label_channels);
            channels.push(all);
        }
        let storage = HostKvStorage::new(&config, LabelChannels::new(vec![channels])).unwrap();
        let mut cache = PagedKvCache::new(storage).unwrap();
        let (kw, vw) = (config.kv_heads * config.key_dim, config.kv_heads * config.value_dim());
        let round = |x: f32| match kv_dtype {
            KvDType::F32 => x,
            KvDType::BF16 => half::bf16::from_f32(x).to_f32(),
        };
        let (mut seqs, mut keys, mut values) = (Vec::new(), Vec::new(), Vec::new());
        for &len in lens {
            let s = cache.add_sequence();
            // Channel scales vary so that some channels dominate, as in real keys.
            let k: Vec<f32> = (0..len * kw)
                .map(|i| round(rng.random_range(-1.0f32..1.0) * (1.0 + (i % 5) as f32)))
                .collect();
            let v: Vec<f32> = (0..len * vw).map(|_| round(rng.random_range(-1.0f32..1.0))).collect();
            cache.append(s, &[&k], &[&v]).unwrap();
            seqs.push(s);
            keys.push(k);
            values.push(v);
        }
        let q: Vec<f32> = (0..lens.len() * shape.q_heads * shape.key_dim)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        Fixture {
            shape,
            cache,
            seqs,
            keys,
            values,
            q,
        }
    }

    fn run(&self, config: &SparseConfig) -> (Vec<f32>, asynctls_attn::DecodeReport) {
        let tables: Vec<_> = self.seqs.iter().map(|&s| self.cache.table(s).unwrap()).collect();
        let mut out = vec![f32::NAN; self.seqs.len() * self.shape.q_heads * self.shape.value_dim];
        let report = decode(self.cache.storage(), &tables, 0, &self.q, &self.shape, config, &mut out).unwrap();
        (out, report)
    }

    /// The value of token `t`, KV head `h`, of sequence `s`, from the raw arrays.
    fn value(&self, s: usize, t: usize, h: usize) -> &[f32] {
        let c = self.cache.config();
        match c.values {
            ValueLayout::Separate { dim } => {
                &self.values[s][(t * c.kv_heads + h) * dim..(t * c.kv_heads + h + 1) * dim]
            }
            ValueLayout::KeyPrefix { dim } => {
                &self.keys[s][(t * c.kv_heads + h) * c.key_dim..(t * c.kv_heads + h) * c.key_dim + dim]
            }
        }
    }

    fn key(&self, s: usize, t: usize, h: usize) -> &[f32] {
        let kd = self.cache.config().key_dim;
        let kvh = self.cache.config().kv_heads;
        &self.keys[s][(t * kvh + h) * kd..(t * kvh + h + 1) * kd]
    }

    /// Quest's bound of block `b` (of `bs` tokens, sequence 0 of `len`) of
    /// KV head `h` for one query head, by brute force over its keys: the
    /// channel-wise max/min rounded outward to bf16 values, as the cache
    /// keeps them (exact for bf16 keys; the GPU stores bf16 bounds).
    fn block_bound(&self, h: usize, b: usize, bs: usize, len: usize, q: &[f32]) -> f64 {
        (0..self.shape.key_dim)
            .map(|c| {
                let vals = (b * bs..((b + 1) * bs).min(len)).map(|t| self.key(0, t, h)[c]);
                let (mx, mn) = vals.fold((f32::NEG_INFINITY, f32::INFINITY), |(a, b), v| (a.max(v), b.min(v)));
                let (mx, mn) = (bf16_at_least(mx), bf16_at_most(mn));
                (q[c] as f64 * mx as f64).max(q[c] as f64 * mn as f64)
            })
            .sum()
    }

    /// Naive attention, one query head at a time, over `tokens` of sequence `s`.
    fn naive_head(&self, s: usize, qh: usize, tokens: &[u32]) -> Vec<f32> {
        let sh = &self.shape;
        let q = &self.q[(s * sh.q_heads + qh) * sh.key_dim..(s * sh.q_heads + qh + 1) * sh.key_dim];
        self.naive(s, qh / sh.group(), q, tokens)
    }

    /// Naive attention of one query against KV head `h` over `tokens`.
    fn naive(&self, s: usize, h: usize, q: &[f32], tokens: &[u32]) -> Vec<f32> {
        let sh = &self.shape;
        let scores: Vec<f64> = tokens
            .iter()
            .map(|&t| {
                q.iter()
                    .zip(self.key(s, t as usize, h))
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    * sh.scale as f64
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
        let z: f64 = w.iter().sum();
        let mut out = vec![0.0f64; sh.value_dim];
        for (&t, wi) in tokens.iter().zip(&w) {
            for (o, v) in out.iter_mut().zip(self.value(s, t as usize, h)) {
                *o += wi / z * *v as f64;
            }
        }
        out.into_iter().map(|x| x as f32).collect()
    }

    fn lens(&self) -> Vec<usize> {
        self.seqs.iter().map(|&s| self.cache.table(s).unwrap().len()).collect()
    }
}

fn sparse(policy: Policy, k_b: usize, k_t: usize, reduce: GroupReduce) -> SparseConfig {
    SparseConfig {
        policy,
        block_topk: k_b,
        token_topk: k_t,
        dense_below: 0,
        group_reduce: reduce,
        ..SparseConfig::default()
    }
}

fn policy() -> impl Strategy<Value = Policy> {
    prop::sample::select(vec![Policy::Tls, Policy::Quest, Policy::Ds])
}

fn reduce() -> impl Strategy<Value = GroupReduce> {
    prop::sample::select(vec![GroupReduce::Sum, GroupReduce::Max])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// The block score bounds every q.k in its block, for every query head.
    #[test]
    fn block_bound_dominates_every_key(kind in kind(), len in 1usize..600, bs in prop::sample::select(vec![16usize, 64]), bf16 in any::<bool>(), seed in any::<u64>()) {
        let f = Fixture::new(kind, &[len], bs, if bf16 { KvDType::BF16 } else { KvDType::F32 }, seed);
        let table = f.cache.table(f.seqs[0]).unwrap();
        let sh = f.shape;
        for h in 0..sh.kv_heads {
            let q_group = &f.q[h * sh.group() * sh.key_dim..(h + 1) * sh.group() * sh.key_dim];
            let bounds = block_bounds(f.cache.storage(), 0, h, table.blocks(), q_group).unwrap();
            let nb = table.blocks().len();
            for g in 0..sh.group() {
                let q = &q_group[g * sh.key_dim..(g + 1) * sh.key_dim];
                for t in 0..len {
                    let qk: f32 = q.iter().zip(f.key(0, t, h)).map(|(a, b)| a * b).sum();
                    let bound = bounds[g * nb + t / bs];
                    prop_assert!(bound >= qk - 1e-4 * (1.0 + qk.abs()), "head {h}/{g} token {t}: bound {bound} < q.k {qk}");
                }
            }
        }
    }

    /// With budgets covering the context, every sparse policy equals dense.
    #[test]
    fn full_budget_sparse_equals_dense(kind in kind(), lens in prop::collection::vec(1usize..500, 1..3), policy in policy(), reduce in reduce(), seed in any::<u64>()) {
        let f = Fixture::new(kind, &lens, 16, KvDType::F32, seed);
        let max_len = *lens.iter().max().unwrap();
        let (dense_out, _) = f.run(&SparseConfig { policy: Policy::Dense, ..SparseConfig::default() });
        let (out, report) = f.run(&sparse(policy, max_len.div_ceil(16), max_len, reduce));
        prop_assert!(report.heads.iter().all(|h| !h.dense));
        let err = relative_l2(&out, &dense_out);
        prop_assert!(err <= 1e-5, "{policy}: rel err {err}");
    }

    /// Sink and local window are always attended; selections are sorted,
    /// unique, within budget, and deterministic.
    #[test]
    fn forced_tokens_always_selected(kind in kind(), lens in prop::collection::vec(1usize..900, 1..3), policy in policy(), k_b in 1usize..6, k_t in 1usize..80, reduce in reduce(), seed in any::<u64>()) {
        let bs = 16;
        let f = Fixture::new(kind, &lens, bs, KvDType::BF16, seed);
        let cfg = sparse(policy, k_b, k_t, reduce);
        let (out, report) = f.run(&cfg);
        let (out2, report2) = f.run(&cfg);
        prop_assert_eq!(&out, &out2);
        for (a, b) in report.heads.iter().zip(&report2.heads) {
            prop_assert_eq!(&a.tokens, &b.tokens);
        }
        for (i, sel) in report.heads.iter().enumerate() {
            let len = lens[i / f.shape.kv_heads];
            let forced = forced_blocks(len, bs, cfg.sink_blocks, cfg.local_blocks);
            let forced_tokens: Vec<u32> = forced.iter().flat_map(|&b| b * bs as u32..((b + 1) * bs as u32).min(len as u32)).collect();
            for t in &forced_tokens {
                prop_assert!(sel.tokens.binary_search(t).is_ok(), "forced token {t} missing");
            }
            prop_assert!(sel.tokens.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(sel.tokens.last().is_none_or(|&t| (t as usize) < len));
            let budget = match policy {
                Policy::Quest => k_b * bs,
                _ => k_t,
            };
            prop_assert!(sel.tokens.len() <= forced_tokens.len() + budget);
            // Sink: the first token; local: the newest token.
            prop_assert_eq!(sel.tokens[0], 0);
            prop_assert_eq!(*sel.tokens.last().unwrap() as usize, len - 1);
        }
        let probs = dense_probabilities(f.cache.storage(), &f.seqs.iter().map(|&s| f.cache.table(s).unwrap()).collect::<Vec<_>>(), 0, &f.q, &f.shape);
        let r = recall(&report, &probs, &f.shape);
        prop_assert!((0.0..=1.0 + 1e-6).contains(&r));
    }

    /// The grouped adapter (one KV read per group, GEMM block scores) agrees
    /// with a naive per-query-head implementation: the same blocks chosen by
    /// brute-force bounds, and the same output over the chosen tokens.
    #[test]
    fn adapter_agrees_with_naive_per_head(kind in kind(), len in 100usize..700, k_b in 1usize..8, reduce in reduce(), bf16 in any::<bool>(), seed in any::<u64>()) {
        let bs = 16;
        let f = Fixture::new(kind, &[len], bs, if bf16 { KvDType::BF16 } else { KvDType::F32 }, seed);
        let cfg = sparse(Policy::Quest, k_b, 0, reduce);
        let (out, report) = f.run(&cfg);
        let sh = f.shape;
        let forced = forced_blocks(len, bs, cfg.sink_blocks, cfg.local_blocks);
        let nb = len.div_ceil(bs);
        for h in 0..sh.kv_heads {
            // Brute-force bound per block, per query head, then reduce.
            let mut reduced = vec![0.0f64; nb];
            for g in 0..sh.group() {
                let qh = h * sh.group() + g;
                let q = &f.q[qh * sh.key_dim..(qh + 1) * sh.key_dim];
                for (b, r) in reduced.iter_mut().enumerate() {
                    let bound = f.block_bound(h, b, bs, len, q);
                    *r = match (reduce, g) {
                        (_, 0) => bound,
                        (GroupReduce::Sum, _) => *r + bound,
                        (GroupReduce::Max, _) => r.max(bound),
                    };
                }
            }
            let mut rankable: Vec<usize> = (0..nb).filter(|b| !forced.contains(&(*b as u32))).collect();
            rankable.sort_by(|&a, &b| reduced[b].partial_cmp(&reduced[a]).unwrap().then(a.cmp(&b)));
            rankable.truncate(k_b);
            let mut want: Vec<u32> = forced.iter().copied().chain(rankable.iter().map(|&b| b as u32)).collect();
            want.sort_unstable();
            let sel = &report.heads[h];
            // Blocks whose bounds are within float noise of each other may swap.
            let got_blocks: Vec<u32> = { let mut b: Vec<u32> = sel.tokens.iter().map(|t| t / bs as u32).collect(); b.dedup(); b };
            if got_blocks != want {
                let score = |b: &u32| reduced[*b as usize];
                let worst_kept = got_blocks.iter().filter(|b| !forced.contains(b)).map(score).fold(f64::INFINITY, f64::min);
                let best_dropped = want.iter().filter(|b| !got_blocks.contains(b)).map(score).fold(f64::NEG_INFINITY, f64::max);
                prop_assert!((best_dropped - worst_kept).abs() <= 1e-4 * (1.0 + best_dropped.abs()), "blocks {got_blocks:?} vs naive {want:?}");
            }
            for g in 0..sh.group() {
                let qh = h * sh.group() + g;
                let naive = f.naive_head(0, qh, &sel.tokens);
                let got = &out[qh * sh.value_dim..(qh + 1) * sh.value_dim];
                let err = relative_l2(got, &naive);
                prop_assert!(err <= 1e-5, "head {qh}: rel err {err}");
            }
        }
        // Dense against naive over every token.
        let (dense_out, _) = f.run(&SparseConfig { policy: Policy::Dense, ..SparseConfig::default() });
        let all: Vec<u32> = (0..len as u32).collect();
        for qh in 0..sh.q_heads {
            let naive = f.naive_head(0, qh, &all);
            let err = relative_l2(&dense_out[qh * sh.value_dim..(qh + 1) * sh.value_dim], &naive);
            prop_assert!(err <= 1e-5, "dense head {qh}: rel err {err}");
        }
    }
}

#[test]
fn short_contexts_take_the_dense_path_and_report_bytes() {
    let f = Fixture::new(
        Kind::Gqa {
            q_heads: 8,
            kv_heads: 2,
            head_dim: 64,
        },
        &[300, 5000],
        64,
        KvDType::BF16,
        7,
    );
    let cfg = SparseConfig {
        token_topk: 256,
        block_topk: 16,
        dense_below: 1000,
        ..SparseConfig::default()
    };
    let (_, report) = f.run(&cfg);
    assert!(report.heads[0].dense && report.heads[1].dense);
    assert!(!report.heads[2].dense && !report.heads[3].dense);
    let lens = f.lens();
    let bytes = report.bytes(f.cache.storage());
    let dense = asynctls_attn::DecodeReport::dense_bytes(f.cache.storage(), &lens);
    assert!(bytes.total() < dense, "{bytes:?} vs dense {dense}");
    // 5000 tokens: sink 64 + local 64 + partial 8 + 256 selected.
    assert_eq!(report.heads[2].tokens.len(), 64 + 64 + 8 + 256);
    assert_eq!(report.heads[2].label_scored, 16 * 64);
    assert_eq!(report.heads[2].scored_blocks, 79 - 3);
}

#[test]
fn bad_shapes_are_errors() {
    let f = Fixture::new(
        Kind::Gqa {
            q_heads: 4,
            kv_heads: 2,
            head_dim: 64,
        },
        &[10],
        16,
        KvDType::F32,
        1,
    );
    let table = f.cache.table(f.seqs[0]).unwrap();
    let mut out = vec![0.0; 4 * 64];
    let err = decode(
        f.cache.storage(),
        &[table],
        0,
        &f.q[1..],
        &f.shape,
        &SparseConfig::default(),
        &mut out,
    )
    .unwrap_err();
    assert!(err.to_string().contains("queries"), "{err}");
    let wrong = AttnShape::gqa(4, 1, 64);
    let err = decode(
        f.cache.storage(),
        &[table],
        0,
        &f.q,
        &wrong,
        &SparseConfig::default(),
        &mut out,
    )
    .unwrap_err();
    assert!(err.to_string().contains("KV heads"), "{err}");
    let err = decode(
        f.cache.storage(),
        &[table],
        3,
        &f.q,
        &f.shape,
        &SparseConfig::default(),
        &mut out,
    )
    .unwrap_err();
    assert!(err.to_string().contains("layer 3"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Causal prefill, whole or as a chunk after earlier tokens, equals naive
    /// per-head attention over each token's prefix.
    #[test]
    fn prefill_matches_naive_causal_attention(kind in kind(), len in 1usize..300, split in 0usize..300, bf16 in any::<bool>(), seed in any::<u64>()) {
        let f = Fixture::new(kind, &[len], 16, if bf16 { KvDType::BF16 } else { KvDType::F32 }, seed);
        let sh = f.shape;
        let start = split % len;
        let n = len - start;
        // Queries for the chunk's tokens, drawn from the seed.
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        let q: Vec<f32> = (0..n * sh.q_heads * sh.key_dim).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let mut out = vec![f32::NAN; n * sh.q_heads * sh.value_dim];
        let table = f.cache.table(f.seqs[0]).unwrap();
        asynctls_attn::prefill(f.cache.storage(), table, 0, start, &q, &sh, &mut out).unwrap();
        for i in 0..n {
            let prefix: Vec<u32> = (0..=(start + i) as u32).collect();
            for qh in 0..sh.q_heads {
                let query = &q[(i * sh.q_heads + qh) * sh.key_dim..(i * sh.q_heads + qh + 1) * sh.key_dim];
                let want = f.naive(0, qh / sh.group(), query, &prefix);
                let got = &out[(i * sh.q_heads + qh) * sh.value_dim..(i * sh.q_heads + qh + 1) * sh.value_dim];
                let err = relative_l2(got, &want);
                prop_assert!(err <= 1e-5, "token {} head {qh}: rel err {err}", start + i);
            }
        }
    }
}

/// The label score of token `t` of sequence 0 for query head `qh`, from the
/// stored INT4 codes dequantized one channel at a time (the oracle of
/// `label_scores`), and the exact `q . k` over the same channels.
fn label_oracle(f: &Fixture, qh: usize, t: usize) -> (f64, f64, f64) {
    let c = f.cache.config();
    let (bs, kd) = (c.block_size, c.key_dim);
    let h = qh / f.shape.group();
    let storage = f.cache.storage();
    let block = f.cache.table(f.seqs[0]).unwrap().blocks()[t / bs];
    let (labels, params) = storage.labels(0, block, h);
    let r2 = c.label_channels / 2;
    let slot = t % bs;
    let [scale, zero] = params[slot];
    let (scale, zero) = (scale.to_f32() as f64, zero.to_f32() as f64);
    let q = &f.q[qh * kd..(qh + 1) * kd];
    let key = f.key(0, t, h);
    let (mut approx, mut exact, mut bound) = (0.0f64, 0.0f64, 0.0f64);
    for (i, &ch) in storage.label_channels(0, h).iter().enumerate() {
        let code = asynctls_kvcache::label::code_at(&labels[slot * r2..(slot + 1) * r2], i) as f64;
        let qc = q[ch as usize] as f64;
        approx += qc * (zero + scale * code);
        exact += qc * key[ch as usize] as f64;
        bound += qc.abs() * scale / 2.0;
    }
    (approx, exact, bound)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// tls and ds with budgets below the context pick exactly the tokens a
    /// brute-force implementation of the rule picks: blocks by their bound
    /// (tls), then tokens by their label scores computed channel by channel
    /// from the dequantized codes, the group reduced, ties to the lower
    /// token; plus sink and local window. The label scores themselves stay
    /// within half a quantization step per channel of the exact q . k.
    #[test]
    fn tls_and_ds_select_what_a_brute_force_label_oracle_selects(
        kind in kind(), len in 200usize..700, k_b in 1usize..6, k_t in 1usize..60,
        tls in any::<bool>(), reduce in reduce(), seed in any::<u64>(),
    ) {
        let bs = 16;
        let f = Fixture::new(kind, &[len], bs, KvDType::F32, seed);
        let policy = if tls { Policy::Tls } else { Policy::Ds };
        let cfg = sparse(policy, k_b, k_t, reduce);
        let (_, report) = f.run(&cfg);
        let sh = f.shape;
        let forced = forced_blocks(len, bs, cfg.sink_blocks, cfg.local_blocks);
        let nb = len.div_ceil(bs);
        let rankable: Vec<usize> = (0..nb).filter(|b| !forced.contains(&(*b as u32))).collect();
        let combine = |acc: f64, v: f64, first: bool| match (reduce, first) {
            (_, true) => v,
            (GroupReduce::Sum, false) => acc + v,
            (GroupReduce::Max, false) => acc.max(v),
        };
        for h in 0..sh.kv_heads {
            let heads: Vec<usize> = (0..sh.group()).map(|g| h * sh.group() + g).collect();
            // Stage one (tls): the candidate blocks, by the dense bound.
            let candidates: Vec<usize> = if tls {
                let bound = |b: usize| heads.iter().enumerate().fold(0.0f64, |acc, (i, &qh)| {
                    let q = &f.q[qh * sh.key_dim..(qh + 1) * sh.key_dim];
                    let v = f.block_bound(h, b, bs, len, q);
                    combine(acc, v, i == 0)
                });
                let mut ranked = rankable.clone();
                let scores: Vec<f64> = (0..nb).map(bound).collect();
                ranked.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
                ranked.truncate(k_b);
                ranked.sort_unstable();
                ranked
            } else {
                rankable.clone()
            };
            // Stage two: label scores of the candidates' tokens.
            let tokens: Vec<usize> = candidates.iter().flat_map(|&b| b * bs..(b + 1) * bs).collect();
            let scores: Vec<f64> = tokens.iter().map(|&t| {
                heads.iter().enumerate().fold(0.0, |acc, (i, &qh)| {
                    let (approx, exact, bound) = label_oracle(&f, qh, t);
                    assert!((approx - exact).abs() <= bound * 1.0001 + 1e-6, "label error {} > {bound}", (approx - exact).abs());
                    combine(acc, approx, i == 0)
                })
            }).collect();
            let mut order: Vec<usize> = (0..tokens.len()).collect();
            order.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
            order.truncate(k_t);
            let mut want: Vec<u32> = forced
                .iter()
                .flat_map(|&b| (b as usize * bs) as u32..((b as usize + 1) * bs).min(len) as u32)
                .chain(order.iter().map(|&i| tokens[i] as u32))
                .collect();
            want.sort_unstable();
            let got = &report.heads[h].tokens;
            if got != &want {
                // Only scores within float noise of the cut may differ.
                let score_of = |t: u32| tokens.iter().position(|&x| x == t as usize).map(|i| scores[i]);
                let cut = order.last().map(|&i| scores[i]).unwrap_or(f64::NEG_INFINITY);
                for t in got.iter().filter(|t| !want.contains(t)).chain(want.iter().filter(|t| !got.contains(t))) {
                    // A token kept only by one side: a candidate at the cut, or
                    // (tls) of a block at the block cut.
                    if let Some(s) = score_of(*t) {
                        prop_assert!((s - cut).abs() <= 1e-4 * (1.0 + cut.abs()), "{policy:?} head {h}: token {t} (score {s}, cut {cut}) {got:?} vs {want:?}");
                    } else {
                        prop_assert!(tls, "{policy:?} head {h}: token {t} is not a candidate");
                    }
                }
            }
        }
    }
}
