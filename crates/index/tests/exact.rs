//! Exact index: agreement with a naive computation, tie order, updates and input checks.

use search_r3_index::{
    random_unit_vectors, AnyIndex, ExactIndex, Hit, HnswParams, IndexError, IndexKind, VectorIndex,
};

/// The reference: score every row in f64 and sort by (score desc, key asc).
fn naive(data: &[(u64, Vec<f32>)], q: &[f32], k: usize) -> Vec<(u64, f64)> {
    let qn = q.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let mut all: Vec<(u64, f64)> = data
        .iter()
        .map(|(key, v)| {
            let vn = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let d: f64 = v.iter().zip(q).map(|(a, b)| *a as f64 * *b as f64).sum();
            (*key, d / (vn * qn))
        })
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all.truncate(k);
    all
}

#[test]
fn matches_naive_cosine() {
    let dim = 37; // not a multiple of the kernel's lane count, to cover the remainder loop
    let n = 3000;
    let raw = random_unit_vectors(n, dim, 7);
    let mut idx = ExactIndex::new(dim).unwrap();
    let mut data = Vec::new();
    for (i, v) in raw.chunks_exact(dim).enumerate() {
        // Unnormalised input, arbitrary non-contiguous keys: the index must normalise.
        let scaled: Vec<f32> = v.iter().map(|x| x * (1.0 + i as f32 % 5.0)).collect();
        let key = (i as u64) * 3 + 11;
        idx.upsert(key, &scaled).unwrap();
        data.push((key, scaled));
    }
    let qs = random_unit_vectors(50, dim, 8);
    for q in qs.chunks_exact(dim) {
        let got = idx.search(q, 10).unwrap();
        let want = naive(&data, q, 10);
        assert_eq!(got.len(), 10);
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.key, w.0);
            assert!(
                (g.score as f64 - w.1).abs() < 1e-5,
                "{} vs {}",
                g.score,
                w.1
            );
        }
    }
    // Batched search is the same computation in another loop order.
    let batch = idx.search_batch(&qs, 10).unwrap();
    for (q, b) in qs.chunks_exact(dim).zip(&batch) {
        assert_eq!(&idx.search(q, 10).unwrap(), b);
    }
}

#[test]
fn large_index_parallel_scan_matches_batch() {
    // Big enough that single queries are split across threads.
    let dim = 64;
    let n = 80_000;
    let data = random_unit_vectors(n, dim, 3);
    let keys: Vec<u64> = (0..n as u64).rev().collect();
    let mut idx = ExactIndex::new(dim).unwrap();
    idx.upsert_batch(&keys, &data).unwrap();
    let qs = random_unit_vectors(20, dim, 4);
    let batch = idx.search_batch(&qs, 25).unwrap();
    for (q, b) in qs.chunks_exact(dim).zip(&batch) {
        let single = idx.search(q, 25).unwrap();
        assert_eq!(&single, b);
        assert!(single.windows(2).all(|w| w[0].score >= w[1].score));
    }
}

#[test]
fn ties_are_broken_by_smaller_key() {
    let mut idx = ExactIndex::new(4).unwrap();
    // Keys inserted in scrambled order; several share a vector, so their scores are equal.
    let a = [1.0, 0.0, 0.0, 0.0];
    let b = [0.0, 1.0, 0.0, 0.0];
    for key in [50u64, 7, 31, 2, 90] {
        idx.upsert(key, &a).unwrap();
    }
    for key in [5u64, 1, 60] {
        idx.upsert(key, &b).unwrap();
    }
    let hits = idx.search(&[1.0, 0.0, 0.0, 0.0], 8).unwrap();
    let keys: Vec<u64> = hits.iter().map(|h| h.key).collect();
    assert_eq!(keys, vec![2, 7, 31, 50, 90, 1, 5, 60]);
    // Cut in the middle of a tie: the smaller keys win.
    let hits = idx.search(&[1.0, 0.0, 0.0, 0.0], 3).unwrap();
    assert_eq!(
        hits.iter().map(|h| h.key).collect::<Vec<_>>(),
        vec![2, 7, 31]
    );
    // The same order through the batched path.
    let batch = idx.search_batch(&[1.0, 0.0, 0.0, 0.0], 3).unwrap();
    assert_eq!(batch[0], hits);
}

