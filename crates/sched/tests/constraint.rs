//! A constrained sequence and an unconstrained one in one batch: the constraint's mask is
//! applied to its own sequence's logits only, before sampling; `Commit::Done` ends it with
//! `stop`; a failing constraint ends its own sequence with an error and leaves the batch.

mod common;

use common::{config, next_token, params, prompt, reference, request, rid, VOCAB};
use std::collections::HashMap;
use tandem_core::RequestId;
use tandem_sched::{Commit, FinishReason, Sampler, Scheduler, TokenConstraint};

/// Allows only tokens `>= min` (so never the fake model's favourite below it); done after
/// `len` tokens; fails on its `fail_at`-th token if set.
struct AtLeast {
    min: u32,
    len: usize,
    seen: Vec<u32>,
    fail_at: Option<usize>,
}

impl TokenConstraint for AtLeast {
    fn apply(&mut self, logits: &mut [f32]) -> Result<(), String> {
        if self.fail_at == Some(self.seen.len()) {
            return Err("broken".into());
        }
        for l in logits.iter_mut().take(self.min as usize) {
            *l = f32::NEG_INFINITY;
        }
        Ok(())
    }

    fn commit(&mut self, token: u32) -> Result<Commit, String> {
        if token < self.min {
            return Err(format!("token {token} was not allowed"));
        }
        self.seen.push(token);
        Ok(if self.seen.len() >= self.len {
            Commit::Done
        } else {
            Commit::Continue
        })
    }
}

/// Logits that make the fake model's next token the greedy choice, with a gradient so a
/// masked favourite falls to the next best.
fn logits(ctx: &[u32]) -> Vec<f32> {
    let fav = next_token(ctx);
    (0..VOCAB)
        .map(|t| {
            if t == fav {
                10.0
            } else {
                t as f32 / VOCAB as f32
            }
        })
        .collect()
}

/// Runs the scheduler to completion; returns each request's output and finish reason.
fn run(sched: &mut Scheduler) -> HashMap<RequestId, (Vec<u32>, FinishReason)> {
    let sampler = Sampler::new(vec![common::EOS]);
    let mut done = HashMap::new();
    for _ in 0..1000 {
        if !sched.has_unfinished() {
            break;
        }
        let out = sched.schedule().expect("schedule");
        let mut sampled = Vec::new();
        for s in out.seqs.iter().filter(|s| s.samples) {
            let ctx = sched.sequence(s.id).expect("live").token_ids().to_vec();
            let mut l = logits(&ctx);
            let t = sched.sample(s.id, &sampler, &mut l).expect("sample").token;
            sampled.push((s.id, t));
        }
        for f in sched.update(&sampled).expect("update") {
            done.insert(f.id, (f.output_token_ids.clone(), f.reason.clone()));
        }
    }
    done
}

#[test]
fn constrained_and_unconstrained_share_a_batch() {
    let mut sched = Scheduler::new(config(64, 4)).expect("scheduler");
    let p = prompt(7, 9);
    let free = params(12);
    sched.add(request(1, p.clone(), free.clone())).unwrap();
    let constrained = request(2, p.clone(), free.clone()).with_constraint(Box::new(AtLeast {
        min: VOCAB - 8,
        len: 5,
        seen: Vec::new(),
        fail_at: None,
    }));
    assert!(constrained.is_constrained());
    sched.add(constrained).unwrap();
    let broken = request(3, p.clone(), free.clone()).with_constraint(Box::new(AtLeast {
        min: 1,
        len: 100,
        seen: Vec::new(),
        fail_at: Some(2),
    }));
    sched.add(broken).unwrap();
    let done = run(&mut sched);
    // The unconstrained neighbour is what it is alone.
    let (want, why) = reference(&p, &free, &[common::EOS], usize::MAX);
    assert_eq!(done[&rid(1)], (want.clone(), why));
    // The constrained one: only allowed tokens, ended by the constraint with `stop`.
    let (out, why) = &done[&rid(2)];
    assert_eq!(out.len(), 5, "{out:?}");
    assert!(out.iter().all(|&t| t >= VOCAB - 8), "{out:?}");
    assert_eq!(*why, FinishReason::Stop);
    assert_ne!(out[..], want[..5], "the mask changed the tokens");
    // The failing one ends with its own error after the token it sampled unconstrained.
    let (out, why) = &done[&rid(3)];
    assert_eq!(out.len(), 3, "{out:?}");
    assert!(
        matches!(why, FinishReason::Error(m) if m.contains("broken")),
        "{why:?}"
    );
}
