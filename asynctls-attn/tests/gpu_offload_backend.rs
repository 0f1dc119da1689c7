//! The offloaded GPU cache against the resident one (GQA at two shapes and
//! GLM's MLA latent cache): two `CudaAttention`s
//! fed identical random keys, values and queries through the backend
//! interface a model uses: prefill chunks, a fork decoding beside its
//! parent, decode steps with tls, dense and quest, then a sequence freed,
//! a new prompt prefilled into its reused blocks (whose units may still
//! hold slots) and forked (copy-on-write into a reused block), and more
//! decode steps over all of them. The offloaded one keeps its K/V in pinned host
//! memory with few resident slots (so units are promoted and evicted every
//! step) and reads the same bf16 rows, from slots or in place from the
//! host, so every output must equal the resident backend's to 1e-6
//! (relative L2), and its bounds, labels and host tier must equal the
//! resident pool's bit for bit; every resident slot must hold its unit's
//! host rows (write-through), and the tables must be each other's inverse
//! (a unit the fork and its parent both miss is promoted once). Seeds are printed. Without a GPU the test
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

/// The two backends side by side, fed the same inputs.
struct Pair {
    resident: CudaAttention,
    offloaded: CudaAttention,
    shape: AttnShape,
    layers: usize,
    gpu: Device,
}

impl Pair {
    fn tensor(&self, rng: &mut StdRng, rows: usize, width: usize) -> Tensor {
        Tensor::from_vec(random(rng, rows * width), &[rows, width])
            .unwrap()
            .to_device(&self.gpu)
            .unwrap()
    }

    fn add(&mut self) -> (SeqId, SeqId) {
        (self.resident.add_sequence(), self.offloaded.add_sequence())
    }

    /// `len` prompt tokens of `seq` in chunks of 2000 (ends inside blocks),
    /// each chunk's attention compared.
    fn prefill(&mut self, rng: &mut StdRng, seq: (SeqId, SeqId), len: usize) {
        let (kw, qw) = (
            self.shape.kv_heads * self.shape.key_dim,
            self.shape.q_heads * self.shape.key_dim,
        );
        for start in (0..len).step_by(2000) {
            let n = 2000.min(len - start);
            let sa = self.resident.begin_prefill(seq.0, n, 1 << 20).unwrap();
            let sb = self.offloaded.begin_prefill(seq.1, n, 1 << 20).unwrap();
            for layer in 0..self.layers {
                let (k, v, q) = (
                    self.tensor(rng, n, kw),
                    self.tensor(rng, n, kw),
                    self.tensor(rng, n, qw),
                );
                self.resident.write_kv(&sa, layer, &k, &v).unwrap();
                self.offloaded.write_kv(&sb, layer, &k, &v).unwrap();
                let dense = SparseConfig::default();
                let want = self.resident.attend(&sa, layer, &q, &self.shape, &dense).unwrap();
                let got = self.offloaded.attend(&sb, layer, &q, &self.shape, &dense).unwrap();
                let e = rel_err(&got.to_f32_vec().unwrap(), &want.to_f32_vec().unwrap());
                assert!(
                    e <= 1e-6,
                    "{:?} prefill at {start} layer {layer}: rel err {e}",
                    self.shape
                );
            }
        }
    }

    /// One decode step of `seqs` under `sparse`; outputs and selections compared.
    fn decode(&mut self, rng: &mut StdRng, seqs: &[(SeqId, SeqId)], sparse: &SparseConfig, step: usize) {
        let (rs, os): (Vec<SeqId>, Vec<SeqId>) = seqs.iter().copied().unzip();
        let batch = rs.len();
        let (kw, qw) = (
            self.shape.kv_heads * self.shape.key_dim,
            self.shape.q_heads * self.shape.key_dim,
        );
        let sa = self.resident.begin_decode(&rs, 1 << 20).unwrap();
        let sb = self.offloaded.begin_decode(&os, 1 << 20).unwrap();
        for layer in 0..self.layers {
            let (k, v, q) = (
                self.tensor(rng, batch, kw),
                self.tensor(rng, batch, kw),
                self.tensor(rng, batch, qw),
            );
            self.resident.write_kv(&sa, layer, &k, &v).unwrap();
            self.offloaded.write_kv(&sb, layer, &k, &v).unwrap();
            let want = self.resident.attend(&sa, layer, &q, &self.shape, sparse).unwrap();
            let got = self.offloaded.attend(&sb, layer, &q, &self.shape, sparse).unwrap();
            let e = rel_err(&got.to_f32_vec().unwrap(), &want.to_f32_vec().unwrap());
            assert!(
                e <= 1e-6,
                "{:?} {:?} step {step} layer {layer}: rel err {e}",
                self.shape,
                sparse.policy
            );
            if sparse.policy != Policy::Dense {
                assert_eq!(
                    self.offloaded.last_selection().unwrap(),
                    self.resident.last_selection().unwrap(),
                    "{:?} step {step} layer {layer}: selections differ",
                    self.shape
                );
            }
        }
    }
}

