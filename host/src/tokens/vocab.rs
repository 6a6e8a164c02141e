//! A byte-pair vocabulary kept small. Counting tokens needs only each
//! token's bytes and rank: the bytes stay in the binary's read-only data
//! (written by `build.rs`) and one hash table maps them to their rank,
//! about 7 MB for o200k where bpe-openai's encoder tables take ~67 MB. A
//! gateway is sized by its memory, so the difference is most of its
//! resident set.
//!
//! The merge order is tiktoken's: the adjacent pair whose concatenation has
//! the lowest rank merges first, the leftmost on ties. A heap keeps each
//! piece O(n log n), so a megabyte of letters without a space cannot make
//! counting quadratic.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rustc_hash::FxHashMap;

pub struct Vocab {
    ranks: FxHashMap<&'static [u8], u32>,
}

/// Reused per thread so counting a piece allocates nothing once warm.
#[derive(Default)]
struct Scratch {
    /// For each part (named by the byte it starts at), where the next part
    /// starts: its end.
    next: Vec<u32>,
    prev: Vec<u32>,
    alive: Vec<bool>,
    /// Candidate merges: (rank, left part, right part, right part's end
    /// when pushed). An entry whose parts changed since is skipped.
    heap: BinaryHeap<Reverse<(u32, u32, u32, u32)>>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

const NONE: u32 = u32::MAX;

impl Vocab {
    /// Reads the layout `build.rs` writes: the token count, each token's
    /// end offset, then every token's bytes in rank order (u32 LE).
    pub fn parse(data: &'static [u8]) -> Vocab {
        let word = |i: usize| -> usize {
            data.get(4 * i..4 * i + 4)
                .and_then(|w| <[u8; 4]>::try_from(w).ok())
                .map_or(0, |w| u32::from_le_bytes(w) as usize)
        };
        let n = word(0);
        let bytes = data.get(4 * (n + 1)..).unwrap_or_default();
        let mut ranks = FxHashMap::with_capacity_and_hasher(n, Default::default());
        let mut start = 0;
        for rank in 0..n {
            let end = word(rank + 1);
            if let Some(token) = bytes.get(start..end) {
                ranks.insert(token, rank as u32);
            }
            start = end;
        }
        Vocab { ranks }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ranks.len()
    }

    fn rank(&self, bytes: &[u8]) -> Option<u32> {
        self.ranks.get(bytes).copied()
    }

    /// Tokens in one pre-tokenizer piece.
    pub fn count(&self, piece: &[u8]) -> usize {
        let n = piece.len();
        if n <= 1 || self.rank(piece).is_some() {
            return n.min(1);
        }
        SCRATCH.with(|s| self.merge(piece, &mut s.borrow_mut()))
    }

    fn merge(&self, piece: &[u8], s: &mut Scratch) -> usize {
        let n = piece.len();
        // Pieces come from text the gateway already holds in memory, far
        // below 4 GiB, so every offset fits in u32.
        let Ok(n32) = u32::try_from(n) else {
            return n;
        };
        s.next.clear();
        s.next.extend(1..=n32);
        s.prev.clear();
        s.prev.push(NONE);
        s.prev.extend(0..n32 - 1);
        s.alive.clear();
        s.alive.resize(n, true);
        s.heap.clear();
        for i in 0..n32 - 1 {
            if let Some(r) = self.rank(&piece[i as usize..i as usize + 2]) {
                s.heap.push(Reverse((r, i, i + 1, i + 2)));
            }
        }
        let mut parts = n;
        while let Some(Reverse((_, l, r, r_end))) = s.heap.pop() {
            let (li, ri) = (l as usize, r as usize);
            if !s.alive[li] || s.next[li] != r || s.next[ri] != r_end {
                continue;
            }
            s.alive[ri] = false;
            s.next[li] = r_end;
            if r_end < n32 {
                s.prev[r_end as usize] = l;
            }
            parts -= 1;
            let p = s.prev[li];
            if p != NONE
                && let Some(rank) = self.rank(&piece[p as usize..r_end as usize])
            {
                s.heap.push(Reverse((rank, p, l, r_end)));
            }
            if r_end < n32 {
                let e = s.next[r_end as usize];
                if let Some(rank) = self.rank(&piece[li..e as usize]) {
                    s.heap.push(Reverse((rank, l, r_end, e)));
                }
            }
        }
        parts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(tokens: &[&'static str]) -> Vocab {
        Vocab {
            ranks: tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.as_bytes(), i as u32))
                .collect(),
        }
    }

    #[test]
    fn merges_lowest_rank_first_and_leftmost_on_ties() {
        let v = vocab(&["a", "b", "c", "ab", "bc", "aa", "aaa"]);
        // "ab" (rank 3) merges before "bc" (rank 4): [ab][c].
        assert_eq!(v.count(b"abc"), 2);
        // Ties go leftmost: [aa][aa], never [a][aa][a].
        assert_eq!(v.count(b"aaaa"), 2);
        // A merged pair can merge again: [aa]+[a] -> [aaa].
        assert_eq!(v.count(b"aaa"), 1);
        assert_eq!(v.count(b""), 0);
        assert_eq!(v.count(b"x"), 1);
        assert_eq!(v.count(b"xyz"), 3);
    }
}
