//! Property test of the block manager against a fake KV cache.
//!
//! Random sequences of allocate (with prompts drawn from a few shared prefixes), compute
//! (write the tokens into their slots and register full blocks), append (grow for decode),
//! and free. After every operation the manager's invariants hold; a prefix-cache hit must
//! point at slots that really hold the prompt's tokens; computing never writes into a block
//! another sequence holds; failed allocations change nothing; freeing everything frees every
//! block.

use std::collections::BTreeMap;

use proptest::prelude::*;
use tandem_core::RequestId;
use tandem_sched::{BlockError, BlockManager};

#[derive(Debug, Clone)]
enum Op {
    Alloc {
        seq: u64,
        prefix: usize,
        suffix: usize,
    },
    Compute {
        seq: u64,
        n: usize,
    },
    Append {
        seq: u64,
        n: usize,
    },
    Free {
        seq: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..6, 0usize..4, 0usize..10).prop_map(|(seq, prefix, suffix)| Op::Alloc {
            seq,
            prefix,
            suffix
        }),
        (0u64..6, 1usize..12).prop_map(|(seq, n)| Op::Compute { seq, n }),
        (0u64..6, 1usize..6).prop_map(|(seq, n)| Op::Append { seq, n }),
        (0u64..6).prop_map(|seq| Op::Free { seq }),
    ]
}

struct Model {
    tokens: Vec<u32>,
    computed: usize,
}

fn tokens(seed: u64, len: usize) -> Vec<u32> {
    (0..len as u64)
        .map(|i| ((seed * 31 + i * 7 + (seed ^ i) % 5) % 11) as u32)
        .collect()
}

fn fail(e: BlockError) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_ops_keep_invariants_and_never_leak(
        num_blocks in 1usize..16,
        block_size in 1usize..5,
        caching in any::<bool>(),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        let mut bm = BlockManager::new(num_blocks, block_size, caching).map_err(fail)?;
        let bs = block_size;
        let mut kv: Vec<Option<u32>> = vec![None; num_blocks * bs];
        let mut seqs: BTreeMap<u64, Model> = BTreeMap::new();
        let prefixes: Vec<Vec<u32>> = (0..4).map(|k| tokens(100 + k, k as usize * 3)).collect();
        let mut counter = 0u64;
        let slot = |table: &[u32], p: usize| table[p / bs] as usize * bs + p % bs;

        for op in ops {
            counter += 1;
            match op {
                Op::Alloc { seq, prefix, suffix } => {
                    let id = RequestId(seq);
                    if seqs.contains_key(&seq) {
                        prop_assert_eq!(bm.allocate(id, &[1]), Err(BlockError::AlreadyAllocated(id)));
                        continue;
                    }
                    let mut t = prefixes[prefix].clone();
                    t.extend(tokens(counter, suffix));
                    let free_before = bm.num_free_blocks();
                    match bm.allocate(id, &t) {
                        Ok(out) => {
                            let k = out.num_cached_tokens;
                            prop_assert!(k % bs == 0);
                            prop_assert!(t.is_empty() || k < t.len());
                            prop_assert!(caching || k == 0);
                            let table = bm.block_table(id).unwrap_or(&[]).to_vec();
                            prop_assert_eq!(table.len(), t.len().div_ceil(bs));
                            for (p, &tok) in t.iter().enumerate().take(k) {
                                prop_assert_eq!(kv[slot(&table, p)], Some(tok), "stale cache hit");
                            }
                            seqs.insert(seq, Model { tokens: t, computed: k });
                        }
                        Err(BlockError::OutOfBlocks { .. }) => {
                            prop_assert!(!bm.contains(id));
                            prop_assert_eq!(bm.num_free_blocks(), free_before);
                            prop_assert!(!bm.can_allocate(t.len()));
                        }
                        Err(e) => return Err(fail(e)),
                    }
                }
                Op::Compute { seq, n } => {
                    let id = RequestId(seq);
                    let keys = seqs_keys(&seqs);
                    let Some(m) = seqs.get(&seq) else { continue };
                    let table = bm.block_table(id).unwrap_or(&[]).to_vec();
                    let end = (m.computed + n).min(m.tokens.len()).min(table.len() * bs);
                    for p in m.computed..end {
                        let b = table[p / bs];
                        for (other, _) in seqs_tables(&bm, seq, &keys) {
                            prop_assert!(!other.contains(&b), "write into a shared block");
                        }
                        kv[slot(&table, p)] = Some(m.tokens[p]);
                    }
                    let m = seqs.get_mut(&seq).ok_or_else(|| TestCaseError::fail("gone"))?;
                    m.computed = m.computed.max(end);
                    bm.register_computed(id, &m.tokens, m.computed).map_err(fail)?;
                }
                Op::Append { seq, n } => {
                    let id = RequestId(seq);
                    let Some(m) = seqs.get_mut(&seq) else {
                        prop_assert_eq!(bm.append_slots(id, n), Err(BlockError::UnknownSequence(id)));
                        continue;
                    };
                    let new_len = m.tokens.len() + n;
                    let before = bm.block_table(id).map_or(0, <[u32]>::len);
                    match bm.append_slots(id, new_len) {
                        Ok(added) => {
                            prop_assert_eq!(before + added, new_len.div_ceil(bs));
                            m.tokens.extend(tokens(counter, n));
                        }
                        Err(BlockError::OutOfBlocks { .. }) => {
                            prop_assert_eq!(bm.block_table(id).map_or(0, <[u32]>::len), before);
                        }
                        Err(e) => return Err(fail(e)),
                    }
                }
                Op::Free { seq } => {
                    let id = RequestId(seq);
                    if seqs.remove(&seq).is_some() {
                        bm.free(id).map_err(fail)?;
                    } else {
                        prop_assert_eq!(bm.free(id), Err(BlockError::UnknownSequence(id)));
                    }
                }
            }
            bm.check_invariants().map_err(fail)?;
            let used: usize = bm.num_used_blocks();
            prop_assert_eq!(used + bm.num_free_blocks(), num_blocks);
        }
        for seq in seqs.keys() {
            bm.free(RequestId(*seq)).map_err(fail)?;
        }
        bm.check_invariants().map_err(fail)?;
        prop_assert_eq!(bm.num_free_blocks(), num_blocks);
    }
}

fn seqs_keys(seqs: &BTreeMap<u64, Model>) -> Vec<u64> {
    seqs.keys().copied().collect()
}

/// Block tables of every sequence in `all` except `me`.
fn seqs_tables<'a>(bm: &'a BlockManager, me: u64, all: &[u64]) -> Vec<(&'a [u32], u64)> {
    all.iter()
        .filter(|&&s| s != me)
        .filter_map(|&s| bm.block_table(RequestId(s)).map(|t| (t, s)))
        .collect()
}
