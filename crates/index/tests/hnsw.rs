//! HNSW index on small data: recall on clustered vectors, updates, deletes, graph neighbours.

use search_r3_index::{
    clustered_unit_vectors, random_unit_vectors, recall_at_k, AnyIndex, ExactIndex, HnswIndex,
    HnswParams, IndexError, IndexKind, VectorIndex,
};

fn clustered(n: usize, dim: usize, clusters: usize, spread: f32, seed: u64) -> Vec<f32> {
    clustered_unit_vectors(n, dim, clusters, spread, seed)
}

#[test]
fn clustered_recall_and_updates() {
    let (n, dim) = (8000, 96);
    let data = clustered(n, dim, 40, 0.5, 11);
    let keys: Vec<u64> = (0..n as u64).collect();
    let mut exact = ExactIndex::new(dim).unwrap();
    exact.upsert_batch(&keys, &data).unwrap();
    let mut hnsw = HnswIndex::build(dim, HnswParams::default(), &keys, &data).unwrap();
    assert_eq!(hnsw.len(), n);
    let qs = clustered(300, dim, 40, 0.5, 99);
    let truth = exact.search_batch(&qs, 10).unwrap();
    let got = hnsw.search_batch(&qs, 10).unwrap();
    let recall = recall_at_k(&truth, &got);
    assert!(recall >= 0.99, "recall {recall}");
    // Scores are recomputed exactly, so a found hit has the exact index's score.
    for (t, g) in truth.iter().zip(&got) {
        for h in g {
            if let Some(e) = t.iter().find(|e| e.key == h.key) {
                assert_eq!(e.score, h.score);
            }
        }
    }

    // Replace 10% (moved to other random points), delete 5%.
    let moved = clustered(n / 10, dim, 40, 0.5, 1234);
    let moved_keys: Vec<u64> = (0..n as u64).step_by(10).collect();
    exact.upsert_batch(&moved_keys, &moved).unwrap();
    hnsw.upsert_batch(&moved_keys, &moved).unwrap();
    // Every moved vector is found at its new place. (usearch's in-place slot reuse, which
    // the index deliberately avoids, lost about 2% of them here.)
    for (k, v) in moved_keys.iter().zip(moved.chunks_exact(dim)) {
        assert_eq!(hnsw.search(v, 1).unwrap()[0].key, *k);
    }
    assert_eq!(hnsw.dead_count(), moved_keys.len());
    let deleted: Vec<u64> = (3..n as u64).step_by(20).collect();
    for &k in &deleted {
        assert!(exact.remove(k).unwrap());
        assert!(hnsw.remove(k).unwrap());
    }
    assert_eq!(hnsw.len(), exact.len());
    assert_eq!(hnsw.keys(), exact.keys());
    let truth = exact.search_batch(&qs, 10).unwrap();
    let got = hnsw.search_batch(&qs, 10).unwrap();
    let recall = recall_at_k(&truth, &got);
    assert!(recall >= 0.99, "recall after updates {recall}");
    for hits in &got {
        assert!(hits.iter().all(|h| !deleted.contains(&h.key)));
    }
    assert_eq!(hnsw.get(10).unwrap(), exact.get(10).unwrap());
    assert_eq!(hnsw.get(3), None);
}

