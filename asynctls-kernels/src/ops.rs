//! Ops on [`Tensor`]s: shape and dtype checks, then dispatch to the device.
//!
//! Float inputs of any float dtype are computed in f32 and returned in the
//! input's dtype. Every op here has its CPU implementation in [`crate::cpu`];
//! the CUDA kernels arrive with the CUDA path and are tested against these.

use crate::cpu::{self, RopeStyle, RopeTable};
use crate::error::{check_shape, invalid};
use crate::{DType, Error, Result, Storage, Tensor};

fn cpu_only(op: &'static str, t: &Tensor) -> Result<()> {
    match t.storage() {
        Storage::Cpu(_) => Ok(()),
        Storage::Cuda { .. } => Err(Error::Unsupported {
            op,
            dtype: t.dtype(),
            device: t.device().to_string(),
        }),
    }
}

fn same_dtype(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dtype() == b.dtype() {
        Ok(())
    } else {
        Err(Error::DTypeMismatch {
            op,
            lhs_name: "lhs",
            lhs: a.dtype(),
            rhs_name: "rhs",
            rhs: b.dtype(),
        })
    }
}

/// `a[m, k] @ b[k, n]`.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "matmul";
    let (m, k) = a.dims2(OP)?;
    let (k2, n) = b.dims2(OP)?;
    if k != k2 {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs_name: "a",
            lhs: a.shape().to_vec(),
            rhs_name: "b",
            rhs: b.shape().to_vec(),
        });
    }
    same_dtype(OP, a, b)?;
    a.require_float(OP)?;
    cpu_only(OP, a)?;
    let mut out = vec![0.0; m * n];
    cpu::matmul(&a.to_f32_vec()?, &b.to_f32_vec()?, &mut out, m, k, n)?;
    Tensor::from_f32(out, &[m, n], a.dtype())
}

/// RMSNorm over the last dimension.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "rms_norm";
    check_shape(OP, "x (last dim)", &[x.last_dim()], "weight", weight.shape())?;
    x.require_float(OP)?;
    cpu_only(OP, x)?;
    let mut v = x.to_f32_vec()?;
    cpu::rms_norm(&mut v, &weight.to_f32_vec()?, eps)?;
    Tensor::from_f32(v, x.shape(), x.dtype())
}

/// RoPE on `x` of shape `[tokens, heads, head_dim]` at `positions` (one per token).
pub fn rope(x: &Tensor, table: &RopeTable, positions: &[usize], style: RopeStyle) -> Result<Tensor> {
    const OP: &str = "rope";
    let [tokens, _heads, head_dim] = x.shape()[..] else {
        return Err(invalid(
            OP,
            format!("expected [tokens, heads, head_dim], got {:?}", x.shape()),
        ));
    };
    check_shape(OP, "x tokens", &[tokens], "positions", &[positions.len()])?;
    x.require_float(OP)?;
    cpu_only(OP, x)?;
    let mut v = x.to_f32_vec()?;
    table.apply(&mut v, head_dim, positions, style)?;
    Tensor::from_f32(v, x.shape(), x.dtype())
}

/// `silu(gate) * up`.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    const OP: &str = "silu_mul";
    gate.require_same_shape(OP, up)?;
    same_dtype(OP, gate, up)?;
    gate.require_float(OP)?;
    cpu_only(OP, gate)?;
    let mut g = gate.to_f32_vec()?;
    cpu::silu_mul(&mut g, &up.to_f32_vec()?)?;
    Tensor::from_f32(g, gate.shape(), gate.dtype())
}

/// Softmax over the last dimension.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "softmax";
    x.require_float(OP)?;
    cpu_only(OP, x)?;
    let mut v = x.to_f32_vec()?;
    let n = x.last_dim();
    if n > 0 {
        v.chunks_exact_mut(n).for_each(cpu::softmax_in_place);
    }
    Tensor::from_f32(v, x.shape(), x.dtype())
}

/// The `k` largest values of each row of the last dimension, best first:
/// `(values in x's dtype, indices as i32)`, both `[.., k]`.
pub fn topk(x: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    const OP: &str = "topk";
    x.require_float(OP)?;
    cpu_only(OP, x)?;
    let n = x.last_dim();
    if k > n {
        return Err(invalid(OP, format!("k = {k} is larger than the row length {n}")));
    }
    let v = x.to_f32_vec()?;
    let rows = v.len().checked_div(n).unwrap_or(0);
    let (mut values, mut indices) = (Vec::with_capacity(rows * k), Vec::with_capacity(rows * k));
    for row in v.chunks_exact(n.max(1)).take(rows) {
        for i in cpu::topk_indices(row, k) {
            values.push(row[i as usize]);
            indices.push(i as i32);
        }
    }
    let mut shape = x.shape().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = k;
    }
    Ok((
        Tensor::from_f32(values, &shape, x.dtype())?,
        Tensor::from_vec(indices, &shape)?,
    ))
}

