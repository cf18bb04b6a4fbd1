//! An expert worker: for every pipeline slot (iteration, MoE layer, micro-batch), in order, it
//! waits for the dispatch of **every** attention replica (an idle replica sends an empty one),
//! concatenates their rows, runs each of its experts once on all the rows routed to it, and
//! returns to each replica the weighted sums for its rows. Aggregating across replicas is
//! what makes the expert GEMMs bigger.

use crate::stats::{Clock, WorkerStats};
use crate::transport::{CombineMsg, DispatchMsg, ExpertLink, SlotHeader};
use crate::EngineError;
use std::collections::HashMap;
use std::sync::Arc;
use tandem_model::layers::{from_vec, with_slice};
use tandem_model::stages::routed_ffn;
use tandem_model::{Assignment, Model};

pub struct ExpertWorker {
    pub id: u32,
    pub model: Arc<Model>,
    pub link: Box<dyn ExpertLink>,
    pub micro_batches: u32,
    /// Experts this worker holds (checked against each assignment).
    pub experts: Vec<u32>,
}

/// Slot order: iteration, then MoE layers ascending, then micro-batches.
fn next_slot(slot: (u64, u32, u32), moe_layers: &[u32], m: u32) -> (u64, u32, u32) {
    let (it, l, mb) = slot;
    if mb + 1 < m {
        return (it, l, mb + 1);
    }
    match moe_layers.iter().position(|x| *x == l) {
        Some(i) if i + 1 < moe_layers.len() => (it, moe_layers[i + 1], 0),
        _ => (it + 1, moe_layers[0], 0),
    }
}

impl ExpertWorker {
    /// Runs until every replica hangs up. Returns an error on a protocol violation.
    pub fn run(self, stats: &WorkerStats) -> Result<(), EngineError> {
        let cfg = &self.model.cfg;
        let moe_layers: Vec<u32> = (0..cfg.num_layers)
            .filter(|l| cfg.is_moe_layer(*l))
            .map(|l| l as u32)
            .collect();
        if moe_layers.is_empty() {
            return Ok(());
        }
        let n_a = self.link.num_replicas();
        let mut pending: HashMap<(u64, u32, u32), Vec<DispatchMsg>> = HashMap::new();
        let mut want = (0u64, moe_layers[0], 0u32);
        let mut clock = Clock::new(stats, "expert", self.id as usize);
        loop {
            while pending.get(&want).map_or(0, |v| v.len()) < n_a {
                let Some(msg) = self.link.recv_dispatch()? else {
                    return Ok(());
                };
                let h = msg.header;
                if h.slot() < want
                    || !moe_layers.contains(&h.layer)
                    || h.micro_batch >= self.micro_batches
                {
                    return Err(EngineError::Protocol(format!(
                        "expert worker {}: dispatch for slot {:?} from replica {} while expecting {want:?}",
                        self.id,
                        h.slot(),
                        h.sender
                    )));
                }
                let v = pending.entry(h.slot()).or_default();
                if h.sender as usize >= n_a || v.iter().any(|m| m.header.sender == h.sender) {
                    return Err(EngineError::Protocol(format!(
                        "expert worker {}: duplicate or unknown sender {} for slot {:?}",
                        self.id,
                        h.sender,
                        h.slot()
                    )));
                }
                v.push(msg);
            }
            clock.idle();
            let msgs = pending.remove(&want).unwrap_or_default();
            self.process(want, msgs)?;
            clock.busy();
            want = next_slot(want, &moe_layers, self.micro_batches);
        }
    }

    fn process(
        &self,
        slot: (u64, u32, u32),
        mut msgs: Vec<DispatchMsg>,
    ) -> Result<(), EngineError> {
        let d = self.model.cfg.hidden_size;
        let layer = &self.model.layers[slot.1 as usize];
        msgs.sort_by_key(|m| m.header.sender);
        // Concatenate every replica's rows: [sum n_r, D].
        let mut x = Vec::new();
        let mut assignments: Vec<Assignment> = Vec::new();
        let mut offsets = Vec::with_capacity(msgs.len());
        let mut rows = 0u32;
        for m in &msgs {
            let n = with_slice(&m.x, |s| {
                x.extend_from_slice(s);
                s.len() / d
            })?;
            offsets.push((rows as usize, n));
            for a in &m.assignments {
                if !self.experts.contains(&a.expert) {
                    return Err(EngineError::Protocol(format!(
                        "expert worker {} got a token for expert {} it does not hold",
                        self.id, a.expert
                    )));
                }
                assignments.push(Assignment {
                    row: a.row + rows,
                    ..*a
                });
            }
            rows += n as u32;
        }
        let total = rows as usize;
        let y = if assignments.is_empty() {
            vec![0f32; total * d]
        } else {
            for a in &assignments {
                metrics::counter!("tandem_expert_tokens_total", "layer" => slot.1.to_string(), "expert" => a.expert.to_string())
                    .increment(1);
            }
            routed_ffn(&x, total, d, &assignments, |e| {
                layer
                    .experts
                    .routed
                    .get(e as usize)
                    .and_then(|m| m.as_deref())
            })?
        };
        for (m, (off, n)) in msgs.iter().zip(offsets) {
            let y_r = y[off * d..(off + n) * d].to_vec();
            self.link.combine(
                m.header.sender,
                CombineMsg {
                    header: SlotHeader {
                        iteration: slot.0,
                        layer: slot.1,
                        micro_batch: slot.2,
                        sender: self.id,
                    },
                    y: from_vec(y_r, n, d)?,
                },
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::next_slot;

    #[test]
    fn slot_order_skips_dense_layers() {
        let moe = [0, 2];
        let mut s = (0, 0, 0);
        let mut seen = vec![];
        for _ in 0..6 {
            seen.push(s);
            s = next_slot(s, &moe, 2);
        }
        assert_eq!(
            seen,
            vec![
                (0, 0, 0),
                (0, 0, 1),
                (0, 2, 0),
                (0, 2, 1),
                (1, 0, 0),
                (1, 0, 1)
            ]
        );
    }
}