#[test]
fn offloaded_gpu_cache_attends_as_the_resident_one() {
    let Some(dev) = CudaDevice::for_tests() else { return };
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let stream = dev.stream().clone();
    for (shape, lens) in [
        (AttnShape::gqa(32, 8, 128), vec![5000usize, 2300]),
        (AttnShape::gqa(14, 2, 64), vec![4100, 700, 30]),
        // GLM-4.7-Flash's latent cache: one KV head of 512 + 64, values in the keys.
        (AttnShape::mla(20, 512, 64, 1.0 / 16.0), vec![4500, 1300]),
    ] {
        let layers = 2;
        let mla = shape.value_dim != shape.key_dim;
        let config = CacheConfig {
            kv_dtype: KvDType::BF16,
            ..if mla {
                CacheConfig::mla(layers, shape.value_dim, shape.key_dim - shape.value_dim, 256)
            } else {
                CacheConfig::gqa(layers, shape.kv_heads, shape.key_dim, 256)
            }
        };
        let head = asynctls_attn::calibrate::low_frequency_channels(config.key_dim, config.label_channels);
        let channels = LabelChannels::new(vec![vec![head; config.kv_heads]; layers]);
        // Fewer slots than one step attends: promotions evict every step.
        let slots = 24 * shape.kv_heads;
        let mut pair = Pair {
            resident: CudaAttention::new(&dev, &config, channels.clone()).unwrap(),
            offloaded: CudaAttention::offloaded(&dev, &config, channels, OffloadOptions::new(slots)).unwrap(),
            shape,
            layers,
            gpu: Device::Cuda(dev.clone()),
        };
        let mut seqs = vec![];
        for &len in &lens {
            let seq = pair.add();
            pair.prefill(&mut rng, seq, len);
            seqs.push(seq);
        }
        // A fork of the first sequence decodes beside it: its partial block
        // is copied on write (through the host tier) and its full blocks
        // are shared with the parent's rows in the same step.
        let fork = (
            pair.resident.fork(seqs[0].0).unwrap(),
            pair.offloaded.fork(seqs[0].1).unwrap(),
        );
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
        for (step, sparse) in [&tls, &tls, &dense, &tls, &quest, &tls, &tls, &tls]
            .into_iter()
            .enumerate()
        {
            pair.decode(&mut rng, &seqs, sparse, step);
        }
        // The fork's blocks go back to the pool with their units resident;
        // a new prompt reuses them (its rows written through to those
        // slots), and its fork copies a partial block into another reused
        // block.
        let freed = seqs.pop().unwrap();
        pair.resident.free(freed.0).unwrap();
        pair.offloaded.free(freed.1).unwrap();
        let fresh = pair.add();
        pair.prefill(&mut rng, fresh, 300);
        let copy = (
            pair.resident.fork(fresh.0).unwrap(),
            pair.offloaded.fork(fresh.1).unwrap(),
        );
        seqs.extend([fresh, copy]);
        for step in 8..12 {
            pair.decode(&mut rng, &seqs, &tls, step);
        }
        // The cache's state: bounds, labels and rows equal; slots coherent.
        let (resident, offloaded) = (&pair.resident, &mut pair.offloaded);
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
            // MLA keeps no value pools (its values are the keys' latent part).
            assert_eq!(host_values.is_none(), mla);
            // Rows of blocks in use must match; a freed block's rows past its
            // new owner's may differ (never read), so compare the blocks the
            // sequences hold, up to their lengths.
            let (resident_keys, resident_values) = (
                stream.clone_dtoh(&r.keys).unwrap(),
                r.values.as_ref().map(|v| stream.clone_dtoh(v).unwrap()),
            );
            let (bs, d, kvh) = (config.block_size, config.key_dim, config.kv_heads);
            for &(rseq, oseq) in &seqs {
                let (rt, ot) = (
                    resident.cache().table(rseq).unwrap(),
                    offloaded.cache().table(oseq).unwrap(),
                );
                assert_eq!(rt.blocks(), ot.blocks(), "both caches allocate alike");
                for (i, b) in rt.blocks().iter().enumerate() {
                    let rows = (rt.len() - i * bs).min(bs);
                    for h in 0..kvh {
                        let at = ((b.0 as usize * kvh + h) * bs) * d;
                        let span = at..at + rows * d;
                        assert!(
                            host_keys[span.clone()] == resident_keys[span.clone()],
                            "layer {layer}: host keys"
                        );
                        if let (Some(hv), Some(rv)) = (host_values, &resident_values) {
                            assert!(hv[span.clone()] == rv[span], "layer {layer}: host values");
                        }
                    }
                }
            }
            let tables = residency.tables(layer).unwrap();
            let slot_keys = stream.clone_dtoh(&residency.pools.slot_keys[layer]).unwrap();
            let slot_values = residency
                .pools
                .slot_values
                .get(layer)
                .map(|v| stream.clone_dtoh(v).unwrap());
            let unit = bs * d;
            let mut resident_units = 0;
            for (slot, &u) in tables.slot_unit.iter().enumerate() {
                if u < 0 {
                    continue;
                }
                // The fork and its parent miss shared units in one step; each
                // is promoted once, so no slot is left claiming a unit that
                // lives elsewhere.
                assert_eq!(
                    tables.unit_slot[u as usize], slot as i32,
                    "layer {layer}: slot {slot} is stale"
                );
                resident_units += 1;
                let (s, h) = (
                    slot * unit..(slot + 1) * unit,
                    u as usize * unit..(u as usize + 1) * unit,
                );
                assert!(
                    slot_keys[s.clone()] == host_keys[h.clone()],
                    "layer {layer} slot {slot}: keys"
                );
                if let (Some(sv), Some(hv)) = (&slot_values, host_values) {
                    assert!(sv[s] == hv[h], "layer {layer} slot {slot}: values");
                }
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
