//! The real-size constructors build models at the real widths with random
//! weights generated in place (no files). Layer count, expert count and
//! vocabulary are cut here so the test fits a CI machine; the widths that
//! shape every matrix are the real ones.

use asynctls_attn::{Policy, SparseConfig};
use asynctls_kvcache::KvDType;
use asynctls_models::{AttentionPlan, CausalLm, GlmConfig, GlmModel, GqaConfig, GqaModel, RandomWeights};

fn run(model: &dyn CausalLm) {
    let mut backend = model.new_backend(4, KvDType::BF16, None).unwrap();
    let seq = backend.add_sequence();
    let logits = model.prefill(backend.as_mut(), seq, &[1, 2, 3, 4], false, 2).unwrap();
    let logits = logits.to_f32_vec().unwrap();
    assert_eq!(logits.len(), model.vocab_size());
    assert!(logits.iter().all(|v| v.is_finite()));
    let plan = AttentionPlan {
        sparse: SparseConfig {
            policy: Policy::Tls,
            dense_below: 0,
            ..SparseConfig::default()
        },
        dense_layers: 0,
    };
    let ids = asynctls_kernels::Tensor::from_vec(vec![5u32], &[1]).unwrap();
    let logits = model
        .decode_step(backend.as_mut(), &[seq], &ids, &plan)
        .unwrap()
        .to_f32_vec()
        .unwrap();
    assert!(logits.iter().all(|v| v.is_finite()));
}

#[test]
fn glm_4_7_flash_widths_build_and_run() {
    let full = GlmConfig::glm_4_7_flash();
    assert_eq!(
        (full.num_hidden_layers, full.n_routed_experts, full.vocab_size),
        (47, 64, 154_880)
    );
    let config = GlmConfig {
        num_hidden_layers: 2,
        moe_layers: vec![false, true],
        n_routed_experts: 4,
        vocab_size: 512,
        ..full
    };
    let model = GlmModel::load(config, &RandomWeights { seed: 1, std: 0.02 }).unwrap();
    run(&model);
    // The cache holds the 576-wide latent per layer, whatever the head count.
    let report = model.new_cache(1, KvDType::BF16).unwrap().memory_report();
    assert_eq!(report.kv_bytes_per_token(), 2 * 576 * 2);
}

#[test]
fn qwen3_8b_widths_build_and_run() {
    let full = GqaConfig::preset("qwen3-8b").unwrap();
    let config = GqaConfig {
        num_hidden_layers: 1,
        vocab_size: 512,
        ..full
    };
    let model = GqaModel::load(config, &RandomWeights { seed: 2, std: 0.02 }).unwrap();
    run(&model);
    let report = model.new_cache(1, KvDType::BF16).unwrap().memory_report();
    assert_eq!(report.kv_bytes_per_token(), 8 * 128 * 2 * 2);
}