/// Index of the largest value in each row of the last dimension, as i32.
pub fn argmax(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "argmax";
    x.require_float(OP)?;
    cpu_only(OP, x)?;
    let n = x.last_dim();
    if n == 0 {
        return Err(invalid(OP, "argmax of an empty row"));
    }
    let v = x.to_f32_vec()?;
    let out: Vec<i32> = v
        .chunks_exact(n)
        .map(|row| cpu::argmax(row).map_or(0, |i| i as i32))
        .collect();
    let shape = &x.shape()[..x.shape().len().saturating_sub(1)];
    Tensor::from_vec(out, shape)
}

/// Rows of `table` (`[vocab, hidden]`) for the token ids in `ids` (i32).
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    const OP: &str = "embedding";
    let (_vocab, hidden) = table.dims2(OP)?;
    if ids.dtype() != DType::I32 {
        return Err(Error::DTypeMismatch {
            op: OP,
            lhs_name: "ids",
            lhs: ids.dtype(),
            rhs_name: "expected",
            rhs: DType::I32,
        });
    }
    cpu_only(OP, table)?;
    let ids: Vec<u32> = ids
        .as_slice::<i32>()?
        .iter()
        .map(|&i| u32::try_from(i).map_err(|_| invalid(OP, format!("negative token id {i}"))))
        .collect::<Result<_>>()?;
    let mut out = vec![0.0; ids.len() * hidden];
    cpu::embedding(&table.to_f32_vec()?, hidden, &ids, &mut out)?;
    Tensor::from_f32(out, &[ids.len(), hidden], table.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_shape_mismatch_names_both_sides() {
        let a = Tensor::zeros(&[2, 3], DType::F32);
        let b = Tensor::zeros(&[4, 5], DType::F32);
        let msg = matmul(&a, &b).unwrap_err().to_string();
        assert!(msg.contains("[2, 3]") && msg.contains("[4, 5]"), "{msg}");
    }

    #[test]
    fn dtype_mismatch_names_both_sides() {
        let a = Tensor::zeros(&[2, 3], DType::F32);
        let b = Tensor::zeros(&[3, 2], DType::BF16);
        let msg = matmul(&a, &b).unwrap_err().to_string();
        assert!(msg.contains("f32") && msg.contains("bf16"), "{msg}");
    }

    #[test]
    fn bf16_ops_compute_in_f32_and_keep_dtype() {
        let x = Tensor::from_f32(vec![1.0, 2.0, 3.0, 4.0], &[2, 2], DType::BF16).unwrap();
        let w = Tensor::from_f32(vec![1.0, 1.0], &[2], DType::BF16).unwrap();
        let y = rms_norm(&x, &w, 1e-6).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let v = y.to_f32_vec().unwrap();
        let want = 1.0 / (2.5f32).sqrt();
        assert!((v[0] - want).abs() < 1e-2, "{v:?}");
        let (vals, idx) = topk(&x, 1).unwrap();
        assert_eq!(idx.as_slice::<i32>().unwrap(), &[1, 1]);
        assert_eq!(vals.to_f32_vec().unwrap(), vec![2.0, 4.0]);
        assert_eq!(argmax(&x).unwrap().as_slice::<i32>().unwrap(), &[1, 1]);
    }

    #[test]
    fn embedding_and_silu_and_softmax() {
        let table = Tensor::from_vec((0..6).map(|i| i as f32).collect(), &[3, 2]).unwrap();
        let ids = Tensor::from_vec(vec![2i32, 0], &[2]).unwrap();
        let e = embedding(&table, &ids).unwrap();
        assert_eq!(e.to_f32_vec().unwrap(), vec![4.0, 5.0, 0.0, 1.0]);
        let bad = Tensor::from_vec(vec![-1i32], &[1]).unwrap();
        assert!(embedding(&table, &bad).unwrap_err().to_string().contains("negative"));
        let g = Tensor::from_vec(vec![0.0f32, 1.0], &[2]).unwrap();
        let u = Tensor::from_vec(vec![3.0f32, 2.0], &[2]).unwrap();
        let s = silu_mul(&g, &u).unwrap().to_f32_vec().unwrap();
        assert!((s[0]).abs() < 1e-7 && (s[1] - 2.0 * 0.731_058_6).abs() < 1e-5);
        let p = softmax(&u).unwrap().to_f32_vec().unwrap();
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6 && p[0] > p[1]);
        assert!(silu_mul(&g, &Tensor::zeros(&[3], DType::F32)).is_err());
    }

    #[test]
    fn rope_checks_positions() {
        let table = RopeTable::new(4, 10_000.0, 8).unwrap();
        let x = Tensor::zeros(&[2, 1, 4], DType::F32);
        let msg = rope(&x, &table, &[0], RopeStyle::Neox).unwrap_err().to_string();
        assert!(msg.contains("[2]") && msg.contains("[1]"), "{msg}");
    }
}
