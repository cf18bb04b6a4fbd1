//! Splitting one iteration's sequences into `m` micro-batches of similar token counts,
//! keeping their order.

use tandem_sched::ScheduledSeq;

/// Indices of `seqs` per micro-batch: at most `m` non-empty groups, contiguous, balanced by
/// tokens. Always at least one group (maybe empty) so that the protocol has a slot to run.
pub fn split(seqs: &[ScheduledSeq], m: usize) -> Vec<Vec<usize>> {
    let m = m.max(1);
    let total: usize = seqs.iter().map(|s| s.token_ids.len()).sum();
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); m];
    let mut g = 0;
    let mut acc = 0usize;
    for (i, s) in seqs.iter().enumerate() {
        // Move on once this group holds its share, leaving at least one sequence per
        // remaining group where possible.
        let share = total * (g + 1) / m;
        if g + 1 < m && acc >= share && !groups[g].is_empty() {
            g += 1;
        }
        groups[g].push(i);
        acc += s.token_ids.len();
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

    #[test]
    fn balanced_and_ordered() {
        let seqs: Vec<_> = (0..8).map(|_| seq(1)).collect();
        let g = split(&seqs, 2);
        assert_eq!(g, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        let g = split(&seqs, 3);
        assert_eq!(g.concat(), (0..8).collect::<Vec<_>>());
        assert!(g.iter().all(|x| !x.is_empty()));
        // Fewer sequences than micro-batches: trailing groups are empty.
        let g = split(&seqs[..1], 3);
        assert_eq!(g, vec![vec![0], vec![], vec![]]);
        assert_eq!(split(&[], 2), vec![Vec::<usize>::new(), vec![]]);
    }
}
