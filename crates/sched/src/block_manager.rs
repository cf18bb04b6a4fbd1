//! Paged KV-cache block allocator with prefix caching (vLLM / nano-vllm `BlockManager`).
//!
//! The KV cache is `num_blocks` blocks of `block_size` token slots. Each sequence owns a block
//! table: the token at position `p` lives in block `table[p / block_size]` at offset
//! `p % block_size`, i.e. flat slot `table[p / block_size] * block_size + p % block_size`.
//!
//! # Prefix caching
//! A block that is *full and computed* can be registered under a hash of its tokens chained
//! with the previous block's hash ([`BlockManager::register_computed`]), so the hash names the
//! whole prefix up to and including that block. A later [`BlockManager::allocate`] whose prompt
//! starts with the same full blocks shares them (reference count + 1) instead of recomputing
//! them. When the last reference goes, a hashed block stays in the free list *with its
//! contents*: until it is handed out again it can still be revived by a hash hit.
//!
//! # Eviction order
//! The free list is ordered least-recently-freed first; [`BlockManager::allocate`] and
//! [`BlockManager::append_slots`] take from the front. Blocks that carry no hash (nothing to
//! reuse) go to the front when freed, hashed ones to the back, and a sequence's blocks are
//! released tail first so the end of a prefix is evicted before its beginning.
//!
//! # Writes never touch shared blocks
//! Only full, computed blocks are ever hashed or shared, and a sequence only writes positions
//! at or after its computed length, so a shared block is never written. [`BlockManager::allocate`]
//! never reports the whole prompt as cached: the block holding the last prompt token is always
//! fresh, so every admitted sequence has at least one token to compute.
//!
//! Hash collisions (64-bit) are guarded by comparing the stored tokens and parent hash on a hit.

use std::collections::{BTreeMap, HashMap, HashSet};

use tandem_core::RequestId;
use thiserror::Error;

/// Index of a KV-cache block, `0..num_blocks`. Kept as a plain `u32` because block tables are
/// handed to attention kernels as-is.
pub type BlockId = u32;

/// Errors of the block manager.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BlockError {
    #[error("block_size must be at least 1")]
    ZeroBlockSize,
    #[error("num_blocks must be at least 1")]
    ZeroBlocks,
    #[error("num_blocks {0} does not fit in u32 block ids")]
    TooManyBlocks(usize),
    #[error("out of KV-cache blocks: {needed} needed, {free} free")]
    OutOfBlocks { needed: usize, free: usize },
    #[error("sequence {0} already has KV-cache blocks")]
    AlreadyAllocated(RequestId),
    #[error("sequence {0} has no KV-cache blocks")]
    UnknownSequence(RequestId),
    #[error("sequence {id}: {num_computed} computed tokens claimed but only {num_tokens} token ids given")]
    TooFewTokens {
        id: RequestId,
        num_computed: usize,
        num_tokens: usize,
    },
    #[error("sequence {id}: {num_computed} computed tokens exceed its {capacity} allocated slots")]
    BeyondAllocated {
        id: RequestId,
        num_computed: usize,
        capacity: usize,
    },
    #[error("block manager invariant violated: {0}")]
    Invariant(String),
}

/// What [`BlockManager::allocate`] found in the prefix cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AllocOutcome {
    /// Leading tokens whose KV is already in the cache (a multiple of `block_size`, always
    /// less than the number of tokens allocated).
    pub num_cached_tokens: usize,
}

/// Prefix-cache counters, in tokens, since the manager was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrefixCacheStats {
    /// Tokens looked up by successful [`BlockManager::allocate`] calls.
    pub queried_tokens: u64,
    /// Of those, tokens found in the cache.
    pub hit_tokens: u64,
}

#[derive(Debug, Clone, Default)]
struct Block {
    ref_count: u32,
    /// Key in the free list while free.
    free_key: Option<i64>,
    /// Prefix hash, set once the block is registered as full and computed.
    hash: Option<u64>,
    /// Hash of the previous block of the prefix (collision guard).
    parent_hash: Option<u64>,
    /// The block's tokens while hashed (collision guard).
    tokens: Vec<u32>,
}

