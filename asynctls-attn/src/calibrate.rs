//! Offline choice of the label channels: per layer and KV head, the `r`
//! channels where queries and keys carry the most of `q . k`.

use std::any::Any;

use asynctls_kernels::{Device, Tensor};
use asynctls_kvcache::{LabelChannels, SeqId};

use crate::backend::{AttentionBackend, Sequences, Step};
use crate::error::shape_err;
use crate::{AttnShape, Result, SparseConfig};

/// Ranks channels by the mean of `|q_c * k_c|` over all pairs of calibration
/// queries (`[n_q, q_heads, key_dim]`) and keys (`[n_k, kv_heads, key_dim]`),
/// per KV head over the query heads of its group, and keeps the top `r`
/// (sorted ascending). The mean over pairs factorizes into
/// `mean|q_c| * mean|k_c|`, so this costs one pass over each side.
pub fn calibrate_channels(queries: &[f32], keys: &[f32], shape: &AttnShape, r: usize) -> Result<Vec<Vec<u16>>> {
    let kd = shape.key_dim;
    if queries.len() % (shape.q_heads * kd) != 0 || queries.is_empty() {
        return Err(shape_err(
            "calibration queries",
            format!("[n, {}, {kd}]", shape.q_heads),
            queries.len(),
        ));
    }
    if keys.len() % (shape.kv_heads * kd) != 0 || keys.is_empty() {
        return Err(shape_err(
            "calibration keys",
            format!("[n, {}, {kd}]", shape.kv_heads),
            keys.len(),
        ));
    }
    if r > kd || r > u16::MAX as usize {
        return Err(shape_err("label channels r", format!("at most {kd}"), r));
    }
    let q_mean = mean_abs(queries, shape.q_heads, kd);
    let k_mean = mean_abs(keys, shape.kv_heads, kd);
    Ok(channels_from_means(&q_mean, &k_mean, shape, r))
}

/// The top `r` channels of each KV head from per-(head, channel) mean
/// `|q_c|` (`[q_heads * key_dim]`) and mean `|k_c|` (`[kv_heads * key_dim]`).
fn channels_from_means(q_mean: &[f32], k_mean: &[f32], shape: &AttnShape, r: usize) -> Vec<Vec<u16>> {
    let kd = shape.key_dim;
    (0..shape.kv_heads)
        .map(|head| {
            let importance: Vec<f32> = (0..kd)
                .map(|c| {
                    let q: f32 = (0..shape.group())
                        .map(|h| q_mean[(head * shape.group() + h) * kd + c])
                        .sum();
                    q * k_mean[head * kd + c]
                })
                .collect();
            top_channels(&importance, r)
        })
        .collect()
}

/// Per layer, the running sums of `|q_c|` and `|k_c|` a model's forward
/// hands its backend, and the shape the layer attends with.
#[derive(Debug, Default, Clone)]
struct LayerSums {
    q: Vec<f64>,
    q_rows: usize,
    k: Vec<f64>,
    k_rows: usize,
    shape: Option<AttnShape>,
}

fn add_abs(acc: &mut Vec<f64>, x: &[f32], width: usize) -> usize {
    if width == 0 {
        return 0;
    }
    if acc.len() != width {
        acc.clear();
        acc.resize(width, 0.0);
    }
    for row in x.chunks_exact(width) {
        for (a, v) in acc.iter_mut().zip(row) {
            *a += v.abs() as f64;
        }
    }
    x.len() / width
}

/// A backend that records, for calibration, the mean `|q_c|` and `|k_c|`
/// per layer, head and channel of everything a model's forward passes
/// through it (every prefill position's query and key), and otherwise is
/// the backend it wraps. [`CalibrationRecorder::channels`] then ranks the
/// channels as [`calibrate_channels`] does (the mean of `|q_c k_c|` over
/// query-key pairs factorizes into the two means).
#[derive(Debug)]
pub struct CalibrationRecorder {
    inner: Box<dyn AttentionBackend>,
    layers: Vec<LayerSums>,
}

impl CalibrationRecorder {
    pub fn new(inner: Box<dyn AttentionBackend>) -> Self {
        CalibrationRecorder {
            inner,
            layers: Vec::new(),
        }
    }

