//! The data order of a run, a pure function of the seed and the position: each epoch is a
//! Fisher–Yates shuffle keyed by `(seed, epoch)`, a batch never spans two epochs (an epoch's
//! tail that cannot fill one is skipped), and every other draw (negatives, sampling seeds,
//! probes) comes from a [`Stream`] keyed by what it is for. A resumed run therefore draws
//! exactly what the straight run drew, from nothing but the [`Cursor`] in its checkpoint.

use serde::{Deserialize, Serialize};

/// SplitMix64 finaliser.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A stateless random stream keyed by `(seed, a, b)`.
pub(crate) struct Stream(u64);

impl Stream {
    pub(crate) fn new(seed: u64, a: u64, b: u64) -> Self {
        Stream(mix(
            mix(mix(seed) ^ a) ^ b.wrapping_mul(0xA24B_AED4_963E_E407)
        ))
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Partial Fisher–Yates: moves a uniform sample of `k` items (in sampled order) to the
    /// front of `items` and drops the rest.
    pub(crate) fn sample<T>(&mut self, items: &mut Vec<T>, k: usize) {
        let k = k.min(items.len());
        for i in 0..k {
            let j = i + self.below(items.len() - i);
            items.swap(i, j);
        }
        items.truncate(k);
    }
}

/// Query order of `epoch` (Fisher–Yates from the seed).
fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Stream::new(seed, 0x0e0c, epoch);
    for i in (1..n).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order
}

/// Position in the data stream: the next batch starts at `pos` of epoch `epoch`'s order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub(crate) struct Cursor {
    pub(crate) epoch: u64,
    pub(crate) pos: usize,
}

/// Batches of query indices in seeded epoch order, from a [`Cursor`].
pub(crate) struct Epochs {
    n: usize,
    seed: u64,
    order: Vec<usize>,
}

impl Epochs {
    /// The order of `n` queries under `seed`, positioned at `cursor`'s epoch.
    pub(crate) fn new(n: usize, seed: u64, cursor: Cursor) -> Self {
        Epochs {
            n,
            seed,
            order: epoch_order(n, seed, cursor.epoch),
        }
    }

    /// The next `b` query indices; moves `cursor` on (to the next epoch first when this one
    /// cannot fill the batch).
    pub(crate) fn next_batch(&mut self, cursor: &mut Cursor, b: usize) -> &[usize] {
        if cursor.pos + b > self.n {
            *cursor = Cursor {
                epoch: cursor.epoch + 1,
                pos: 0,
            };
            self.order = epoch_order(self.n, self.seed, cursor.epoch);
        }
        cursor.pos += b;
        &self.order[cursor.pos - b..cursor.pos]
    }
}
