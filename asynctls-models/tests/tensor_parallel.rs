//! The CPU twin of tensor parallelism: a model split over 2 ranks (ranks as
//! threads, the all-reduce as a sum) gives the unsharded model's logits
//! (max abs error <= 1e-4: the partial sums round in another order) and the
//! same greedy tokens, dense and with sparse selections below the context
//! (each rank selects over its own KV heads, as the unsharded model does per
//! head); shard counts that do not divide the heads are refused; the
//! engine's backend over the ranks reports the whole model's cache.

use std::path::{Path, PathBuf};

use asynctls_attn::{Policy, SparseConfig};
use asynctls_kernels::{cpu, Tensor};
use asynctls_kvcache::KvDType;
use asynctls_models::{AttentionPlan, CausalLm, GqaConfig, GqaModel, TensorParallelGqa, Weights};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn max_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn two_ranks_give_the_unsharded_logits_and_tokens() {
    for name in ["qwen3-tiny", "qwen2-bias", "llama-mha"] {
        let dir = fixture(name);
        let config = GqaConfig::from_file(&dir.join("config.json")).unwrap();
        let weights = Weights::open(&dir).unwrap();
        let full = GqaModel::load(config.clone(), &weights).unwrap();
        let tp = TensorParallelGqa::load(config, &weights, 2).unwrap();
        // 150 tokens: two full blocks of 64, so k_b 1 and k_t 8 cut.
        let prompt: Vec<u32> = (0..150).map(|i| (i * 37 % full.config().vocab_size) as u32).collect();
        let sparse = AttentionPlan {
            sparse: SparseConfig {
                policy: Policy::Tls,
                block_topk: 1,
                token_topk: 8,
                sink_blocks: 0,
                local_blocks: 0,
                dense_below: 0,
                ..SparseConfig::default()
            },
            dense_layers: 0,
        };
        let mut first_dense: Option<Vec<f32>> = None;
        for (label, plan) in [("dense", AttentionPlan::dense()), ("tls", sparse)] {
            let mut one = full.new_backend(16, KvDType::F32, None).unwrap();
            let mut many = tp.new_backends(16, KvDType::F32).unwrap();
            let seq = one.add_sequence();
            for b in many.iter_mut() {
                assert_eq!(b.add_sequence(), seq);
            }
            let want = full
                .prefill(one.as_mut(), seq, &prompt, true, prompt.len())
                .unwrap()
                .to_f32_vec()
                .unwrap();
            let got = tp.prefill(&mut many, seq, &prompt).unwrap().to_f32_vec().unwrap();
            let e = max_err(&got, &want);
            assert!(e <= 1e-4, "{name} {label}: prefill logits differ by {e}");
            let vocab = tp.vocab_size();
            let mut next = cpu::argmax(&want[want.len() - vocab..]).unwrap();
            let mut worst = e;
            for step in 0..6 {
                let ids = Tensor::from_vec(vec![next], &[1]).unwrap();
                let want = full
                    .decode_step(one.as_mut(), &[seq], &ids, &plan)
                    .unwrap()
                    .to_f32_vec()
                    .unwrap();
                if step == 0 {
                    match &first_dense {
                        None => first_dense = Some(want.clone()),
                        // The selection is real: tls's first step is not dense's.
                        Some(d) => assert!(max_err(d, &want) > 1e-4, "{name}: tls attended everything"),
                    }
                }
                let got = tp
                    .decode(&mut many, &[seq], &[next], &plan)
                    .unwrap()
                    .to_f32_vec()
                    .unwrap();
                worst = worst.max(max_err(&got, &want));
                let (a, b) = (cpu::argmax(&got).unwrap(), cpu::argmax(&want).unwrap());
                assert_eq!(a, b, "{name} {label}: greedy tokens differ");
                next = b;
            }
            println!("{name} {label}: 2 ranks vs unsharded, logits max abs err {worst:.1e}, 6 greedy tokens equal");
            assert!(worst <= 1e-4, "{name} {label}: decode logits differ by {worst}");
        }
    }
}

#[test]
fn shard_counts_that_do_not_divide_the_heads_are_refused() {
    let dir = fixture("qwen3-tiny");
    let config = GqaConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::open(&dir).unwrap();
    for ranks in [0, 3] {
        let err = TensorParallelGqa::load(config.clone(), &weights, ranks)
            .unwrap_err()
            .to_string();
        assert!(err.contains("divide"), "{err}");
    }
}

/// The engine's one backend over the ranks reports the whole model's cache
/// (each rank holds its KV heads' share), as the unsharded model's does:
/// what `serve` sizes its pool by and shows in `/metrics`.
#[test]
fn the_ranks_backend_reports_the_whole_models_cache() {
    let dir = fixture("qwen3-tiny");
    let config = GqaConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::open(&dir).unwrap();
    let full = GqaModel::load(config.clone(), &weights).unwrap();
    let tp = TensorParallelGqa::load(config, &weights, 2).unwrap();
    let one = full.new_backend(16, KvDType::F32, None).unwrap().memory_report();
    let many = CausalLm::new_backend(&tp, 16, KvDType::F32, None)
        .unwrap()
        .memory_report();
    assert_eq!(many.key_bytes_per_token, one.key_bytes_per_token);
    assert_eq!(many.value_bytes_per_token, one.value_bytes_per_token);
    assert_eq!(many.label_bytes_per_token, one.label_bytes_per_token);
    assert_eq!(many.metadata_bytes_per_token, one.metadata_bytes_per_token);
    assert_eq!(many.storage_bytes, one.storage_bytes);
    assert_eq!((many.blocks_used, many.blocks_total), (0, 16));
}
