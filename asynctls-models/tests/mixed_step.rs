//! A prefill chunk carried by a decode step (`CausalLm::mixed_step`) gives
//! what running the two apart gives: the chunk's last logits and the
//! batch's logits within f32 rounding (relative L2 <= 1e-5; the GEMMs see
//! more rows, so sums may group differently), and caches that decode the
//! same next step. For the GQA family (Qwen3, Llama) and GLM (MLA + MoE),
//! dense and with tls selections below the context, on the CPU.

mod common;

use common::{fixture, prompt, rel_err, tiny_tls_plan};

use asynctls_kernels::{cpu, Tensor};
use asynctls_kvcache::{KvDType, SeqId};
use asynctls_models::{load_model, AttentionPlan, CausalLm, ModelError};

/// Two sequences decoding and a third prefilled in two chunks: the second
/// chunk either alone then a decode step, or in one mixed step.
/// Returns the errors and the separate run's batch logits.
fn compare(model: &dyn CausalLm, plan: &AttentionPlan) -> ((f32, f32, f32), Vec<f32>) {
    let vocab = model.vocab_size();
    // Long enough (4 blocks of 64) for tls's block and token stages to cut.
    let decoding = [prompt(200, vocab, 1), prompt(150, vocab, 2)];
    let prefilling = prompt(230, vocab, 3);
    let (first, second) = prefilling.split_at(100);
    let mut runs = vec![];
    for mixed in [false, true] {
        let mut backend = model.new_backend(64, KvDType::F32, None).unwrap();
        let mut seqs = vec![];
        let mut next = vec![];
        for p in &decoding {
            let seq = backend.add_sequence();
            let logits = model.prefill(backend.as_mut(), seq, p, false, 16).unwrap();
            next.push(cpu::argmax(&logits.to_f32_vec().unwrap()).unwrap());
            seqs.push(seq);
        }
        let late = backend.add_sequence();
        model.prefill(backend.as_mut(), late, first, false, 16).unwrap();
        let (chunk, batch) = if mixed {
            let logits = model
                .mixed_step(backend.as_mut(), late, second, &seqs, &next, plan)
                .unwrap()
                .to_f32_vec()
                .unwrap();
            (logits[..vocab].to_vec(), logits[vocab..].to_vec())
        } else {
            let ids = Tensor::from_vec(next.clone(), &[next.len()]).unwrap();
            let batch = model.decode_step(backend.as_mut(), &seqs, &ids, plan).unwrap();
            let chunk = model.prefill(backend.as_mut(), late, second, false, 64).unwrap();
            (chunk.to_f32_vec().unwrap(), batch.to_f32_vec().unwrap())
        };
        // One more step of all three on the cache each way left.
        let mut all: Vec<SeqId> = seqs.clone();
        all.push(late);
        let mut ids: Vec<u32> = batch.chunks_exact(vocab).map(|r| cpu::argmax(r).unwrap()).collect();
        ids.push(cpu::argmax(&chunk).unwrap());
        let after = model
            .decode_step(backend.as_mut(), &all, &Tensor::from_vec(ids, &[3]).unwrap(), plan)
            .unwrap()
            .to_f32_vec()
            .unwrap();
        runs.push((chunk, batch, after));
    }
    (
        (
            rel_err(&runs[1].0, &runs[0].0),
            rel_err(&runs[1].1, &runs[0].1),
            rel_err(&runs[1].2, &runs[0].2),
        ),
        runs.swap_remove(0).1,
    )
}

#[test]
fn a_mixed_step_gives_the_separate_steps_logits() {
    let tls = tiny_tls_plan();
    for name in ["qwen3-tiny", "llama-mha", "glm-tiny-grouped"] {
        let model = load_model(&fixture(name)).unwrap();
        let mut batches = vec![];
        for (label, plan) in [("dense", AttentionPlan::dense()), ("tls", tls.clone())] {
            let ((chunk, batch, after), logits) = compare(model.as_ref(), &plan);
            println!("{name} {label}: chunk {chunk:.1e}, batch {batch:.1e}, next step {after:.1e}");
            for (what, e) in [("chunk", chunk), ("batch", batch), ("next step", after)] {
                assert!(e <= 1e-5, "{name} {label}: {what} logits rel err {e}");
            }
            batches.push(logits);
        }
        // tls selected below the context: its decode logits are not dense's.
        let apart = rel_err(&batches[1], &batches[0]);
        assert!(
            apart > 1e-4,
            "{name}: tls gave dense's logits ({apart:.1e}): nothing was cut"
        );
    }
}

#[test]
fn a_mixed_step_refuses_what_its_parts_refuse() {
    let model = load_model(&fixture("qwen3-tiny")).unwrap();
    let mut backend = model.new_backend(64, KvDType::F32, None).unwrap();
    let plan = AttentionPlan::dense();
    let a = backend.add_sequence();
    model.prefill(backend.as_mut(), a, &[1, 2, 3], false, 16).unwrap();
    let late = backend.add_sequence();
    // A sequence cannot be both the chunk's and the batch's.
    assert!(model
        .mixed_step(backend.as_mut(), a, &[4, 5], &[a], &[6], &plan)
        .is_err());
    // Ids and batch of different lengths, an empty chunk, an id past the vocabulary.
    assert!(model
        .mixed_step(backend.as_mut(), late, &[4, 5], &[a], &[6, 7], &plan)
        .is_err());
    assert!(matches!(
        model.mixed_step(backend.as_mut(), late, &[], &[a], &[6], &plan),
        Err(ModelError::EmptyPrompt)
    ));
    let vocab = model.vocab_size() as u32;
    assert!(matches!(
        model.mixed_step(backend.as_mut(), late, &[vocab], &[a], &[6], &plan),
        Err(ModelError::TokenOutOfRange { .. })
    ));
    // None of the refusals reserved anything.
    assert_eq!(backend.seq_len(a).unwrap(), 3);
    assert_eq!(backend.seq_len(late).unwrap(), 0);
}
