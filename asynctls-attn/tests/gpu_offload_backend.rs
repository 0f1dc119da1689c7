//! The offloaded GPU cache against the resident one: two `CudaAttention`s
//! fed identical random keys, values and queries through the backend
//! interface a model uses (prefill chunks, a fork, then decode steps with
//! tls, dense and quest). The offloaded one keeps its K/V in pinned host
//! memory with few resident slots (so units are promoted and evicted every
//! step) and reads the same bf16 rows, from slots or in place from the
//! host, so every output must equal the resident backend's to 1e-6
//! (relative L2), and its bounds, labels and host tier must equal the
//! resident pool's bit for bit; every resident slot must hold its unit's
//! host rows (write-through). Seeds are printed. Without a GPU the test
//! prints `skipped: no CUDA device` and passes.

use asynctls_attn::{AttentionBackend, AttnShape, CudaAttention, OffloadOptions, Policy, SparseConfig};
use asynctls_kernels::{CudaDevice, Device, Tensor};
use asynctls_kvcache::{CacheConfig, KvDType, LabelChannels, SeqId};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let norm = want.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt() / norm
}

#[test]
fn offloaded_gpu_cache_attends_as_the_resident_one() {
    let Some(dev) = CudaDevice::for_tests() else { return };
    let gpu = Device::Cuda(dev.clone());
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let stream = dev.stream().clone();
    for (shape, lens) in [
        (AttnShape::gqa(32, 8, 128), vec![5000usize, 2300]),
        (AttnShape::gqa(14, 2, 64), vec![4100, 700, 30]),
    ] {
        let layers = 2;
        let config = CacheConfig {
            kv_dtype: KvDType::BF16,
            ..CacheConfig::gqa(layers, shape.kv_heads, shape.key_dim, 256)
        };
        let head = asynctls_attn::calibrate::low_frequency_channels(config.key_dim, config.label_channels);
        let channels = LabelChannels::new(vec![vec![head; config.kv_heads]; layers]);
        let mut resident = CudaAttention::new(&dev, &config, channels.clone()).unwrap();
        // Fewer slots than one step attends: promotions evict every step.
        let slots = 24 * shape.kv_heads;
        let mut offloaded = CudaAttention::offloaded(&dev, &config, channels, OffloadOptions::new(slots)).unwrap();
        let kw = shape.kv_heads * shape.key_dim;
        let qw = shape.q_heads * shape.key_dim;
        let mut seqs: Vec<(SeqId, SeqId)> = vec![];
        for &len in &lens {
            let (a, b) = (resident.add_sequence(), offloaded.add_sequence());
            // Chunks of at most 2048 whose ends fall inside blocks.
            for start in (0..len).step_by(2000) {
                let n = 2000.min(len - start);
                let sa = resident.begin_prefill(a, n, 1 << 20).unwrap();
                let sb = offloaded.begin_prefill(b, n, 1 << 20).unwrap();
                for layer in 0..layers {
                    let k = Tensor::from_vec(random(&mut rng, n * kw), &[n, kw])
                        .unwrap()
                        .to_device(&gpu)
                        .unwrap();
                    let v = Tensor::from_vec(random(&mut rng, n * kw), &[n, kw])
                        .unwrap()
                        .to_device(&gpu)
                        .unwrap();
                    resident.write_kv(&sa, layer, &k, &v).unwrap();
                    offloaded.write_kv(&sb, layer, &k, &v).unwrap();
                    let q = Tensor::from_vec(random(&mut rng, n * qw), &[n, qw])
                        .unwrap()
                        .to_device(&gpu)
                        .unwrap();
                    let want = resident
                        .attend(&sa, layer, &q, &shape, &SparseConfig::default())
                        .unwrap();
                    let got = offloaded
                        .attend(&sb, layer, &q, &shape, &SparseConfig::default())
                        .unwrap();
                    let e = rel_err(&got.to_f32_vec().unwrap(), &want.to_f32_vec().unwrap());
                    assert!(e <= 1e-6, "{shape:?} prefill at {start} layer {layer}: rel err {e}");
                }
            }
            seqs.push((a, b));
        }
        // A fork of the first sequence decodes beside it: its partial block
        // is copied on write (through the host tier) and its full blocks
        // are shared with the parent's rows in the same step.
        let fork = (resident.fork(seqs[0].0).unwrap(), offloaded.fork(seqs[0].1).unwrap());
        seqs.push(fork);
        let tls = SparseConfig {
            policy: Policy::Tls,
            block_topk: 8,
            token_topk: 256,
            dense_below: 0,
            ..SparseConfig::default()
        };
        let quest = SparseConfig {
            policy: Policy::Quest,
            block_topk: 6,
            ..tls.clone()
        };
        let dense = SparseConfig {
            policy: Policy::Dense,
            ..tls.clone()
        };
        let (rs, os): (Vec<SeqId>, Vec<SeqId>) = seqs.iter().copied().unzip();
        let batch = rs.len();
        for step in 0..8 {
            let sparse = [&tls, &tls, &dense, &tls, &quest, &tls, &tls, &tls][step];
            let sa = resident.begin_decode(&rs, 1 << 20).unwrap();
            let sb = offloaded.begin_decode(&os, 1 << 20).unwrap();
            for layer in 0..layers {
                let k = Tensor::from_vec(random(&mut rng, batch * kw), &[batch, kw])
                    .unwrap()
                    .to_device(&gpu)
                    .unwrap();
                let v = Tensor::from_vec(random(&mut rng, batch * kw), &[batch, kw])
                    .unwrap()
                    .to_device(&gpu)
                    .unwrap();
                resident.write_kv(&sa, layer, &k, &v).unwrap();
                offloaded.write_kv(&sb, layer, &k, &v).unwrap();
                let q = Tensor::from_vec(random(&mut rng, batch * qw), &[batch, qw])
                    .unwrap()
                    .to_device(&gpu)
                    .unwrap();
                let want = resident.attend(&sa, layer, &q, &shape, sparse).unwrap();
                let got = offloaded.attend(&sb, layer, &q, &shape, sparse).unwrap();
                let e = rel_err(&got.to_f32_vec().unwrap(), &want.to_f32_vec().unwrap());
                assert!(
                    e <= 1e-6,
                    "{shape:?} {:?} step {step} layer {layer}: rel err {e}",
                    sparse.policy
                );
                if sparse.policy != Policy::Dense {
                    assert_eq!(
                        offloaded.last_selection().unwrap(),
                        resident.last_selection().unwrap(),
                        "{shape:?} step {step} layer {layer}: selections differ"
                    );
                }
            }
        }
        // The cache's state: bounds, labels and rows equal; slots coherent.
        let residency = offloaded.residency().unwrap();
        let stats = residency.stats().unwrap();
        for (layer, st) in stats.iter().enumerate() {
            let (r, o) = (
                resident.cache().storage().layer(layer),
                offloaded.cache().storage().layer(layer),
            );
            assert_eq!(
                stream.clone_dtoh(&o.bounds).unwrap(),
                stream.clone_dtoh(&r.bounds).unwrap()
            );
            assert_eq!(
                stream.clone_dtoh(&o.labels).unwrap(),
                stream.clone_dtoh(&r.labels).unwrap()
            );
            assert_eq!(
                stream.clone_dtoh(&o.label_params).unwrap(),
                stream.clone_dtoh(&r.label_params).unwrap()
            );
            let (host_keys, host_values) = residency.pools.host(layer);
            let host_values = host_values.unwrap();
            assert!(
                host_keys == stream.clone_dtoh(&r.keys).unwrap().as_slice(),
                "layer {layer}: host keys"
            );
            assert!(
                host_values == stream.clone_dtoh(r.values.as_ref().unwrap()).unwrap().as_slice(),
                "layer {layer}: host values"
            );
            let tables = residency.tables(layer).unwrap();
            let slot_keys = stream.clone_dtoh(&residency.pools.slot_keys[layer]).unwrap();
            let slot_values = stream.clone_dtoh(&residency.pools.slot_values[layer]).unwrap();
            let unit = config.block_size * config.key_dim;
            let mut resident_units = 0;
            for (slot, &u) in tables.slot_unit.iter().enumerate() {
                // A slot whose unit now lives in another slot is stale and never read.
                if u < 0 || tables.unit_slot[u as usize] != slot as i32 {
                    continue;
                }
                resident_units += 1;
                let (s, h) = (
                    slot * unit..(slot + 1) * unit,
                    u as usize * unit..(u as usize + 1) * unit,
                );
                assert!(
                    slot_keys[s.clone()] == host_keys[h.clone()],
                    "layer {layer} slot {slot}: keys"
                );
                assert!(slot_values[s] == host_values[h], "layer {layer} slot {slot}: values");
            }
            println!(
                "{shape:?} layer {layer}: {resident_units} of {slots} slots coherent; {} requested, {} hits, {} misses, \
                 {} promoted, {} evicted",
                st.requested, st.hits, st.misses, st.promoted, st.evicted
            );
            assert!(
                resident_units > 0 && st.hits > 0 && st.misses > 0 && st.evicted > 0,
                "{st:?}"
            );
        }
        assert!(offloaded.take_offload_reads().is_some_and(|(h, m)| h > 0 && m > 0));
    }
}