#[derive(Debug, Clone, Default)]
struct SeqBlocks {
    table: Vec<BlockId>,
    /// Leading blocks whose hash chain is known (hits or registered blocks).
    num_hashed: usize,
    /// Hash of block `num_hashed - 1`.
    last_hash: Option<u64>,
}

/// Allocator of KV-cache blocks with per-sequence block tables and prefix caching.
#[derive(Debug, Clone)]
pub struct BlockManager {
    block_size: usize,
    blocks: Vec<Block>,
    /// Free blocks in eviction order (smallest key first).
    free: BTreeMap<i64, BlockId>,
    next_back_key: i64,
    next_front_key: i64,
    /// Prefix hash -> block holding that prefix's last block.
    cached: HashMap<u64, BlockId>,
    seqs: HashMap<RequestId, SeqBlocks>,
    prefix_caching: bool,
    stats: PrefixCacheStats,
}

impl BlockManager {
    /// A manager of `num_blocks` blocks of `block_size` tokens, all free.
    pub fn new(
        num_blocks: usize,
        block_size: usize,
        enable_prefix_caching: bool,
    ) -> Result<Self, BlockError> {
        if block_size == 0 {
            return Err(BlockError::ZeroBlockSize);
        }
        if num_blocks == 0 {
            return Err(BlockError::ZeroBlocks);
        }
        let n = u32::try_from(num_blocks).map_err(|_| BlockError::TooManyBlocks(num_blocks))?;
        let mut blocks = vec![Block::default(); num_blocks];
        let mut free = BTreeMap::new();
        for (id, block) in (0..n).zip(blocks.iter_mut()) {
            let key = i64::from(id);
            block.free_key = Some(key);
            free.insert(key, id);
        }
        Ok(Self {
            block_size,
            blocks,
            free,
            next_back_key: i64::from(n),
            next_front_key: -1,
            cached: HashMap::new(),
            seqs: HashMap::new(),
            prefix_caching: enable_prefix_caching,
            stats: PrefixCacheStats::default(),
        })
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Total blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that can be handed out now (including cached blocks with no reference).
    pub fn num_free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks referenced by at least one sequence.
    pub fn num_used_blocks(&self) -> usize {
        self.blocks.len() - self.free.len()
    }

    /// Whether prefix caching is on.
    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    /// Prefix-cache hit counters.
    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.stats
    }

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// Whether `num_tokens` fresh tokens fit in the free blocks (ignores prefix-cache hits,
    /// so it is conservative; [`BlockManager::allocate`] is exact and atomic).
    pub fn can_allocate(&self, num_tokens: usize) -> bool {
        self.blocks_for(num_tokens) <= self.free.len()
    }

    /// The block table of a sequence, if it has blocks.
    pub fn block_table(&self, seq_id: RequestId) -> Option<&[BlockId]> {
        self.seqs.get(&seq_id).map(|s| s.table.as_slice())
    }

    /// Whether `seq_id` has a block table.
    pub fn contains(&self, seq_id: RequestId) -> bool {
        self.seqs.contains_key(&seq_id)
    }

