//! A tiered cache (a resident tier beside the offloaded one, as one
//! backend: `OffloadOptions::resident_tier_blocks`) computes what one plain
//! cache computes: the same prefill and decode logits (relative L2 <= 1e-5)
//! for a batch whose sequences live in different tiers, in interleaved
//! rows, through decode steps, a mixed step and a fork; sequences go to the
//! resident tier while it has room for what they announce, then to the
//! offloaded one; a full cache refuses a prompt and loses nothing; and a
//! property test over random prompts, decode steps, forks and frees. On the
//! CPU (the same code runs over the two GPU backends).

mod common;

use common::{fixture, prompt, rel_err, tiny_tls_plan};

use asynctls_attn::{OffloadOptions, TieredAttention};
use asynctls_kernels::{cpu, Tensor};
use asynctls_kvcache::{KvDType, SeqId};
use asynctls_models::{load_model, AttentionBackend, AttentionPlan, CausalLm};

/// Every logit the run produced, in order, and each sequence's tier.
fn run(model: &dyn CausalLm, backend: &mut dyn AttentionBackend, plan: &AttentionPlan) -> Vec<f32> {
    let vocab = model.vocab_size();
    let mut all = vec![];
    let mut seqs: Vec<SeqId> = vec![];
    let mut next = vec![];
    // A sequence takes the resident tier when the blocks its sequences
    // announced leave room for its own announced tokens plus one: 120 + 20
    // (4 of the tier's 4 blocks) does; nothing after it does.
    for (len, salt) in [(120, 1), (100, 2), (50, 3)] {
        let seq = backend.add_sequence();
        backend.plan_sequence(seq, len + 20);
        let l = model
            .prefill(backend, seq, &prompt(len, vocab, salt), false, 32)
            .unwrap();
        let l = l.to_f32_vec().unwrap();
        next.push(cpu::argmax(&l).unwrap());
        all.extend(l);
        seqs.push(seq);
    }
    // Rows interleaved across the tiers: [second, first, third].
    let order = [seqs[1], seqs[0], seqs[2]];
    let mut ids = vec![next[1], next[0], next[2]];
    for _ in 0..3 {
        let t = Tensor::from_vec(ids.clone(), &[3]).unwrap();
        let l = model
            .decode_step(backend, &order, &t, plan)
            .unwrap()
            .to_f32_vec()
            .unwrap();
        ids = l.chunks_exact(vocab).map(|r| cpu::argmax(r).unwrap()).collect();
        all.extend(l);
    }
    // A fork of the second decodes beside it, and a new prompt rides in a mixed step.
    let fork = backend.fork(order[0]).unwrap();
    let late = backend.add_sequence();
    backend.plan_sequence(late, 40);
    let batch = [order[0], fork, order[1], order[2]];
    let batch_ids = [ids[0], ids[0], ids[1], ids[2]];
    let l = model
        .mixed_step(backend, late, &prompt(30, vocab, 4), &batch, &batch_ids, plan)
        .unwrap()
        .to_f32_vec()
        .unwrap();
    let mut ids: Vec<u32> = l.chunks_exact(vocab).map(|r| cpu::argmax(r).unwrap()).collect();
    all.extend(l);
    let mut everyone = batch.to_vec();
    everyone.push(late);
    let first = ids.remove(0);
    ids.push(first);
    let t = Tensor::from_vec(ids, &[5]).unwrap();
    all.extend(
        model
            .decode_step(backend, &everyone, &t, plan)
            .unwrap()
            .to_f32_vec()
            .unwrap(),
    );
    all
}

#[test]
fn a_tiered_cache_computes_what_one_cache_computes() {
    let model = load_model(&fixture("qwen3-tiny")).unwrap();
    let tls = tiny_tls_plan();
    for (label, plan) in [("dense", AttentionPlan::dense()), ("tls", tls)] {
        let mut plain = model.new_backend(64, KvDType::F32, None).unwrap();
        let want = run(model.as_ref(), plain.as_mut(), &plan);
        let options = OffloadOptions {
            resident_tier_blocks: 4,
            ..OffloadOptions::new(6)
        };
        let mut tiered = model.new_backend(64, KvDType::F32, Some(options)).unwrap();
        let got = run(model.as_ref(), tiered.as_mut(), &plan);
        let e = rel_err(&got, &want);
        println!("{label}: tiered against one cache, logits rel err {e:.1e}");
        assert!(e <= 1e-5, "{label}: logits rel err {e}");
        // Where the sequences went: ids 0..5 are the three prompts, the fork, the late one.
        let t = tiered.as_any_mut().downcast_mut::<TieredAttention>().unwrap();
        let tiers: Vec<Option<usize>> = (0..5).map(|i| t.tier_of(SeqId(i)).unwrap()).collect();
        assert_eq!(
            tiers,
            vec![Some(0), Some(1), Some(1), Some(1), Some(1)],
            "{label}: placement"
        );
        let (hits, misses) = tiered.take_offload_reads().expect("the offloaded tier's reads");
        assert!(hits + misses > 0, "the offloaded tier served no reads");
    }
}

