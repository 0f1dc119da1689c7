//! Matrix products through the `gemm` crate (multithreaded with rayon).

use crate::error::invalid;
use crate::Result;

fn check_lengths(op: &'static str, a: usize, b: usize, c: usize, m: usize, k: usize, n: usize) -> Result<()> {
    if a != m * k || b != k * n || c != m * n {
        return Err(invalid(
            op,
            format!(
                "lengths a={a}, b={b}, out={c} do not fit m={m}, k={k}, n={n} \
                 (expected {}, {}, {})",
                m * k,
                k * n,
                m * n
            ),
        ));
    }
    Ok(())
}

fn parallelism(m: usize, k: usize, n: usize) -> gemm::Parallelism {
    // Threads only pay off above a few hundred thousand multiply-adds.
    if m * k * n >= 1 << 18 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    }
}

/// `out[m, n] = a[m, k] @ b[k, n]`, all row-major.
pub fn matmul(a: &[f32], b: &[f32], out: &mut [f32], m: usize, k: usize, n: usize) -> Result<()> {
    check_lengths("matmul", a.len(), b.len(), out.len(), m, k, n)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        out.fill(0.0);
        return Ok(());
    }
    // SAFETY: the lengths were checked above against the strides passed here.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(m, k, n),
        );
    }
    Ok(())
}

/// `out[m, n] = a[m, k] @ b[n, k]^T`: the form of scoring many rows of keys
/// (or block metadata) against a few queries.
pub fn matmul_nt(a: &[f32], b: &[f32], out: &mut [f32], m: usize, k: usize, n: usize) -> Result<()> {
    check_lengths("matmul_nt", a.len(), b.len(), out.len(), m, k, n)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        out.fill(0.0);
        return Ok(());
    }
    // SAFETY: as above; b is read with column stride k and row stride 1.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(m, k, n),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn matmul_and_nt_match_naive_on_random_shapes() {
        let mut rng = rand::rngs::StdRng::from_os_rng();
        for &(m, k, n) in &[(1, 1, 1), (3, 7, 5), (17, 64, 33), (64, 128, 96), (2, 576, 300)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let want = naive(&a, &b, m, k, n);
            let mut got = vec![f32::NAN; m * n];
            matmul(&a, &b, &mut got, m, k, n).unwrap();
            let mut bt = vec![0.0; n * k];
            for l in 0..k {
                for j in 0..n {
                    bt[j * k + l] = b[l * n + j];
                }
            }
            let mut got_nt = vec![f32::NAN; m * n];
            matmul_nt(&a, &bt, &mut got_nt, m, k, n).unwrap();
            for ((w, g), gt) in want.iter().zip(&got).zip(&got_nt) {
                assert!((w - g).abs() <= 1e-4 * (1.0 + w.abs()), "{w} vs {g}");
                assert!((w - gt).abs() <= 1e-4 * (1.0 + w.abs()), "{w} vs {gt}");
            }
        }
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let err = matmul(&[0.0; 6], &[0.0; 6], &mut [0.0; 4], 2, 3, 3).unwrap_err();
        assert!(err.to_string().contains("m=2, k=3, n=3"), "{err}");
    }
}
