//! Dot-product kernels.
//!
//! The workspace builds for baseline x86-64 (SSE2), where a plain loop runs at a quarter of what
//! the CPUs we run on can do. The same loop is therefore compiled a second time with AVX2+FMA
//! (and a third time with AVX-512) enabled and picked at run time, so one binary is fast on
//! new CPUs and still runs on old ones. Every score in the crate comes from [`dot`] or
//! [`scores_into`], which use the same kernel, so exact and HNSW scores agree bit for bit.

use crate::{IndexError, Result};

/// Accumulator lanes: enough independent partial sums to hide FMA latency on AVX2 and AVX-512.
const LANES: usize = 32;

#[inline(always)]
fn dot_body<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] = if FMA {
                x[i].mul_add(y[i], acc[i])
            } else {
                acc[i] + x[i] * y[i]
            };
        }
    }
    // Pairwise reduction keeps the rounding error small and the order fixed.
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    let mut s = acc[0];
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[inline(always)]
fn scores_body<const FMA: bool>(q: &[f32], rows: &[f32], out: &mut [f32]) {
    let dim = q.len();
    for (o, row) in out.iter_mut().zip(rows.chunks_exact(dim)) {
        *o = dot_body::<FMA>(q, row);
    }
}

fn scores_plain(q: &[f32], rows: &[f32], out: &mut [f32]) {
    scores_body::<false>(q, rows, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn scores_avx2(q: &[f32], rows: &[f32], out: &mut [f32]) {
    scores_body::<true>(q, rows, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn scores_avx512(q: &[f32], rows: &[f32], out: &mut [f32]) {
    scores_body::<true>(q, rows, out)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Plain,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

fn level() -> Level {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let fma = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if fma && is_x86_feature_detected!("avx512f") {
                return Level::Avx512;
            }
            if fma {
                return Level::Avx2;
            }
        }
        Level::Plain
    })
}

/// Dot products of `q` with each row of `rows` (row-major, `q.len()` values per row) into
/// `out`, one per row.
pub(crate) fn scores_into(q: &[f32], rows: &[f32], out: &mut [f32]) {
    debug_assert_eq!(rows.len(), q.len() * out.len());
    match level() {
        Level::Plain => scores_plain(q, rows, out),
        // SAFETY: `level()` returned these only after detecting the features at run time.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { scores_avx2(q, rows, out) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { scores_avx512(q, rows, out) },
    }
}

/// Dot product of two equally long slices, with the same kernel the indexes score with.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut out = [0f32];
    let n = a.len().min(b.len());
    scores_into(&a[..n], &b[..n], &mut out);
    out[0]
}

/// The L2-normalised copy of `v`; an error for zero, NaN or infinite input, which has no
/// direction to compare by cosine.
pub fn normalize(v: &[f32]) -> Result<Vec<f32>> {
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(IndexError::InvalidVector(format!(
            "value {} at position {i} is not finite",
            v[i]
        )));
    }
    let norm = l2_norm(v);
    if norm == 0.0 || !norm.is_finite() {
        return Err(IndexError::InvalidVector(format!(
            "vector of {} values has norm {norm}",
            v.len()
        )));
    }
    Ok(l2_normalize(v.to_vec()))
}

/// `v / ‖v‖`, the one L2 normalisation of the system (embedder, server, training, indexes); a
/// zero vector stays zero. Use [`normalize`] where bad input must be refused.
pub fn l2_normalize(mut v: Vec<f32>) -> Vec<f32> {
    let n = l2_norm(&v);
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x = (*x as f64 / n) as f32);
    }
    v
}

/// The unit-norm mean of unit vectors `parts` (all of one width), accumulated in f64: the
/// embedding of a query reasoned about several times is the normalised mean of the direct
/// embedding and the embeddings after each thought (HyDE's averaging). `None` for no parts or
/// parts of different widths. A single part is returned unchanged.
pub fn mean_unit(parts: &[&[f32]]) -> Option<Vec<f32>> {
    let d = parts.first()?.len();
    if parts.iter().any(|p| p.len() != d) {
        return None;
    }
    if let [one] = parts {
        // Already unit: returned as is, so a one-part mode is bit-identical to no averaging.
        return Some(one.to_vec());
    }
    let mut sum = vec![0f64; d];
    for p in parts {
        for (s, &x) in sum.iter_mut().zip(p.iter()) {
            *s += x as f64;
        }
    }
    let n = sum.iter().map(|x| x * x).sum::<f64>().sqrt();
    Some(
        sum.into_iter()
            .map(|x| if n > 0.0 { (x / n) as f32 } else { 0.0 })
            .collect(),
    )
}

/// Euclidean norm accumulated in f64: the norm of a 4096-d f32 vector loses digits in f32, and
/// this runs once per vector, so the cost does not matter.
fn l2_norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_unit_is_the_normalised_mean_of_its_parts() {
        let a = l2_normalize(vec![1.0, 0.0, 0.0]);
        let b = l2_normalize(vec![0.0, 3.0, 4.0]);
        let c = l2_normalize(vec![1.0, 1.0, 0.0]);
        let m = mean_unit(&[&a, &b, &c]).unwrap();
        // Hand value: mean = (1 + 1/√2, 0.6 + 1/√2, 0.8) / 3, then unit norm.
        let h = std::f64::consts::FRAC_1_SQRT_2;
        let raw = [1.0 + h, 0.6 + h, 0.8];
        let n = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
        for (got, want) in m.iter().zip(raw.iter().map(|x| x / n)) {
            assert!((*got as f64 - want).abs() < 1e-6, "{got} vs {want}");
        }
        // One part is itself; opposite parts cancel to zero, not NaN.
        assert_eq!(mean_unit(&[&a]).unwrap(), a);
        let neg: Vec<f32> = a.iter().map(|x| -x).collect();
        assert_eq!(mean_unit(&[&a, &neg]).unwrap(), vec![0.0; 3]);
        assert!(mean_unit(&[]).is_none());
        assert!(mean_unit(&[&a, &[1.0f32, 0.0][..]]).is_none());
    }
}
