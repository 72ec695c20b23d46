//! A deterministic, stratified train/eval split.
//!
//! The algorithm, so that other tools can reproduce a split exactly:
//!
//! 1. Each example gets the key [`split_key`]`(seed, id)` =
//!    `fmix64(fnv1a64(format!("{seed}:{id}")))`: [FNV-1a], 64-bit, over the UTF-8 bytes
//!    of the decimal seed, a colon and the example's [`id`](crate::data::Example::id)
//!    (for instance `"42:line 17"` or `"42:sport/001.txt"`), followed by MurmurHash3's
//!    64-bit finaliser [`fmix64`]. Ties are broken by the id. (FNV-1a alone is not
//!    enough: its high bits barely depend on the last bytes, so sorting by it puts
//!    `line 200` ... `line 249` next to each other and the eval set would be a
//!    contiguous block of the file.)
//! 2. Examples are grouped by label. In each group of `n` examples, sorted by key, the
//!    first `k = floor(n * fraction + 0.5)` go to the eval set and the rest to the
//!    training set, where `k` is raised to 1 if `n >= 2` and `fraction > 0`, and lowered
//!    to `n - 1` so that a class never goes entirely to the eval set. `fraction` is
//!    clamped to `[0, 1]` (NaN counts as 0).
//! 3. Both sets are sorted by key (then id), which mixes the classes in an order that
//!    depends only on the seed and the ids.
//!
//! In Python:
//!
//! ```python
//! import math
//!
//! M = 0xFFFFFFFFFFFFFFFF
//!
//! def fnv1a64(s):
//!     h = 0xcbf29ce484222325
//!     for b in s.encode("utf-8"):
//!         h = ((h ^ b) * 0x100000001b3) & M
//!     return h
//!
//! def fmix64(k):
//!     k ^= k >> 33
//!     k = (k * 0xff51afd7ed558ccd) & M
//!     k ^= k >> 33
//!     k = (k * 0xc4ceb9fe1a85ec53) & M
//!     k ^= k >> 33
//!     return k
//!
//! def split_key(seed, id):
//!     return fmix64(fnv1a64(f"{seed}:{id}"))
//!
//! def stratified_split(examples, label, fraction, seed):   # examples: dicts with "id"
//!     key = lambda ex: (split_key(seed, ex["id"]), ex["id"].encode("utf-8"))
//!     groups = {}
//!     for ex in examples:
//!         groups.setdefault(label(ex), []).append(ex)
//!     fraction = min(max(fraction, 0.0), 1.0)
//!     train, evals = [], []
//!     for lab in sorted(groups):
//!         g = sorted(groups[lab], key=key)
//!         n = len(g)
//!         k = math.floor(n * fraction + 0.5)
//!         if n >= 2 and fraction > 0:
//!             k = max(k, 1)
//!         k = min(k, max(n - 1, 0))
//!         evals += g[:k]
//!         train += g[k:]
//!     return sorted(train, key=key), sorted(evals, key=key)
//! ```
//!
//! Because the key is built from the id, and file formats use `"line N"` as the id,
//! moving rows within a file changes the split; adding rows at the end does not move
//! earlier rows between the sets unless it changes a class's `k`.
//!
//! [FNV-1a]: http://www.isthe.com/chongo/tech/comp/fnv/

use std::collections::BTreeMap;

use crate::data::reader::Example;