    /// Gives `seq_id` a block table covering `token_ids`, sharing the longest run of cached
    /// full blocks at its start. All or nothing: on error nothing changes.
    ///
    /// The block holding the last token is never taken from the cache, so
    /// `num_cached_tokens < token_ids.len()` whenever `token_ids` is not empty.
    pub fn allocate(
        &mut self,
        seq_id: RequestId,
        token_ids: &[u32],
    ) -> Result<AllocOutcome, BlockError> {
        if self.seqs.contains_key(&seq_id) {
            return Err(BlockError::AlreadyAllocated(seq_id));
        }
        let bs = self.block_size;
        let needed = self.blocks_for(token_ids.len());

        // Longest run of cached full blocks, leaving the last token's block out.
        let mut hits: Vec<BlockId> = Vec::new();
        let mut last_hash = None;
        if self.prefix_caching {
            let max_hit_blocks = token_ids.len().saturating_sub(1) / bs;
            let mut seen = HashSet::new();
            for chunk in token_ids.chunks_exact(bs).take(max_hit_blocks) {
                let h = hash_block(last_hash, chunk);
                let Some(&b) = self.cached.get(&h) else { break };
                let block = &self.blocks[b as usize];
                if block.tokens != chunk || block.parent_hash != last_hash || !seen.insert(b) {
                    break;
                }
                hits.push(b);
                last_hash = Some(h);
            }
        }
        let hits_in_use = hits
            .iter()
            .filter(|&&b| self.blocks[b as usize].ref_count > 0)
            .count();
        let need_free = needed - hits_in_use;
        if need_free > self.free.len() {
            return Err(BlockError::OutOfBlocks {
                needed: need_free,
                free: self.free.len(),
            });
        }

        // Take the hits first so that fresh allocations cannot evict them.
        let mut table = Vec::with_capacity(needed);
        for &b in &hits {
            self.take_ref(b);
            table.push(b);
        }
        while table.len() < needed {
            let b = self.pop_free()?;
            table.push(b);
        }
        let num_cached_tokens = hits.len() * bs;
        if self.prefix_caching {
            self.stats.queried_tokens += token_ids.len() as u64;
            self.stats.hit_tokens += num_cached_tokens as u64;
        }
        self.seqs.insert(
            seq_id,
            SeqBlocks {
                table,
                num_hashed: hits.len(),
                last_hash,
            },
        );
        Ok(AllocOutcome { num_cached_tokens })
    }

    /// Grows `seq_id`'s table so that it holds `total_len` tokens (a no-op when it already
    /// does). Returns the number of blocks added. All or nothing.
    pub fn append_slots(
        &mut self,
        seq_id: RequestId,
        total_len: usize,
    ) -> Result<usize, BlockError> {
        let have = self
            .seqs
            .get(&seq_id)
            .ok_or(BlockError::UnknownSequence(seq_id))?
            .table
            .len();
        let needed = self.blocks_for(total_len).saturating_sub(have);
        if needed > self.free.len() {
            return Err(BlockError::OutOfBlocks {
                needed,
                free: self.free.len(),
            });
        }
        let mut new_blocks = Vec::with_capacity(needed);
        for _ in 0..needed {
            new_blocks.push(self.pop_free()?);
        }
        let seq = self
            .seqs
            .get_mut(&seq_id)
            .ok_or(BlockError::UnknownSequence(seq_id))?;
        seq.table.extend(new_blocks);
        Ok(needed)
    }

    /// Records that the first `num_computed` of `token_ids` (the sequence's tokens) now have
    /// their KV in the cache: every block that became full is hashed and made shareable.
    /// A no-op for the cache when prefix caching is off.
    ///
    /// If another block already holds the same prefix, this one stays unhashed (it is simply
    /// freed with the sequence); the first copy wins.
    pub fn register_computed(
        &mut self,
        seq_id: RequestId,
        token_ids: &[u32],
        num_computed: usize,
    ) -> Result<(), BlockError> {
        let bs = self.block_size;
        let seq = self
            .seqs
            .get_mut(&seq_id)
            .ok_or(BlockError::UnknownSequence(seq_id))?;
        if num_computed > token_ids.len() {
            return Err(BlockError::TooFewTokens {
                id: seq_id,
                num_computed,
                num_tokens: token_ids.len(),
            });
        }
        let capacity = seq.table.len() * bs;
        if num_computed > capacity {
            return Err(BlockError::BeyondAllocated {
                id: seq_id,
                num_computed,
                capacity,
            });
        }
        if !self.prefix_caching {
            return Ok(());
        }
        let full = num_computed / bs;
        while seq.num_hashed < full {
            let i = seq.num_hashed;
            let chunk = &token_ids[i * bs..(i + 1) * bs];
            let h = hash_block(seq.last_hash, chunk);
            let b = seq.table[i];
            let block = &mut self.blocks[b as usize];
            if block.hash.is_none() && !self.cached.contains_key(&h) {
                self.cached.insert(h, b);
                block.hash = Some(h);
                block.parent_hash = seq.last_hash;
                block.tokens = chunk.to_vec();
            }
            seq.last_hash = Some(h);
            seq.num_hashed += 1;
        }
        Ok(())
    }

