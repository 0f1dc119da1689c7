//! The two attention backends on the same K/V: `CudaAttention` (GPU cache,
//! selection and attention kernels) against `CpuAttention` (the host
//! reference), both fed identical random keys, values and queries through
//! the backend interface a model uses (prefill chunks, then decode steps).
//! With budgets below the context (tls and quest), the GPU's token
//! selections must equal the CPU's for every (sequence, KV head), and the
//! outputs agree within the bf16 bound (relative L2 error <= 1e-2). Seeds are printed. Without a GPU
//! every test prints `skipped: no CUDA device` and passes.

use asynctls_attn::{AttentionBackend, AttnShape, CpuAttention, CudaAttention, Policy, SparseConfig};
use asynctls_kernels::{CudaDevice, Device, Tensor};
use asynctls_kvcache::{CacheConfig, HostKvStorage, KvDType, LabelChannels, PagedKvCache, SeqId};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    let norm = want.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt() / norm
}

#[test]
fn gpu_backend_selects_what_the_cpu_selects() {
    let Some(dev) = CudaDevice::for_tests() else { return };
    let gpu = Device::Cuda(dev.clone());
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    for (shape, lens) in [
        (AttnShape::gqa(32, 8, 128), vec![5000usize, 2300]),
        (AttnShape::gqa(14, 2, 64), vec![4100, 700, 30]),
        // GLM-4.7-Flash's latent cache: one KV head of 512 + 64, values in the keys.
        (AttnShape::mla(20, 512, 64, 1.0 / 16.0), vec![4500, 1300]),
    ] {
        let layers = 2;
        let mla = shape.kv_heads == 1 && shape.value_dim != shape.key_dim;
        let config = CacheConfig {
            kv_dtype: KvDType::BF16,
            ..if mla {
                CacheConfig::mla(layers, shape.value_dim, shape.key_dim - shape.value_dim, 256)
            } else {
                CacheConfig::gqa(layers, shape.kv_heads, shape.key_dim, 256)
            }
        };
        // MLA has no separate values (they are the latent part of the keys).
        let vw = if mla { 0 } else { shape.kv_heads * shape.key_dim };
        // (An MLA step's empty values stay on the host: the GPU never reads them.)
        let on_gpu = |v: &Tensor| if vw > 0 { v.to_device(&gpu).unwrap() } else { v.clone() };
        let head = asynctls_attn::calibrate::low_frequency_channels(config.key_dim, config.label_channels);
        let channels = LabelChannels::new(vec![vec![head; config.kv_heads]; layers]);
        let mut cpu =
            CpuAttention::new(PagedKvCache::new(HostKvStorage::new(&config, channels.clone()).unwrap()).unwrap());
        let mut cuda = CudaAttention::new(&dev, &config, channels).unwrap();
        let (kw, qw) = (shape.kv_heads * shape.key_dim, shape.q_heads * shape.key_dim);
        let mut seqs: Vec<(SeqId, SeqId)> = vec![];
        for &len in &lens {
            let (a, b) = (cpu.add_sequence(), cuda.add_sequence());
            // The prompt in chunks of at most 2048, as the engine prefills.
            for start in (0..len).step_by(2048) {
                let n = 2048.min(len - start);
                let sa = cpu.begin_prefill(a, n, 1 << 20).unwrap();
                let sb = cuda.begin_prefill(b, n, 1 << 20).unwrap();
                for layer in 0..layers {
                    let k = Tensor::from_vec(random(&mut rng, n * kw), &[n, kw]).unwrap();
                    let v = Tensor::from_vec(random(&mut rng, n * vw), &[n, vw]).unwrap();
                    cpu.write_kv(&sa, layer, &k, &v).unwrap();
                    cuda.write_kv(&sb, layer, &k.to_device(&gpu).unwrap(), &on_gpu(&v))
                        .unwrap();
                }
            }
            seqs.push((a, b));
        }
        // tls, then quest (its blocks' every token), on the same growing cache.
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
        let (cs, gs): (Vec<SeqId>, Vec<SeqId>) = seqs.iter().copied().unzip();
        for step in 0..4 {
            let sparse = if step % 2 == 0 { &tls } else { &quest };
            let sa = cpu.begin_decode(&cs, 1 << 20).unwrap();
            let sb = cuda.begin_decode(&gs, 1 << 20).unwrap();
            let batch = cs.len();
            for layer in 0..layers {
                let k = Tensor::from_vec(random(&mut rng, batch * kw), &[batch, kw]).unwrap();
                let v = Tensor::from_vec(random(&mut rng, batch * vw), &[batch, vw]).unwrap();
                cpu.write_kv(&sa, layer, &k, &v).unwrap();
                cuda.write_kv(&sb, layer, &k.to_device(&gpu).unwrap(), &on_gpu(&v))
                    .unwrap();
                let q = Tensor::from_vec(random(&mut rng, batch * qw), &[batch, qw]).unwrap();
                let want = cpu
                    .attend(&sa, layer, &q, &shape, sparse)
                    .unwrap()
                    .to_f32_vec()
                    .unwrap();
                let got = cuda
                    .attend(&sb, layer, &q.to_device(&gpu).unwrap(), &shape, sparse)
                    .unwrap()
                    .to_f32_vec()
                    .unwrap();
                // The CPU's selection on the same cache, for the same query.
                let tables: Vec<_> = cs.iter().map(|&s| cpu.cache().table(s).unwrap()).collect();
                let mut scratch = vec![0.0; batch * shape.q_heads * shape.value_dim];
                let report = asynctls_attn::decode(
                    cpu.cache().storage(),
                    &tables,
                    layer,
                    q.as_slice::<f32>().unwrap(),
                    &shape,
                    sparse,
                    &mut scratch,
                )
                .unwrap();
                let gpu_lists = cuda.last_selection().unwrap();
                for (row, head) in report.heads.iter().enumerate() {
                    let gpu_tokens: Vec<u32> = gpu_lists[row].iter().map(|&t| t as u32).collect();
                    assert_eq!(
                        gpu_tokens, head.tokens,
                        "{shape:?} step {step} layer {layer} row {row}: selections differ"
                    );
                }
                let e = rel_err(&got, &want);
                println!(
                    "{shape:?} {:?} step {step} layer {layer}: {} rows select the CPU's tokens ({} of up to {} each), output rel err {e:.2e}",
                    sparse.policy,
                    report.heads.len(),
                    report.heads[0].tokens.len(),
                    lens[0] + step + 1
                );
                assert!(e <= 1e-2, "output rel err {e}");
            }
        }
    }
}
