//! Medians, ranges and pair-wise ratios.

use serde::{Deserialize, Serialize};

/// Median, minimum and maximum of a sample.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

/// The median (mean of the two middle values for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

pub fn summarize(values: &[f64]) -> Option<Summary> {
    let median = median(values)?;
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some(Summary { median, min, max, n: values.len() })
}

/// Ratios `a / b` of the rounds present in both samples (`(round, value)` pairs), in
/// round order. A noisy stretch of the run affects both members of a pair alike, so the
/// ratios are steadier than the ratio of two medians.
pub fn pairwise_ratios(a: &[(u32, f64)], b: &[(u32, f64)]) -> Vec<f64> {
    let mut out: Vec<(u32, f64)> = a
        .iter()
        .filter_map(|&(ra, va)| {
            b.iter().find(|&&(rb, _)| rb == ra).filter(|&&(_, vb)| vb > 0.0).map(|&(_, vb)| (ra, va / vb))
        })
        .collect();
    out.sort_by_key(|&(r, _)| r);
    out.into_iter().map(|(_, v)| v).collect()
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The step for qemu-img bench's scattered pattern: `offset = (offset + step) % (size - bs)`.
/// An odd multiple `k * bs` near 1 MiB with `k` coprime to `size / bs - 1` visits every one
/// of the `size / bs - 1` slots before repeating (257 alone fails on 256 MiB images, where
/// 65535 = 3 * 5 * 17 * 257).
pub fn scatter_step(size: u64, bs: u64) -> u64 {
    let slots = (size / bs).saturating_sub(1);
    if slots < 3 {
        return bs;
    }
    let mut k = 257u64.min(slots - 1) | 1;
    while k < slots {
        if gcd(k, slots) == 1 {
            return k * bs;
        }
        k += 2;
    }
    bs
}

/// The number of distinct offsets the step pattern visits before it wraps.
pub fn step_period(size: u64, bs: u64, step: u64) -> u64 {
    if size <= bs {
        return 1;
    }
    let m = (size - bs) / bs;
    m / gcd(step / bs, m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn summary_min_max() {
        let s = summarize(&[10.0, 30.0, 20.0, 5.0, 50.0]).unwrap();
        assert_eq!(s, Summary { median: 20.0, min: 5.0, max: 50.0, n: 5 });
        assert!(summarize(&[]).is_none());
    }

    #[test]
    fn ratios_pair_by_round() {
        let q = [(1, 100.0), (2, 90.0), (3, 120.0)];
        let r = [(3, 60.0), (1, 50.0)]; // round 2 of raw failed
        assert_eq!(pairwise_ratios(&q, &r), vec![2.0, 2.0]);
        // the pair-wise median differs from the ratio of medians
        let q = [(1, 100.0), (2, 50.0), (3, 80.0)];
        let r = [(1, 100.0), (2, 50.0), (3, 40.0)];
        let p = pairwise_ratios(&q, &r);
        assert_eq!(p, vec![1.0, 1.0, 2.0]);
        assert_eq!(median(&p), Some(1.0));
        assert!(pairwise_ratios(&q, &[(1, 0.0)]).is_empty());
    }

    #[test]
    fn step_covers_all_slots() {
        for size in [256u64 << 20, 1 << 30, 2 << 30, 64 << 20] {
            let step = scatter_step(size, 4096);
            assert_eq!(step % 4096, 0);
            assert_eq!(step_period(size, 4096, step), size / 4096 - 1, "size {size}");
        }
        // the naive 257-block step covers only 255 slots of a 256 MiB image
        assert_eq!(step_period(256 << 20, 4096, 257 * 4096), 255);
        assert_eq!(scatter_step(8192, 4096), 4096);
    }
}