/// The FNV-1a 64-bit offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// The FNV 64-bit prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a, 64-bit, over the UTF-8 bytes of `s`: start from `0xcbf29ce484222325`; for
/// each byte, xor it in, then multiply by `0x100000001b3` modulo 2^64.
pub fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(FNV_OFFSET, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// MurmurHash3's 64-bit finaliser: `k ^= k >> 33; k *= 0xff51afd7ed558ccd;
/// k ^= k >> 33; k *= 0xc4ceb9fe1a85ec53; k ^= k >> 33` (multiplications modulo 2^64).
/// Every input bit affects every output bit.
pub fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The sort key of the example with id `id` under `seed`:
/// `fmix64(fnv1a64(format!("{seed}:{id}")))`. Usable wherever a seeded, reproducible
/// order of examples is wanted.
pub fn split_key(seed: u64, id: &str) -> u64 {
    fmix64(fnv1a64(&format!("{seed}:{id}")))
}

/// Splits `examples` into `(train, eval)`, holding out about `fraction` of each class
/// (as given by `labels`) for evaluation. Deterministic: the same examples, ids and
/// `seed` always give the same split, in the same order. The algorithm is described
/// in the [module documentation](self). No example is lost or duplicated.
pub fn stratified_split(
    examples: Vec<Example>,
    labels: impl Fn(&Example) -> String,
    fraction: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>) {
    let fraction = if fraction.is_nan() {
        0.0
    } else {
        fraction.clamp(0.0, 1.0)
    };
    let mut groups: BTreeMap<String, Vec<(u64, Example)>> = BTreeMap::new();
    for ex in examples {
        let key = split_key(seed, &ex.id);
        groups.entry(labels(&ex)).or_default().push((key, ex));
    }
    let by_key = |a: &(u64, Example), b: &(u64, Example)| a.0.cmp(&b.0).then(a.1.id.cmp(&b.1.id));
    let mut train = Vec::new();
    let mut eval = Vec::new();
    for (_, mut group) in groups {
        group.sort_by(by_key);
        let n = group.len();
        let mut k = (n as f64 * fraction + 0.5).floor() as usize;
        if n >= 2 && fraction > 0.0 {
            k = k.max(1);
        }
        k = k.min(n.saturating_sub(1));
        let rest = group.split_off(k);
        eval.extend(group);
        train.extend(rest);
    }
    train.sort_by(by_key);
    eval.sort_by(by_key);
    let strip = |v: Vec<(u64, Example)>| v.into_iter().map(|(_, ex)| ex).collect();
    (strip(train), strip(eval))
}

/// `n` of `examples` (all of them when there are no more), every stratum in proportion
/// to its size (largest remainders) and, when `n` allows, at least once; within a stratum
/// the first ones are kept, and the examples keep their order.
pub fn stratified_sample(
    examples: Vec<Example>,
    stratum: impl Fn(&Example) -> String,
    n: usize,
) -> Vec<Example> {
    let total = examples.len();
    if n >= total {
        return examples;
    }
    let keys: Vec<String> = examples.iter().map(&stratum).collect();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for k in &keys {
        *counts.entry(k.as_str()).or_default() += 1;
    }
    // (stratum, size, quota, remainder of its exact share)
    let mut quota: Vec<(&str, usize, usize, f64)> = counts
        .iter()
        .map(|(&k, &c)| {
            let exact = n as f64 * c as f64 / total as f64;
            (k, c, exact.floor() as usize, exact - exact.floor())
        })
        .collect();
    if n >= quota.len() {
        for q in quota.iter_mut().filter(|q| q.2 == 0) {
            q.2 = 1;
            q.3 = 0.0;
        }
    }
    let mut sum: usize = quota.iter().map(|q| q.2).sum();
    while sum > n {
        // Take back from the largest quota (never below one).
        let q = quota
            .iter_mut()
            .filter(|q| q.2 > 1)
            .max_by_key(|q| q.2)
            .expect("some quota exceeds one while the sum exceeds n >= strata");
        q.2 -= 1;
        sum -= 1;
    }
    let mut order: Vec<usize> = (0..quota.len()).collect();
    order.sort_by(|&a, &b| quota[b].3.total_cmp(&quota[a].3).then(a.cmp(&b)));
    for i in order.into_iter().cycle() {
        if sum == n {
            break;
        }
        if quota[i].2 < quota[i].1 {
            quota[i].2 += 1;
            sum += 1;
        }
    }
    let mut left: BTreeMap<&str, usize> = quota.iter().map(|q| (q.0, q.2)).collect();
    let keep: Vec<bool> = keys
        .iter()
        .map(|k| {
            let l = left.get_mut(k.as_str()).expect("every key counted");
            let take = *l > 0;
            *l = l.saturating_sub(1);
            take
        })
        .collect();
    examples
        .into_iter()
        .zip(keep)
        .filter_map(|(e, k)| k.then_some(e))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::reader::RawLabel;
    use std::collections::BTreeSet;

    fn data(counts: &[(&str, usize)]) -> Vec<Example> {
        let mut out = Vec::new();
        for (label, n) in counts {
            for _ in 0..*n {
                let line = out.len() + 2;
                out.push(Example {
                    id: format!("line {line}"),
                    line,
                    text: format!("text {line}"),
                    text_pair: None,
                    label: Some(RawLabel::Text(label.to_string())),
                });
            }
        }
        out
    }

    fn label(ex: &Example) -> String {
        match &ex.label {
            Some(RawLabel::Text(l)) => l.clone(),
            _ => String::new(),
        }
    }

    fn count(v: &[Example], l: &str) -> usize {
        v.iter().filter(|e| label(e) == l).count()
    }

    fn ids(v: &[Example]) -> Vec<&str> {
        v.iter().map(|e| e.id.as_str()).collect()
    }

    #[test]
    fn fnv_reference_values() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64("a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64("foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn split_key_reference_values() {
        // Computed with the Python in the module documentation.
        assert_eq!(fmix64(0), 0);
        assert_eq!(split_key(42, "line 17"), 0x4c99_c728_d46b_d553);
        assert_eq!(split_key(7, "sport/001.txt"), 0x0100_2066_e134_ed85);
    }

    #[test]
    fn eval_is_spread_over_the_file() {
        // Rows 2..=501 of one class: the held-out rows must not be a contiguous block.
        let all = data(&[("a", 500)]);
        for seed in [0, 7, 42] {
            let (_, eval) = stratified_split(all.clone(), label, 0.1, seed);
            let lines: Vec<usize> = eval.iter().map(|e| e.line).collect();
            let in_each_fifth = (0..5)
                .map(|q| lines.iter().filter(|&&l| (l - 2) / 100 == q).count())
                .collect::<Vec<_>>();
            assert!(
                in_each_fifth.iter().all(|&c| (3..=20).contains(&c)),
                "{in_each_fifth:?}"
            );
        }
    }

    #[test]
    fn keeps_class_proportions_and_every_example() {
        let all = data(&[("a", 500), ("b", 300), ("c", 41), ("d", 2), ("e", 1)]);
        let (train, eval) = stratified_split(all.clone(), label, 0.1, 7);
        assert_eq!(count(&eval, "a"), 50);
        assert_eq!(count(&eval, "b"), 30);
        assert_eq!(count(&eval, "c"), 4);
        assert_eq!(count(&eval, "d"), 1, "at least one when a class has two");
        assert_eq!(count(&eval, "e"), 0, "never a whole class");
        assert_eq!(train.len() + eval.len(), all.len());
        let mut seen: Vec<&str> = ids(&train);
        seen.extend(ids(&eval));
        let unique: BTreeSet<&str> = seen.iter().copied().collect();
        assert_eq!(unique.len(), all.len(), "no example lost or duplicated");
        // The output is label-mixed, not grouped.
        let first: BTreeSet<String> = eval.iter().take(20).map(label).collect();
        assert!(first.len() >= 2);
    }

    #[test]
    fn deterministic_per_seed() {
        let all = data(&[("x", 100), ("y", 60)]);
        let a = stratified_split(all.clone(), label, 0.2, 42);
        let b = stratified_split(all.clone(), label, 0.2, 42);
        assert_eq!(a, b);
        let c = stratified_split(all.clone(), label, 0.2, 43);
        assert_ne!(ids(&a.1), ids(&c.1));
        // Input order does not matter.
        let mut rev = all;
        rev.reverse();
        assert_eq!(stratified_split(rev, label, 0.2, 42), a);
    }

    #[test]
    fn edge_fractions() {
        let all = data(&[("x", 5), ("y", 4)]);
        let (train, eval) = stratified_split(all.clone(), label, 0.0, 1);
        assert_eq!((train.len(), eval.len()), (9, 0));
        let (train, eval) = stratified_split(all.clone(), label, f64::NAN, 1);
        assert_eq!((train.len(), eval.len()), (9, 0));
        let (train, eval) = stratified_split(all.clone(), label, 1.0, 1);
        assert_eq!((train.len(), eval.len()), (2, 7));
        let (train, eval) = stratified_split(all.clone(), label, 7.0, 1);
        assert_eq!((train.len(), eval.len()), (2, 7));
        // round half up: 5 * 0.5 = 2.5 -> 3, 4 * 0.5 = 2
        let (_, eval) = stratified_split(all, label, 0.5, 1);
        assert_eq!((count(&eval, "x"), count(&eval, "y")), (3, 2));
        let (train, eval) = stratified_split(Vec::new(), label, 0.5, 1);
        assert!(train.is_empty() && eval.is_empty());
    }

    #[test]
    fn order_is_by_hash_key() {
        let all = data(&[("x", 10), ("y", 10)]);
        let (train, eval) = stratified_split(all, label, 0.3, 5);
        for part in [&train, &eval] {
            let keys: Vec<u64> = part.iter().map(|e| split_key(5, &e.id)).collect();
            assert!(keys.windows(2).all(|w| w[0] <= w[1]));
        }
        // Within a class, the eval examples are the ones with the smallest keys.
        let max_eval = eval
            .iter()
            .filter(|e| label(e) == "x")
            .map(|e| split_key(5, &e.id))
            .max();
        let min_train = train
            .iter()
            .filter(|e| label(e) == "x")
            .map(|e| split_key(5, &e.id))
            .min();
        assert!(max_eval < min_train);
    }

    #[test]
    fn a_stratified_sample_keeps_every_class_and_the_order() {
        let ex = data(&[("a", 90), ("b", 9), ("c", 1)]);
        let s = stratified_sample(ex.clone(), label, 20);
        assert_eq!(s.len(), 20);
        assert_eq!((count(&s, "a"), count(&s, "b"), count(&s, "c")), (18, 1, 1));
        // The first of each class, in the original order.
        let pos: Vec<usize> = s
            .iter()
            .map(|e| ex.iter().position(|x| x.id == e.id).unwrap())
            .collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(ids(&s)[..3], ["line 2", "line 3", "line 4"]);
        for n in [0, 1, 2, 3, 7, 50, 99, 100, 150] {
            let s = stratified_sample(ex.clone(), label, n);
            assert_eq!(s.len(), n.min(100), "{n}");
            if n >= 3 {
                assert!(count(&s, "c") == 1 && count(&s, "b") >= 1, "{n}");
            }
        }
    }
}