#[test]
fn upsert_replace_remove_and_keys() {
    let mut idx = ExactIndex::new(3).unwrap();
    idx.upsert(10, &[1.0, 0.0, 0.0]).unwrap();
    idx.upsert(20, &[0.0, 1.0, 0.0]).unwrap();
    idx.upsert(30, &[0.0, 0.0, 1.0]).unwrap();
    assert_eq!(idx.len(), 3);
    // Replace: the same key moves, the count stays.
    idx.upsert(10, &[0.0, 0.0, 2.0]).unwrap();
    assert_eq!(idx.len(), 3);
    assert_eq!(idx.get(10).unwrap(), vec![0.0, 0.0, 1.0]);
    let top = idx.search(&[0.0, 0.0, 1.0], 2).unwrap();
    assert_eq!(top.iter().map(|h| h.key).collect::<Vec<_>>(), vec![10, 30]);
    assert!((top[0].score - 1.0).abs() < 1e-6);
    // Remove the middle row, so the last row moves into its place.
    assert!(idx.remove(20).unwrap());
    assert!(!idx.remove(20).unwrap());
    assert!(!idx.contains(20));
    assert_eq!(idx.get(20), None);
    assert_eq!(idx.keys(), vec![10, 30]);
    assert_eq!(idx.get(30).unwrap(), vec![0.0, 0.0, 1.0]);
    let all = idx.search(&[0.0, 1.0, 0.0], 10).unwrap();
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|h| h.key != 20));
    // k = 0 and k > len are fine.
    assert!(idx.search(&[1.0, 0.0, 0.0], 0).unwrap().is_empty());
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let mut idx = ExactIndex::new(3).unwrap();
    assert!(matches!(
        idx.upsert(1, &[1.0, 2.0]),
        Err(IndexError::DimMismatch {
            expected: 3,
            got: 2
        })
    ));
    assert!(matches!(
        idx.upsert(1, &[0.0, 0.0, 0.0]),
        Err(IndexError::InvalidVector(_))
    ));
    assert!(matches!(
        idx.upsert(1, &[f32::NAN, 0.0, 1.0]),
        Err(IndexError::InvalidVector(_))
    ));
    assert!(matches!(
        idx.upsert(u64::MAX, &[1.0, 0.0, 0.0]),
        Err(IndexError::ReservedKey(_))
    ));
    assert!(matches!(
        idx.search(&[1.0; 4], 3),
        Err(IndexError::DimMismatch { .. })
    ));
    assert!(matches!(
        idx.neighbors(99, 3),
        Err(IndexError::KeyNotFound(99))
    ));
    assert!(matches!(
        idx.upsert_batch(&[1, 2], &[1.0; 5]),
        Err(IndexError::BatchShape { .. })
    ));
    assert!(ExactIndex::new(0).is_err());
    assert!(idx.is_empty());
    // Empty index: searches return nothing.
    assert!(idx.search(&[1.0, 0.0, 0.0], 5).unwrap().is_empty());
}

#[test]
fn exact_neighbors_exclude_self_and_follow_moves() {
    let mut idx = ExactIndex::new(2).unwrap();
    let pts = [
        (1u64, [1.0, 0.0]),
        (2, [0.99, 0.1]),
        (3, [0.0, 1.0]),
        (4, [0.1, 0.99]),
    ];
    for (k, v) in pts {
        idx.upsert(k, &v).unwrap();
    }
    let n = idx.neighbors(1, 1).unwrap();
    assert_eq!(
        n,
        vec![Hit {
            key: 2,
            score: n[0].score
        }]
    );
    idx.upsert(1, &[0.12, 1.0]).unwrap();
    let n: Vec<u64> = idx.neighbors(1, 2).unwrap().iter().map(|h| h.key).collect();
    assert_eq!(n, vec![4, 3]);
}

#[test]
fn any_index_delegates() {
    let mut any = AnyIndex::new(IndexKind::Exact, 2, HnswParams::default()).unwrap();
    assert_eq!(any.kind(), IndexKind::Exact);
    any.upsert(3, &[1.0, 1.0]).unwrap();
    assert_eq!(any.len(), 1);
    assert_eq!(any.keys(), vec![3]);
    assert_eq!(any.search(&[1.0, 1.0], 1).unwrap()[0].key, 3);
}