    fn layer(&mut self, layer: usize) -> &mut LayerSums {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, LayerSums::default());
        }
        &mut self.layers[layer]
    }

    /// Query and key rows recorded (of layer 0).
    pub fn tokens(&self) -> usize {
        self.layers.first().map_or(0, |l| l.k_rows)
    }

    /// The `r` label channels of every layer and KV head from what was
    /// recorded; an error when some layer saw no query or key.
    pub fn channels(&self, r: usize) -> Result<LabelChannels> {
        let mut all = Vec::with_capacity(self.layers.len());
        for (l, sums) in self.layers.iter().enumerate() {
            let Some(shape) = sums.shape else {
                return Err(shape_err("calibration", format!("queries of layer {l}"), 0));
            };
            if sums.q_rows == 0 || sums.k_rows == 0 {
                return Err(shape_err("calibration", format!("queries and keys of layer {l}"), 0));
            }
            if r > shape.key_dim {
                return Err(shape_err("label channels r", format!("at most {}", shape.key_dim), r));
            }
            let q: Vec<f32> = sums.q.iter().map(|v| (v / sums.q_rows as f64) as f32).collect();
            let k: Vec<f32> = sums.k.iter().map(|v| (v / sums.k_rows as f64) as f32).collect();
            all.push(channels_from_means(&q, &k, &shape, r));
        }
        if all.is_empty() {
            return Err(shape_err("calibration", "at least one layer's queries", 0));
        }
        Ok(LabelChannels::new(all))
    }
}