    /// Releases every block of `seq_id` (tail first). Hashed blocks whose count drops to zero
    /// stay revivable by a hash hit until they are handed out again.
    pub fn free(&mut self, seq_id: RequestId) -> Result<(), BlockError> {
        let seq = self
            .seqs
            .remove(&seq_id)
            .ok_or(BlockError::UnknownSequence(seq_id))?;
        for &b in seq.table.iter().rev() {
            self.release(b)?;
        }
        Ok(())
    }

    /// Checks the bookkeeping: every block is free xor referenced; reference counts equal the
    /// number of tables holding the block; the free list and the free marks agree (so no block
    /// is in the free list twice); no table holds a block twice; the hash index agrees with the
    /// blocks' hashes.
    pub fn check_invariants(&self) -> Result<(), BlockError> {
        let bad = |m: String| Err(BlockError::Invariant(m));
        let mut refs = vec![0u32; self.blocks.len()];
        for (id, seq) in &self.seqs {
            let mut seen = HashSet::new();
            for &b in &seq.table {
                let Some(r) = refs.get_mut(b as usize) else {
                    return bad(format!("seq {id} holds out-of-range block {b}"));
                };
                if !seen.insert(b) {
                    return bad(format!("seq {id} holds block {b} twice"));
                }
                *r += 1;
            }
            if seq.num_hashed > seq.table.len() {
                return bad(format!("seq {id} has more hashed blocks than blocks"));
            }
        }
        for (b, block) in self.blocks.iter().enumerate() {
            if block.ref_count != refs[b] {
                return bad(format!(
                    "block {b}: ref_count {} but held by {} tables",
                    block.ref_count, refs[b]
                ));
            }
            match block.free_key {
                Some(key) => {
                    if block.ref_count != 0 {
                        return bad(format!("block {b} is free and referenced"));
                    }
                    if self.free.get(&key).copied() != Some(b as BlockId) {
                        return bad(format!("block {b}: free key {key} not in the free list"));
                    }
                }
                None if block.ref_count == 0 => {
                    return bad(format!("block {b} is neither free nor referenced"));
                }
                None => {}
            }
            if let Some(h) = block.hash {
                if self.cached.get(&h).copied() != Some(b as BlockId) {
                    return bad(format!("block {b}: hash not indexed"));
                }
                if block.tokens.len() != self.block_size {
                    return bad(format!("block {b}: hashed but not full"));
                }
            }
        }
        let marked = self.blocks.iter().filter(|b| b.free_key.is_some()).count();
        if marked != self.free.len() {
            return bad(format!(
                "{marked} blocks marked free but the free list has {}",
                self.free.len()
            ));
        }
        for (&h, &b) in &self.cached {
            if self.blocks.get(b as usize).and_then(|bl| bl.hash) != Some(h) {
                return bad(format!("hash index points at block {b} without that hash"));
            }
        }
        Ok(())
    }

    /// Adds a reference to `b`, reviving it from the free list if needed.
    fn take_ref(&mut self, b: BlockId) {
        let block = &mut self.blocks[b as usize];
        if let Some(key) = block.free_key.take() {
            self.free.remove(&key);
        }
        block.ref_count += 1;
    }