#[test]
fn single_upserts_and_reinsert_after_delete() {
    let dim = 16;
    let data = random_unit_vectors(500, dim, 5);
    let mut h = HnswIndex::new(dim, HnswParams::default()).unwrap();
    // One at a time, past the initial capacity reservation's growth points.
    for (i, v) in data.chunks_exact(dim).enumerate() {
        h.upsert(i as u64, v).unwrap();
    }
    assert_eq!(h.len(), 500);
    // Every stored vector finds itself first.
    for (i, v) in data.chunks_exact(dim).enumerate().step_by(37) {
        let top = h.search(v, 1).unwrap();
        assert_eq!(top[0].key, i as u64);
        assert!((top[0].score - 1.0).abs() < 1e-5);
    }
    assert!(h.remove(7).unwrap());
    assert!(!h.remove(7).unwrap());
    assert!(h
        .search(&data[7 * dim..8 * dim], 10)
        .unwrap()
        .iter()
        .all(|x| x.key != 7));
    h.upsert(7, &data[7 * dim..8 * dim]).unwrap();
    assert_eq!(h.search(&data[7 * dim..8 * dim], 1).unwrap()[0].key, 7);
    // Churn: replacing the same keys many times (the RL refresh pattern) keeps size and
    // quality, because usearch reuses the freed slots.
    for round in 0..20u64 {
        let fresh = random_unit_vectors(50, dim, 100 + round);
        let keys: Vec<u64> = (0..50).map(|i| i * 10).collect();
        h.upsert_batch(&keys, &fresh).unwrap();
    }
    assert_eq!(h.len(), 500);
    let v = h.get(490).unwrap();
    assert_eq!(h.search(&v, 1).unwrap()[0].key, 490);
}

#[test]
fn churn_compacts_the_graph_and_keeps_quality() {
    let (n, dim) = (1500, 32);
    let data = clustered(n, dim, 10, 0.5, 3);
    let keys: Vec<u64> = (0..n as u64).collect();
    let mut h = HnswIndex::build(dim, HnswParams::default(), &keys, &data).unwrap();
    let mut exact = ExactIndex::new(dim).unwrap();
    exact.upsert_batch(&keys, &data).unwrap();
    h.set_max_dead_fraction(f64::INFINITY);
    let refresh = |round: u64| {
        let ks: Vec<u64> = (0..100).map(|i| (i * 13 + round * 7) % n as u64).collect();
        (ks, clustered(100, dim, 10, 0.5, 500 + round))
    };
    for round in 0..12 {
        let (ks, vs) = refresh(round);
        h.upsert_batch(&ks, &vs).unwrap();
        exact.upsert_batch(&ks, &vs).unwrap();
    }
    assert_eq!(h.dead_count(), 1200, "no rebuild while disabled");
    let qs = clustered(200, dim, 10, 0.5, 77);
    let recall = recall_at_k(
        &exact.search_batch(&qs, 10).unwrap(),
        &h.search_batch(&qs, 10).unwrap(),
    );
    assert!(recall >= 0.99, "with 1200 dead nodes: {recall}");

    // Past 1024 dead nodes and half the live count, the next update rebuilds the graph.
    h.set_max_dead_fraction(0.5);
    let (ks, vs) = refresh(99);
    h.upsert_batch(&ks, &vs).unwrap();
    exact.upsert_batch(&ks, &vs).unwrap();
    assert_eq!(h.dead_count(), 0);
    assert_eq!(h.len(), n);
    assert_eq!(h.keys(), exact.keys());
    let recall = recall_at_k(
        &exact.search_batch(&qs, 10).unwrap(),
        &h.search_batch(&qs, 10).unwrap(),
    );
    assert!(recall >= 0.99, "after rebuild: {recall}");
    for k in [0u64, 13, 700] {
        assert!(h.neighbors(k, 8).unwrap().iter().all(|x| x.key != k));
    }
    // Explicit compaction of a clean graph is harmless.
    h.remove(5).unwrap();
    h.compact().unwrap();
    assert_eq!(h.dead_count(), 0);
    assert!(!h.contains(5));
    assert_eq!(h.search(&exact.get(6).unwrap(), 1).unwrap()[0].key, 6);
}