impl AttentionBackend for CalibrationRecorder {
    fn device(&self) -> &Device {
        self.inner.device()
    }
    fn sequences(&self) -> &dyn Sequences {
        self.inner.sequences()
    }
    fn sequences_mut(&mut self) -> &mut dyn Sequences {
        self.inner.sequences_mut()
    }
    fn begin_prefill(&mut self, seq: SeqId, n: usize, limit: usize) -> Result<Step> {
        self.inner.begin_prefill(seq, n, limit)
    }
    fn begin_decode(&mut self, seqs: &[SeqId], limit: usize) -> Result<Step> {
        self.inner.begin_decode(seqs, limit)
    }
    fn write_kv(&mut self, step: &Step, layer: usize, keys: &Tensor, values: &Tensor) -> Result<()> {
        self.inner.write_kv(step, layer, keys, values)?;
        let k = keys.to_f32_vec()?;
        let width = keys.last_dim();
        let sums = self.layer(layer);
        sums.k_rows += add_abs(&mut sums.k, &k, width);
        Ok(())
    }
    fn attend(
        &mut self,
        step: &Step,
        layer: usize,
        q: &Tensor,
        shape: &AttnShape,
        sparse: &SparseConfig,
    ) -> Result<Tensor> {
        let out = self.inner.attend(step, layer, q, shape, sparse)?;
        let qv = q.to_f32_vec()?;
        let sums = self.layer(layer);
        sums.shape = Some(*shape);
        sums.q_rows += add_abs(&mut sums.q, &qv, shape.q_heads * shape.key_dim);
        Ok(out)
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// The fallback when no calibration queries exist: rank channels by the mean
/// `|k_c|` of the prompt's own keys (`[n, kv_heads, key_dim]`).
pub fn channels_from_keys(keys: &[f32], kv_heads: usize, key_dim: usize, r: usize) -> Result<Vec<Vec<u16>>> {
    if keys.len() % (kv_heads * key_dim) != 0 || keys.is_empty() || r > key_dim {
        return Err(shape_err(
            "keys for channel ranking",
            format!("[n, {kv_heads}, {key_dim}], r <= {key_dim}"),
            keys.len(),
        ));
    }
    let k_mean = mean_abs(keys, kv_heads, key_dim);
    Ok(k_mean.chunks_exact(key_dim).map(|m| top_channels(m, r)).collect())
}

/// The default before any calibration, for NeoX-layout RoPE heads: the
/// `r / 2` lowest-frequency rotary pairs (channels `i` and `i + d/2` for the
/// largest `i`). Those channels rotate slowly, so they carry the
/// position-independent part of a key where real models' outlier channels
/// sit. Sorted.
pub fn low_frequency_channels(head_dim: usize, r: usize) -> Vec<u16> {
    let half = head_dim / 2;
    let pairs = (r / 2).min(half);
    let mut channels: Vec<u16> = (half - pairs..half)
        .chain(head_dim - pairs..head_dim)
        .map(|c| c as u16)
        .collect();
    channels.sort_unstable();
    channels
}

/// Mean `|x|` per (head, channel) over rows of `[n, heads, dim]`.
fn mean_abs(x: &[f32], heads: usize, dim: usize) -> Vec<f32> {
    let mut acc = vec![0.0f64; heads * dim];
    let rows = x.len() / (heads * dim);
    for row in x.chunks_exact(heads * dim) {
        for (a, v) in acc.iter_mut().zip(row) {
            *a += v.abs() as f64;
        }
    }
    acc.into_iter().map(|a| (a / rows as f64) as f32).collect()
}

fn top_channels(importance: &[f32], r: usize) -> Vec<u16> {
    let mut top: Vec<u16> = asynctls_kernels::cpu::topk_indices(importance, r)
        .into_iter()
        .map(|c| c as u16)
        .collect();
    top.sort_unstable();
    top
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_channels_where_both_sides_are_large() {
        let shape = AttnShape::gqa(2, 1, 4);
        // Channel 1 is large in q, channel 2 large in k, channel 3 large in both.
        let q = vec![0.1, 5.0, 0.1, 3.0, 0.1, 5.0, 0.1, 3.0];
        let k = vec![0.1, 0.1, 5.0, 3.0];
        let ch = calibrate_channels(&q, &k, &shape, 1).unwrap();
        assert_eq!(ch, vec![vec![3]]);
        let ch = channels_from_keys(&k, 1, 4, 2).unwrap();
        assert_eq!(ch, vec![vec![2, 3]]);
        assert!(calibrate_channels(&q[..3], &k, &shape, 1).is_err());
        assert_eq!(low_frequency_channels(8, 4), vec![2, 3, 6, 7]);
    }

    #[test]
    fn the_recorder_ranks_what_the_backend_saw_as_calibrate_channels_does() {
        use asynctls_kvcache::{CacheConfig, HostKvStorage, KvDType, PagedKvCache};
        let shape = AttnShape::gqa(4, 2, 8);
        let config = CacheConfig {
            kv_dtype: KvDType::F32,
            label_channels: 2,
            ..CacheConfig::gqa(1, 2, 8, 8)
        };
        let cache = PagedKvCache::new(HostKvStorage::new(&config, LabelChannels::leading(&config)).unwrap()).unwrap();
        let mut rec = CalibrationRecorder::new(Box::new(crate::CpuAttention::new(cache)));
        let seq = rec.add_sequence();
        let n = 5;
        let vals = |n: usize, w: usize, seed: f32| -> Vec<f32> {
            (0..n * w)
                .map(|i| ((i as f32 * 0.37 + seed).sin()) * (1.0 + (i % w) as f32))
                .collect()
        };
        let (qv, kv) = (vals(n, 32, 0.1), vals(n, 16, 0.7));
        let step = rec.begin_prefill(seq, n, 64).unwrap();
        let k = Tensor::from_vec(kv.clone(), &[n, 16]).unwrap();
        rec.write_kv(&step, 0, &k, &k).unwrap();
        let q = Tensor::from_vec(qv.clone(), &[n, 32]).unwrap();
        rec.attend(&step, 0, &q, &shape, &SparseConfig::default()).unwrap();
        assert_eq!(rec.tokens(), n);
        let got = rec.channels(2).unwrap();
        let want = calibrate_channels(&qv, &kv, &shape, 2).unwrap();
        for (head, w) in want.iter().enumerate() {
            assert_eq!(got.get(0, head), &w[..]);
        }
        assert!(rec.channels(9).is_err(), "r above the key dim");
        assert!(CalibrationRecorder::new(Box::new(crate::CpuAttention::new(
            PagedKvCache::new(HostKvStorage::new(&config, LabelChannels::leading(&config)).unwrap()).unwrap()
        )))
        .channels(2)
        .is_err());
    }
}
