//! Deterministic randomness and filler text for the simulation.
//!
//! The demo must behave the same on every machine (the test asserts on its
//! outcome), so everything random comes from a seeded splitmix64 generator:
//! the fleet seeds it per run, the provider seeds it from the request body,
//! which also makes a retried call produce the same answer.

/// splitmix64: tiny, fast, good enough for shaping simulated traffic.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next_u64() % items.len().max(1) as u64) as usize]
    }
}

/// FNV-1a: a stable hash (std's hasher makes no promise across versions).
pub fn hash_bytes(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[rustfmt::skip]
const VOCABULARY: &[&str] = &[
    "the", "customer", "order", "refund", "shipping", "account", "invoice", "policy", "we",
    "should", "check", "latest", "status", "of", "and", "then", "summarise", "findings", "for",
    "report", "source", "market", "pricing", "competitor", "analysis", "data", "shows", "that",
    "growth", "in", "region", "is", "driven", "by", "demand", "next", "step", "search",
    "verify", "claim", "with", "two", "independent", "sources", "answer", "draft", "ticket",
    "escalate", "priority", "a", "to", "is", "not", "yet", "confirmed", "plan", "tool",
    "result", "because",
];

/// `n` words of plausible agent prose; a word stands for about one token.
pub fn words(rng: &mut Rng, n: u64) -> String {
    let mut out = String::with_capacity(n as usize * 7);
    for i in 0..n {
        if i > 0 {
            out.push(' ');
        }
        let word: &&str = rng.pick(VOCABULARY);
        out.push_str(word);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }

    #[test]
    fn range_stays_inside() {
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            let v = rng.range(50, 800);
            assert!((50..=800).contains(&v));
        }
        assert_eq!(rng.range(5, 5), 5);
        assert_eq!(rng.range(9, 3), 9);
    }

    #[test]
    fn words_counts_words() {
        let mut rng = Rng::new(3);
        assert_eq!(words(&mut rng, 12).split(' ').count(), 12);
        assert!(words(&mut rng, 0).is_empty());
    }
}