    /// Takes the least recently freed block, dropping whatever it cached.
    fn pop_free(&mut self) -> Result<BlockId, BlockError> {
        let (_, b) = self
            .free
            .pop_first()
            .ok_or(BlockError::OutOfBlocks { needed: 1, free: 0 })?;
        let block = &mut self.blocks[b as usize];
        block.free_key = None;
        block.ref_count = 1;
        if let Some(h) = block.hash.take() {
            if self.cached.get(&h) == Some(&b) {
                self.cached.remove(&h);
            }
        }
        block.parent_hash = None;
        block.tokens.clear();
        Ok(b)
    }

    fn release(&mut self, b: BlockId) -> Result<(), BlockError> {
        let block = self
            .blocks
            .get_mut(b as usize)
            .ok_or_else(|| BlockError::Invariant(format!("release of unknown block {b}")))?;
        if block.ref_count == 0 {
            return Err(BlockError::Invariant(format!("release of free block {b}")));
        }
        block.ref_count -= 1;
        if block.ref_count == 0 {
            let key = if block.hash.is_some() {
                self.next_back_key += 1;
                self.next_back_key
            } else {
                self.next_front_key -= 1;
                self.next_front_key
            };
            block.free_key = Some(key);
            self.free.insert(key, b);
        }
        Ok(())
    }
}

