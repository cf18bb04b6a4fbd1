//! Splitting one iteration's sequences into `m` micro-batches of similar token counts,
//! keeping their order.
//!
//! The expert side's work is proportional to tokens, so the split balances tokens, not
//! sequences: when a long prefill chunk and many one-token decodes share an iteration, the
//! prefill gets a micro-batch of its own rather than the first half of the sequences.

use tandem_sched::ScheduledSeq;

/// Indices of `seqs` per micro-batch: `m` contiguous groups (in order) whose largest token
/// count is as small as possible; every group is non-empty when there are at least `m`
/// sequences, otherwise one sequence per group and the trailing groups empty. Always at least
/// one group (maybe empty) so that the protocol has a slot to run.
pub fn split(seqs: &[ScheduledSeq], m: usize) -> Vec<Vec<usize>> {
    let tokens: Vec<usize> = seqs.iter().map(|s| s.token_ids.len()).collect();
    cuts_to_groups(&balanced_cuts(&tokens, m.max(1)), m.max(1))
}

/// End index (exclusive) of each non-empty group of the best contiguous partition of `w`
/// into `min(m, w.len())` non-empty groups, minimising the largest group sum (ties: the
/// earliest cut). Exact dynamic programme, O(m n^2) for n sequences (n <= max_num_seqs).
fn balanced_cuts(w: &[usize], m: usize) -> Vec<usize> {
    let n = w.len();
    let k = m.min(n);
    if k == 0 {
        return vec![];
    }
    let mut prefix = vec![0usize; n + 1];
    for (i, x) in w.iter().enumerate() {
        prefix[i + 1] = prefix[i] + x;
    }
    // best[g][i]: smallest max over g non-empty groups covering w[..i]; from[g][i]: the start
    // of the last of those groups.
    let mut best = vec![vec![usize::MAX; n + 1]; k + 1];
    let mut from = vec![vec![0usize; n + 1]; k + 1];
    best[0][0] = 0;
    for g in 1..=k {
        for i in g..=n {
            for j in (g - 1)..i {
                if best[g - 1][j] == usize::MAX {
                    continue;
                }
                let c = best[g - 1][j].max(prefix[i] - prefix[j]);
                if c < best[g][i] {
                    best[g][i] = c;
                    from[g][i] = j;
                }
            }
        }
    }
    let mut ends = vec![0usize; k];
    let mut i = n;
    for g in (1..=k).rev() {
        ends[g - 1] = i;
        i = from[g][i];
    }
    ends
}

fn cuts_to_groups(ends: &[usize], m: usize) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); m];
    let mut start = 0;
    for (g, &end) in ends.iter().enumerate() {
        groups[g] = (start..end).collect();
        start = end;
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::RequestId;

    fn seq(n: usize) -> ScheduledSeq {
        ScheduledSeq {
            id: RequestId(0),
            token_ids: vec![1; n],
            start_pos: 0,
            block_table: vec![],
            samples: true,
        }
    }

    fn loads(seqs: &[ScheduledSeq], g: &[Vec<usize>]) -> Vec<usize> {
        g.iter()
            .map(|x| x.iter().map(|&i| seqs[i].token_ids.len()).sum())
            .collect()
    }

    #[test]
    fn balanced_and_ordered() {
        let seqs: Vec<_> = (0..8).map(|_| seq(1)).collect();
        let g = split(&seqs, 2);
        assert_eq!(g, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        let g = split(&seqs, 3);
        assert_eq!(g.concat(), (0..8).collect::<Vec<_>>());
        assert!(g.iter().all(|x| !x.is_empty()));
        assert_eq!(loads(&seqs, &g).iter().max(), Some(&3));
        // Fewer sequences than micro-batches: trailing groups are empty.
        let g = split(&seqs[..1], 3);
        assert_eq!(g, vec![vec![0], vec![], vec![]]);
        assert_eq!(split(&[], 2), vec![Vec::<usize>::new(), vec![]]);
        assert_eq!(split(&seqs[..3], 1), vec![vec![0, 1, 2]]);
    }

    #[test]
    fn balances_tokens_when_prefill_and_decode_mix() {
        // 30 decodes then a prefill chunk: the chunk gets a micro-batch of its own.
        let mut seqs: Vec<_> = (0..30).map(|_| seq(1)).collect();
        seqs.push(seq(500));
        let g = split(&seqs, 2);
        assert_eq!(g[1], vec![30]);
        assert_eq!(loads(&seqs, &g), vec![30, 500]);
        // Two equal chunks and two decodes: a greedy "fill to half" would put both chunks in
        // the first micro-batch.
        let seqs = vec![seq(600), seq(600), seq(1), seq(1)];
        let g = split(&seqs, 2);
        assert_eq!(loads(&seqs, &g), vec![600, 602]);
        // Every split is a contiguous, ordered cover with the smallest possible maximum.
        let seqs: Vec<_> = [5, 1, 9, 2, 2, 7, 1, 1, 30, 4, 4]
            .iter()
            .map(|&n| seq(n))
            .collect();
        for m in 1..=6 {
            let g = split(&seqs, m);
            assert_eq!(g.len(), m);
            assert_eq!(g.concat(), (0..seqs.len()).collect::<Vec<_>>());
            assert!(g.iter().all(|x| !x.is_empty()));
            let max = *loads(&seqs, &g).iter().max().unwrap();
            // The largest single sequence bounds it from below; 30 must be reached at m >= 3.
            assert!(max >= 30);
            if m >= 3 {
                assert_eq!(max, 30, "m = {m}: {g:?}");
            }
        }
    }
}