#[test]
fn a_full_tiered_cache_refuses_a_prompt_and_loses_nothing() {
    let model = load_model(&fixture("qwen3-tiny")).unwrap();
    let options = OffloadOptions {
        resident_tier_blocks: 2,
        ..OffloadOptions::new(4)
    };
    // 2 resident blocks and 3 offloaded ones.
    let mut backend = model.new_backend(3, KvDType::F32, Some(options)).unwrap();
    let vocab = model.vocab_size();
    let a = backend.add_sequence();
    model
        .prefill(backend.as_mut(), a, &prompt(100, vocab, 1), false, 32)
        .unwrap();
    let b = backend.add_sequence();
    model
        .prefill(backend.as_mut(), b, &prompt(150, vocab, 2), false, 32)
        .unwrap();
    let used = backend.memory_report().blocks_used;
    let c = backend.add_sequence();
    let err = model
        .prefill(backend.as_mut(), c, &prompt(200, vocab, 3), false, 32)
        .unwrap_err();
    assert!(err.to_string().contains("block"), "{err}");
    assert_eq!(
        backend.memory_report().blocks_used,
        used,
        "the refused prompt kept blocks"
    );
    assert_eq!(backend.seq_len(a).unwrap(), 100);
    assert_eq!(backend.seq_len(b).unwrap(), 150);
    // The running sequences still decode.
    let t = Tensor::from_vec(vec![1u32, 2], &[2]).unwrap();
    model
        .decode_step(backend.as_mut(), &[a, b], &t, &AttentionPlan::dense())
        .unwrap();
}

#[derive(Debug, Clone)]
enum Op {
    /// A new prompt of this many tokens, announcing this many more.
    Prompt(usize, usize),
    /// One decode step of the live sequences whose index bit is set.
    Decode(u32),
    /// Fork live sequence i % live.
    Fork(usize),
    /// Free live sequence i % live.
    Free(usize),
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        (1usize..90, 0usize..40).prop_map(|(n, more)| Op::Prompt(n, more)),
        any::<u32>().prop_map(Op::Decode),
        any::<usize>().prop_map(Op::Fork),
        any::<usize>().prop_map(Op::Free),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
    /// Random prompts, decode steps over random subsets (rows in any
    /// order across the tiers), forks and frees give the same logits on a
    /// tiered cache as on one cache; a fork lives in its parent's tier; no
    /// tier holds more blocks than it has.
    #[test]
    fn a_tiered_cache_follows_one_cache_through_random_steps(ops in proptest::collection::vec(op(), 1..14)) {
        let model = load_model(&fixture("qwen3-tiny")).unwrap();
        let vocab = model.vocab_size();
        let plan = AttentionPlan::dense();
        let mut plain = model.new_backend(64, KvDType::F32, None).unwrap();
        let options = OffloadOptions { resident_tier_blocks: 5, ..OffloadOptions::new(6) };
        let mut tiered = model.new_backend(64, KvDType::F32, Some(options)).unwrap();
        // (plain id, tiered id, last token)
        let mut live: Vec<(SeqId, SeqId, u32)> = vec![];
        for (k, op) in ops.into_iter().enumerate() {
            match op {
                Op::Prompt(n, more) => {
                    let p = prompt(n, vocab, k);
                    let (a, b) = (plain.add_sequence(), tiered.add_sequence());
                    tiered.plan_sequence(b, n + more);
                    let want = model.prefill(plain.as_mut(), a, &p, false, 32).unwrap().to_f32_vec().unwrap();
                    let got = model.prefill(tiered.as_mut(), b, &p, false, 32).unwrap().to_f32_vec().unwrap();
                    proptest::prop_assert!(rel_err(&got, &want) <= 1e-5, "prefill logits");
                    live.push((a, b, cpu::argmax(&want).unwrap()));
                }
                Op::Decode(mask) => {
                    let picked: Vec<usize> = (0..live.len()).filter(|i| mask >> (i % 32) & 1 == 1).rev().collect();
                    // Reversed rows: the batch's order mixes the tiers.
                    if picked.is_empty() || picked.iter().any(|&i| plain.seq_len(live[i].0).unwrap() + 1 > 250) {
                        continue;
                    }
                    let ids: Vec<u32> = picked.iter().map(|&i| live[i].2).collect();
                    let t = Tensor::from_vec(ids, &[picked.len()]).unwrap();
                    let a: Vec<SeqId> = picked.iter().map(|&i| live[i].0).collect();
                    let b: Vec<SeqId> = picked.iter().map(|&i| live[i].1).collect();
                    let want = model.decode_step(plain.as_mut(), &a, &t, &plan).unwrap().to_f32_vec().unwrap();
                    let got = model.decode_step(tiered.as_mut(), &b, &t, &plan).unwrap().to_f32_vec().unwrap();
                    proptest::prop_assert!(rel_err(&got, &want) <= 1e-5, "decode logits");
                    for (row, &i) in picked.iter().enumerate() {
                        live[i].2 = cpu::argmax(&want[row * vocab..(row + 1) * vocab]).unwrap();
                    }
                }
                Op::Fork(i) if !live.is_empty() => {
                    let (a, b, last) = live[i % live.len()];
                    let (fa, fb) = (plain.fork(a).unwrap(), tiered.fork(b).unwrap());
                    let t = tiered.as_any_mut().downcast_mut::<TieredAttention>().unwrap();
                    proptest::prop_assert_eq!(t.tier_of(fb).unwrap(), t.tier_of(b).unwrap(), "a fork left its parent's tier");
                    live.push((fa, fb, last));
                }
                Op::Free(i) if !live.is_empty() => {
                    let (a, b, _) = live.swap_remove(i % live.len());
                    plain.free(a).unwrap();
                    tiered.free(b).unwrap();
                }
                _ => {}
            }
                        // The same blocks in use, split over the tiers.
            proptest::prop_assert_eq!(tiered.memory_report().blocks_used, plain.memory_report().blocks_used);
        }
    }
}