/// SplitMix64 finaliser: a bijective 64-bit mix.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hash of a full block's tokens chained with the hash of the prefix before it. Deterministic
/// across processes (no random keys), so replicas agree on it.
fn hash_block(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut h = match parent {
        Some(p) => mix64(p ^ 0x6A09_E667_F3BC_C908),
        None => 0x243F_6A88_85A3_08D3,
    };
    for &t in tokens {
        h = mix64(h ^ u64::from(t)).wrapping_add(0x9E37_79B9_7F4A_7C15);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rid(n: u64) -> RequestId {
        RequestId(n)
    }

    fn toks(range: std::ops::Range<u32>) -> Vec<u32> {
        range.collect()
    }

    #[test]
    fn rejects_bad_shapes() {
        assert_eq!(
            BlockManager::new(4, 0, true).err(),
            Some(BlockError::ZeroBlockSize)
        );
        assert_eq!(
            BlockManager::new(0, 4, true).err(),
            Some(BlockError::ZeroBlocks)
        );
    }

    #[test]
    fn allocate_append_free_round_trip() -> Result<(), BlockError> {
        let mut bm = BlockManager::new(8, 4, false)?;
        let out = bm.allocate(rid(1), &toks(0..6))?;
        assert_eq!(out.num_cached_tokens, 0);
        assert_eq!(bm.block_table(rid(1)), Some(&[0, 1][..]));
        assert_eq!(bm.num_free_blocks(), 6);
        // Slots 6 and 7 are already there; 8 needs a third block.
        assert_eq!(bm.append_slots(rid(1), 8)?, 0);
        assert_eq!(bm.append_slots(rid(1), 9)?, 1);
        assert_eq!(bm.block_table(rid(1)).map(<[u32]>::len), Some(3));
        bm.check_invariants()?;
        bm.free(rid(1))?;
        assert_eq!(bm.num_free_blocks(), 8);
        bm.check_invariants()
    }

    #[test]
    fn allocation_is_all_or_nothing() -> Result<(), BlockError> {
        let mut bm = BlockManager::new(3, 4, true)?;
        bm.allocate(rid(1), &toks(0..8))?;
        let err = bm.allocate(rid(2), &toks(100..108));
        assert_eq!(err, Err(BlockError::OutOfBlocks { needed: 2, free: 1 }));
        assert!(!bm.contains(rid(2)));
        assert_eq!(
            bm.append_slots(rid(1), 13),
            Err(BlockError::OutOfBlocks { needed: 2, free: 1 })
        );
        assert_eq!(bm.block_table(rid(1)).map(<[u32]>::len), Some(2));
        assert!(bm.can_allocate(4));
        assert!(!bm.can_allocate(5));
        bm.check_invariants()
    }

    #[test]
    fn errors_on_misuse() -> Result<(), BlockError> {
        let mut bm = BlockManager::new(4, 4, true)?;
        bm.allocate(rid(1), &toks(0..4))?;
        assert_eq!(
            bm.allocate(rid(1), &toks(0..4)),
            Err(BlockError::AlreadyAllocated(rid(1)))
        );
        assert_eq!(bm.free(rid(9)), Err(BlockError::UnknownSequence(rid(9))));
        assert_eq!(
            bm.append_slots(rid(9), 3),
            Err(BlockError::UnknownSequence(rid(9)))
        );
        assert!(matches!(
            bm.register_computed(rid(1), &toks(0..4), 5),
            Err(BlockError::TooFewTokens { .. })
        ));
        assert!(matches!(
            bm.register_computed(rid(1), &toks(0..8), 8),
            Err(BlockError::BeyondAllocated { .. })
        ));
        bm.check_invariants()
    }

    #[test]
    fn shared_prefix_reuses_registered_blocks() -> Result<(), BlockError> {
        let mut bm = BlockManager::new(10, 4, true)?;
        let a = toks(0..10);
        bm.allocate(rid(1), &a)?;
        bm.register_computed(rid(1), &a, 10)?; // blocks 0 and 1 full, block 2 partial
        let mut b = toks(0..8);
        b.extend([50, 51, 52]);
        let out = bm.allocate(rid(2), &b)?;
        assert_eq!(out.num_cached_tokens, 8);
        let ta = bm.block_table(rid(1)).map(<[u32]>::to_vec);
        let tb = bm.block_table(rid(2)).map(<[u32]>::to_vec);
        assert_eq!(
            ta.as_deref().map(|t| &t[..2]),
            tb.as_deref().map(|t| &t[..2])
        );
        assert_ne!(ta.as_deref().map(|t| t[2]), tb.as_deref().map(|t| t[2]));
        assert_eq!(bm.num_used_blocks(), 4);
        bm.check_invariants()?;
        let stats = bm.prefix_cache_stats();
        assert_eq!((stats.queried_tokens, stats.hit_tokens), (21, 8));
        bm.free(rid(1))?;
        bm.free(rid(2))?;
        assert_eq!(bm.num_free_blocks(), 10);
        bm.check_invariants()
    }

    #[test]
    fn different_first_block_means_no_hit() -> Result<(), BlockError> {
        // Same second block, different first: the chained hash must not match.
        let mut bm = BlockManager::new(10, 2, true)?;
        let a = vec![1, 2, 3, 4, 5];
        bm.allocate(rid(1), &a)?;
        bm.register_computed(rid(1), &a, 4)?;
        let b = vec![9, 9, 3, 4, 5];
        assert_eq!(bm.allocate(rid(2), &b)?.num_cached_tokens, 0);
        bm.check_invariants()
    }

    #[test]
    fn never_reports_whole_prompt_cached() -> Result<(), BlockError> {
        let mut bm = BlockManager::new(10, 4, true)?;
        let a = toks(0..8);
        bm.allocate(rid(1), &a)?;
        bm.register_computed(rid(1), &a, 8)?;
        // Exactly the same 8 tokens: the second block must be recomputed.
        assert_eq!(bm.allocate(rid(2), &a)?.num_cached_tokens, 4);
        // One more token: both full blocks can be reused.
        let mut c = a.clone();
        c.push(99);
        assert_eq!(bm.allocate(rid(3), &c)?.num_cached_tokens, 8);
        bm.check_invariants()
    }

    #[test]
    fn freed_cached_blocks_revive_until_evicted() -> Result<(), BlockError> {
        let mut bm = BlockManager::new(4, 2, true)?;
        let a = vec![1, 2, 3, 4, 5];
        bm.allocate(rid(1), &a)?;
        bm.register_computed(rid(1), &a, 5)?;
        bm.free(rid(1))?;
        assert_eq!(bm.num_free_blocks(), 4);
        // Still revivable: the two full blocks come back from the free list.
        assert_eq!(bm.allocate(rid(2), &a)?.num_cached_tokens, 4);
        assert_eq!(bm.num_free_blocks(), 1);
        bm.free(rid(2))?;
        // An unrelated sequence that needs every block evicts them all.
        bm.allocate(rid(3), &toks(100..108))?;
        bm.free(rid(3))?;
        assert_eq!(bm.allocate(rid(4), &a)?.num_cached_tokens, 0);
        bm.check_invariants()
    }

    #[test]
    fn eviction_prefers_unhashed_then_oldest_tail_first() -> Result<(), BlockError> {
        let mut bm = BlockManager::new(6, 2, true)?;
        let a = vec![1, 2, 3, 4, 5, 6];
        bm.allocate(rid(1), &a)?; // blocks 0,1,2
        bm.register_computed(rid(1), &a, 6)?;
        bm.allocate(rid(2), &[7, 8, 9])?; // blocks 3,4 (unhashed)
        bm.free(rid(1))?;
        bm.free(rid(2))?;
        // Free order now: 3, 4 (unhashed, in front), block 5, then 2, 1, 0 (tail first).
        bm.allocate(rid(3), &[0; 8])?;
        assert_eq!(bm.block_table(rid(3)), Some(&[3, 4, 5, 2][..]));
        // The first two blocks of `a` survived.
        bm.free(rid(3))?;
        let mut b = a[..4].to_vec();
        b.push(42);
        assert_eq!(bm.allocate(rid(4), &b)?.num_cached_tokens, 4);
        bm.check_invariants()
    }

    #[test]
    fn hit_on_free_cached_block_counts_against_free() -> Result<(), BlockError> {
        let mut bm = BlockManager::new(3, 2, true)?;
        let a = vec![1, 2, 3, 4, 5];
        bm.allocate(rid(1), &a)?;
        bm.register_computed(rid(1), &a, 4)?;
        bm.free(rid(1))?;
        // 3 blocks needed, 2 of them cached but free: still needs 3 free blocks, which exist.
        assert_eq!(bm.allocate(rid(2), &a)?.num_cached_tokens, 4);
        assert_eq!(bm.num_free_blocks(), 0);
        bm.check_invariants()
    }

    #[test]
    fn duplicate_content_keeps_first_copy() -> Result<(), BlockError> {
        let mut bm = BlockManager::new(8, 2, true)?;
        let a = vec![1, 2, 3];
        // Both computed at the same time, neither could hit the other.
        bm.allocate(rid(1), &a)?;
        bm.allocate(rid(2), &a)?;
        bm.register_computed(rid(1), &a, 3)?;
        bm.register_computed(rid(2), &a, 3)?;
        bm.check_invariants()?;
        let first = bm.block_table(rid(1)).and_then(|t| t.first().copied());
        bm.allocate(rid(3), &a)?;
        assert_eq!(
            bm.block_table(rid(3)).and_then(|t| t.first().copied()),
            first
        );
        bm.check_invariants()
    }

    #[test]
    fn disabled_prefix_caching_never_hits() -> Result<(), BlockError> {
        let mut bm = BlockManager::new(8, 2, false)?;
        let a = vec![1, 2, 3, 4, 5];
        bm.allocate(rid(1), &a)?;
        bm.register_computed(rid(1), &a, 5)?;
        assert_eq!(bm.allocate(rid(2), &a)?.num_cached_tokens, 0);
        assert_eq!(bm.prefix_cache_stats(), PrefixCacheStats::default());
        bm.check_invariants()
    }

    #[test]
    fn empty_allocation_is_harmless() -> Result<(), BlockError> {
        let mut bm = BlockManager::new(2, 2, true)?;
        assert_eq!(bm.allocate(rid(1), &[])?.num_cached_tokens, 0);
        assert_eq!(bm.block_table(rid(1)), Some(&[][..]));
        bm.append_slots(rid(1), 1)?;
        bm.free(rid(1))?;
        bm.check_invariants()
    }
}