#[test]
fn batch_with_repeated_key_keeps_last_and_errors_leave_index_unchanged() {
    let mut h = HnswIndex::new(2, HnswParams::default()).unwrap();
    h.upsert_batch(&[1, 2, 1], &[1.0, 0.0, 0.0, 1.0, -1.0, 0.0])
        .unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(h.get(1).unwrap(), vec![-1.0, 0.0]);
    // A bad row anywhere rejects the whole batch before anything changes.
    let err = h.upsert_batch(&[5, 6], &[1.0, 1.0, 0.0, 0.0]).unwrap_err();
    assert!(matches!(err, IndexError::InvalidVector(_)));
    assert_eq!(h.len(), 2);
    assert!(!h.contains(5));
    assert!(matches!(
        h.upsert(u64::MAX, &[1.0, 0.0]),
        Err(IndexError::ReservedKey(_))
    ));
    assert!(HnswIndex::new(
        4,
        HnswParams {
            connectivity: 1,
            ..HnswParams::default()
        }
    )
    .is_err());
}

#[test]
fn neighbors_exist_exclude_self_and_follow_a_moved_vector() {
    // Two well separated clusters; key 0 starts in cluster A and is moved into cluster B.
    let dim = 32;
    let n = 2000;
    let data = clustered(n, dim, 2, 0.3, 21); // even index: cluster A, odd: cluster B
    let keys: Vec<u64> = (0..n as u64).collect();
    for kind in [IndexKind::Hnsw, IndexKind::Exact] {
        let mut idx = AnyIndex::new(kind, dim, HnswParams::default()).unwrap();
        idx.upsert_batch(&keys, &data).unwrap();
        let before = idx.neighbors(0, 16).unwrap();
        assert!(!before.is_empty(), "{kind:?}");
        assert!(before.len() <= 16);
        assert!(before.iter().all(|h| h.key != 0 && idx.contains(h.key)));
        assert!(before.windows(2).all(|w| w[0].score >= w[1].score));
        assert!(
            before.iter().all(|h| h.key % 2 == 0),
            "{kind:?}: neighbours of a cluster-A point should be in A: {before:?}"
        );

        let target = data[dim..2 * dim].to_vec(); // key 1, in cluster B
        let jitter: Vec<f32> = target
            .iter()
            .enumerate()
            .map(|(i, x)| x + 0.01 * (i % 3) as f32)
            .collect();
        idx.upsert(0, &jitter).unwrap();
        let after = idx.neighbors(0, 16).unwrap();
        assert!(!after.is_empty());
        assert!(after.iter().all(|h| h.key != 0 && idx.contains(h.key)));
        let in_b = after.iter().filter(|h| h.key % 2 == 1).count();
        assert!(
            in_b == after.len(),
            "{kind:?}: after moving, neighbours should be in B: {after:?}"
        );
        // A deleted key is never anyone's neighbour.
        let victim = after[0].key;
        idx.remove(victim).unwrap();
        for k in [0u64, 1, 3, 5] {
            if k != victim {
                assert!(idx
                    .neighbors(k, 64)
                    .unwrap()
                    .iter()
                    .all(|h| h.key != victim));
            }
        }
        assert!(matches!(
            idx.neighbors(victim, 5),
            Err(IndexError::KeyNotFound(_))
        ));
    }
}

#[test]
fn concurrent_searches_from_many_threads() {
    let dim = 24;
    let data = random_unit_vectors(3000, dim, 9);
    let keys: Vec<u64> = (0..3000).collect();
    let h = HnswIndex::build(dim, HnswParams::default(), &keys, &data).unwrap();
    let expected: Vec<_> = data
        .chunks_exact(dim)
        .map(|q| h.search(q, 5).unwrap())
        .collect();
    // More threads than usearch has contexts for: the gate must make them wait, not fail,
    // and a search on a fixed graph gives the same answer from any thread.
    std::thread::scope(|s| {
        for t in 0..64 {
            let (h, data, expected) = (&h, &data, &expected);
            s.spawn(move || {
                for i in 0..20 {
                    let row = (t * 20 + i) % 3000;
                    let hits = h.search(&data[row * dim..(row + 1) * dim], 5).unwrap();
                    assert_eq!(hits, expected[row]);
                }
            });
        }
    });
}
