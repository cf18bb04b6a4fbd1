//! Scheduler behaviour, driven by a fake model (see `common`).

mod common;

use common::*;
use proptest::prelude::*;
use tandem_sched::{
    FinishReason, SamplingParams, SchedError, Scheduler, SchedulerConfig, SequenceStatus,
};

type R = Result<(), SchedError>;

fn at(step: usize, seq: tandem_sched::Sequence) -> Arrival {
    Arrival { step, seq }
}

fn max_len(cfg: &SchedulerConfig) -> usize {
    let cap = cfg.num_blocks * cfg.block_size;
    cfg.max_model_len.map_or(cap, |m| m.min(cap))
}

#[test]
fn single_request_prefill_then_decode() -> R {
    let cfg = config(16, 4);
    let seq = fixed_request(1, 10, 5);
    let res = drive(cfg.clone(), vec![at(0, seq.clone())], &[], 100)?;
    assert_matches_reference(&[seq], &res, max_len(&cfg));
    // Step 0: the whole prompt, sampling; then 4 decodes of one token each (the 5th sampled
    // token finishes it without being computed).
    let first = &res.outputs[0].seqs[0];
    assert_eq!(
        (first.start_pos, first.token_ids.len(), first.samples),
        (0, 10, true)
    );
    assert_eq!(res.steps, 5);
    for (k, out) in res.outputs[1..].iter().enumerate() {
        let s = &out.seqs[0];
        assert_eq!(
            (s.start_pos, s.token_ids.len(), s.samples),
            (10 + k, 1, true)
        );
    }
    assert_eq!(res.finished[&rid(1)].reason, FinishReason::Length);
    Ok(())
}

#[test]
fn update_protocol_is_checked() -> R {
    let mut s = Scheduler::new(config(16, 4))?;
    s.add(fixed_request(1, 3, 4))?;
    s.add(fixed_request(2, 3, 4))?;
    assert_eq!(s.update(&[]), Ok(vec![]));
    assert_eq!(s.update(&[(rid(1), 5)]), Err(SchedError::NoStepInFlight));
    let out = s.schedule()?;
    assert_eq!(out.sampling_ids().count(), 2);
    assert_eq!(s.schedule(), Err(SchedError::StepInFlight));
    assert_eq!(
        s.update(&[(rid(1), 5)]),
        Err(SchedError::MissingSample(rid(2)))
    );
    assert_eq!(
        s.update(&[(rid(1), 5), (rid(1), 6)]),
        Err(SchedError::DuplicateSample(rid(1)))
    );
    assert_eq!(
        s.update(&[(rid(1), 5), (rid(2), 6), (rid(3), 7)]),
        Ok(vec![])
    );
    // rid(3) is unknown: treated as a finished request, ignored.
    assert_eq!(
        s.sequence(rid(1)).map(|q| q.output_token_ids().to_vec()),
        Some(vec![5])
    );
    s.check_invariants()
}

#[test]
fn unexpected_sample_for_partial_prefill_is_rejected() -> R {
    let mut cfg = config(16, 4);
    cfg.max_num_batched_tokens = 4;
    let mut s = Scheduler::new(cfg)?;
    s.add(fixed_request(1, 10, 4))?;
    let out = s.schedule()?;
    assert!(!out.seqs[0].samples);
    assert_eq!(
        s.update(&[(rid(1), 1)]),
        Err(SchedError::UnexpectedSample(rid(1)))
    );
    assert_eq!(s.update(&[]), Ok(vec![]));
    assert_eq!(s.sequence(rid(1)).map(|q| q.num_computed_tokens()), Some(4));
    s.check_invariants()
}

#[test]
fn add_rejects_bad_requests() -> R {
    let mut cfg = config(4, 4); // 16 slots
    cfg.max_model_len = Some(12);
    let mut s = Scheduler::new(cfg)?;
    assert_eq!(s.max_model_len(), 12);
    assert!(matches!(
        s.add(fixed_request(1, 12, 1)),
        Err(SchedError::PromptTooLong {
            len: 12,
            max: 12,
            ..
        })
    ));
    assert_eq!(
        s.add(fixed_request(2, 0, 1)),
        Err(SchedError::EmptyPrompt(rid(2)))
    );
    let bad = SamplingParams {
        top_p: 0.0,
        ..SamplingParams::default()
    };
    assert!(matches!(
        s.add(request(3, prompt(3, 4), bad)),
        Err(SchedError::InvalidParams { .. })
    ));
    s.add(fixed_request(4, 11, 1))?;
    assert_eq!(
        s.add(fixed_request(4, 3, 1)),
        Err(SchedError::DuplicateRequest(rid(4)))
    );
    // Capacity bound without max_model_len: 4 blocks of 4.
    let mut s = Scheduler::new(config(4, 4))?;
    assert!(matches!(
        s.add(fixed_request(5, 16, 1)),
        Err(SchedError::PromptTooLong { .. })
    ));
    s.add(fixed_request(6, 15, 1))?;
    s.check_invariants()
}

#[test]
fn invalid_configs_are_rejected() {
    let base = config(8, 4);
    for cfg in [
        SchedulerConfig {
            max_num_seqs: 0,
            ..base.clone()
        },
        SchedulerConfig {
            max_num_batched_tokens: 0,
            ..base.clone()
        },
        SchedulerConfig {
            block_size: 0,
            ..base.clone()
        },
        SchedulerConfig {
            num_blocks: 0,
            ..base.clone()
        },
        SchedulerConfig {
            long_prefill_chunk: Some(0),
            ..base.clone()
        },
        SchedulerConfig {
            max_model_len: Some(1),
            ..base.clone()
        },
        SchedulerConfig {
            num_blocks: 1,
            block_size: 1,
            ..base.clone()
        },
    ] {
        assert!(Scheduler::new(cfg).is_err());
    }
}

#[test]
fn context_limit_finishes_with_length() -> R {
    let mut cfg = config(8, 4);
    cfg.max_model_len = Some(10);
    let seq = fixed_request(1, 7, 100);
    let res = drive(cfg.clone(), vec![at(0, seq.clone())], &[], 100)?;
    assert_matches_reference(&[seq], &res, 10);
    assert_eq!(res.finished[&rid(1)].output_token_ids.len(), 3);
    assert_eq!(res.finished[&rid(1)].reason, FinishReason::Length);
    Ok(())
}

#[test]
fn eos_stop_ids_and_min_tokens() -> R {
    let cfg = config(64, 4);
    let max_model_len = max_len(&cfg);
    // Find prompts whose reference hits EOS / a stop id early.
    let mut seqs = Vec::new();
    for id in 1..200u64 {
        let p = prompt(id, 6);
        let probe = reference(&p, &params(40), &[EOS], max_model_len).0;
        if let Some(i) = probe.iter().position(|&t| t == EOS) {
            if i >= 2 && probe[0] != probe[1] && seqs.is_empty() {
                // Plain EOS stop; EOS ignored; EOS masked by min_tokens beyond it.
                seqs.push(request(id, p.clone(), params(40)));
                let ignore = SamplingParams {
                    ignore_eos: true,
                    ..params(40)
                };
                seqs.push(request(1000 + id, p.clone(), ignore));
                let min = SamplingParams {
                    min_tokens: i + 2,
                    ..params(40)
                };
                seqs.push(request(2000 + id, p.clone(), min));
                // A stop token id that occurs before EOS.
                let stop = SamplingParams {
                    stop_token_ids: vec![probe[1]],
                    ..params(40)
                };
                seqs.push(request(3000 + id, p, stop));
            }
        }
    }
    assert!(
        seqs.len() >= 4,
        "no prompt reaches EOS; change the fake model"
    );
    let arrivals = seqs.iter().map(|s| at(0, s.clone())).collect();
    let res = drive(cfg, arrivals, &[], 500)?;
    assert_matches_reference(&seqs, &res, max_model_len);
    let plain = &res.finished[&seqs[0].id()];
    assert_eq!(
        (plain.reason.clone(), plain.stop_token_id),
        (FinishReason::Stop, Some(EOS))
    );
    assert_eq!(plain.output_token_ids.last(), Some(&EOS));
    let ignored = &res.finished[&seqs[1].id()];
    assert_eq!(
        (ignored.reason.clone(), ignored.output_token_ids.len()),
        (FinishReason::Length, 40)
    );
    assert!(res.finished[&seqs[2].id()].output_token_ids.len() > plain.output_token_ids.len());
    let stopped = &res.finished[&seqs[3].id()];
    assert_eq!(stopped.output_token_ids.len(), 2);
    assert_eq!(stopped.reason, FinishReason::Stop);
    Ok(())
}

#[test]
fn fcfs_order_is_kept() -> R {
    let mut cfg = config(64, 4);
    cfg.max_num_seqs = 2;
    let seqs: Vec<_> = (1..=6).map(|i| fixed_request(i, 5, 4)).collect();
    let arrivals = seqs.iter().map(|s| at(0, s.clone())).collect();
    let res = drive(cfg.clone(), arrivals, &[], 200)?;
    assert_matches_reference(&seqs, &res, max_len(&cfg));
    // First appearance of each request follows arrival order.
    let mut first_seen = Vec::new();
    for out in &res.outputs {
        assert!(out.seqs.len() <= 2);
        for s in &out.seqs {
            if !first_seen.contains(&s.id) {
                first_seen.push(s.id);
            }
        }
        // Within a step, sequences are listed oldest first.
        assert!(out.seqs.windows(2).all(|w| w[0].id < w[1].id));
    }
    assert_eq!(first_seen, (1..=6).map(rid).collect::<Vec<_>>());
    Ok(())
}

#[test]
fn preemption_picks_newest_and_requeues_it_at_the_front() -> R {
    // 4 blocks of 2 slots. Two requests of 3 prompt tokens take 2 blocks each; the first
    // decode that crosses a block boundary finds no free block.
    let mut cfg = config(4, 2);
    cfg.enable_prefix_caching = false;
    let mut s = Scheduler::new(cfg.clone())?;
    let mut model = FakeModel::new(&cfg);
    s.add(fixed_request(1, 3, 6))?;
    s.add(fixed_request(2, 3, 6))?;
    s.add(fixed_request(3, 2, 6))?;
    let mut preempted = Vec::new();
    for _ in 0..3 {
        let out = s.schedule()?;
        s.check_invariants()?;
        if !out.preempted.is_empty() {
            preempted = out.preempted.clone();
            // The newest running request is the victim; request 1 still runs this step.
            assert_eq!(preempted, vec![rid(2)]);
            assert_eq!(
                out.seqs.iter().map(|q| q.id).collect::<Vec<_>>(),
                vec![rid(1)]
            );
            assert_eq!(s.waiting_ids().collect::<Vec<_>>(), vec![rid(2), rid(3)]);
            let q = s.sequence(rid(2));
            assert_eq!(q.map(|q| q.status()), Some(SequenceStatus::Waiting));
            assert_eq!(q.map(|q| q.num_computed_tokens()), Some(0));
            assert_eq!(
                q.map(|q| q.output_token_ids().len()),
                Some(2),
                "outputs kept"
            );
            assert_eq!(s.num_preemptions(), 1);
        }
        let sampled = model.run(&s, &out);
        s.update(&sampled)?;
        if !preempted.is_empty() {
            break;
        }
    }
    assert!(!preempted.is_empty(), "expected a preemption");
    s.check_invariants()
}

#[test]
fn preempted_requests_finish_with_the_same_tokens() -> R {
    for prefix_caching in [false, true] {
        let mut cfg = config(6, 4); // 24 slots
        cfg.enable_prefix_caching = prefix_caching;
        let seqs: Vec<_> = (1..=5)
            .map(|i| fixed_request(i, 5 + i as usize, 9))
            .collect();
        let arrivals = seqs.iter().map(|s| at(0, s.clone())).collect();
        let res = drive(cfg.clone(), arrivals, &[], 1000)?;
        assert_matches_reference(&seqs, &res, max_len(&cfg));
        let preemptions: u32 = res.finished.values().map(|f| f.num_preemptions).sum();
        assert!(preemptions > 0, "the test needs preemptions");
        assert!(res.outputs.iter().any(|o| !o.preempted.is_empty()));
    }
    Ok(())
}

#[test]
fn kv_exhaustion_many_requests_on_few_blocks() -> R {
    let mut cfg = config(5, 4); // 20 slots
    cfg.max_num_seqs = 16;
    let seqs: Vec<_> = (1..=24)
        .map(|i| fixed_request(i, 1 + (i as usize * 7) % 12, 1 + (i as usize * 5) % 8))
        .collect();
    let arrivals = seqs
        .iter()
        .enumerate()
        .map(|(k, s)| at(k / 3, s.clone()))
        .collect();
    let res = drive(cfg.clone(), arrivals, &[], 5000)?;
    assert_matches_reference(&seqs, &res, max_len(&cfg));
    Ok(())
}

#[test]
fn chunked_prefill_respects_the_budget() -> R {
    let mut cfg = config(64, 4);
    cfg.max_num_batched_tokens = 8;
    let long = fixed_request(1, 30, 3);
    let short = fixed_request(2, 3, 3);
    let res = drive(
        cfg.clone(),
        vec![at(0, long.clone()), at(1, short.clone())],
        &[],
        100,
    )?;
    assert_matches_reference(&[long, short], &res, max_len(&cfg));
    // The long prompt is computed in chunks; only the last one samples.
    let chunks: Vec<_> = res
        .outputs
        .iter()
        .flat_map(|o| o.seqs.iter())
        .filter(|s| s.id == rid(1) && s.start_pos < 30)
        .map(|s| (s.start_pos, s.token_ids.len(), s.samples))
        .collect();
    assert_eq!(
        chunks,
        vec![(0, 8, false), (8, 8, false), (16, 8, false), (24, 6, true)]
    );
    // The short request arrives at step 1 but gets no budget until the last chunk of the
    // long prompt leaves room, at step 3.
    assert!(res.outputs.iter().all(|o| o.num_batched_tokens <= 8));
    assert!(res.outputs[3].seqs.iter().any(|s| s.id == rid(2)));
    Ok(())
}

#[test]
fn long_prefill_chunk_caps_each_prompt() -> R {
    let mut cfg = config(64, 4);
    cfg.max_num_batched_tokens = 64;
    cfg.long_prefill_chunk = Some(5);
    let a = fixed_request(1, 12, 2);
    let b = fixed_request(2, 7, 2);
    let res = drive(
        cfg.clone(),
        vec![at(0, a.clone()), at(0, b.clone())],
        &[],
        100,
    )?;
    assert_matches_reference(&[a, b], &res, max_len(&cfg));
    let step0: Vec<_> = res.outputs[0]
        .seqs
        .iter()
        .map(|s| (s.id, s.token_ids.len()))
        .collect();
    assert_eq!(step0, vec![(rid(1), 5), (rid(2), 5)]);
    Ok(())
}

#[test]
fn prefix_cache_hits_skip_computation() -> R {
    let shared = prompt(77, 16);
    let mk = |id: u64, tail: u64| {
        let mut p = shared.clone();
        p.extend(prompt(tail, 3));
        request(
            id,
            p,
            SamplingParams {
                ignore_eos: true,
                ..params(4)
            },
        )
    };
    let seqs = vec![mk(1, 1), mk(2, 2), mk(3, 3)];
    let run = |caching: bool| -> Result<RunResult, SchedError> {
        let mut cfg = config(32, 4);
        cfg.enable_prefix_caching = caching;
        // Request 1 first; the others arrive once its prompt is computed.
        let arrivals = vec![
            at(0, seqs[0].clone()),
            at(2, seqs[1].clone()),
            at(2, seqs[2].clone()),
        ];
        drive(cfg, arrivals, &[], 100)
    };
    let cached = run(true)?;
    let plain = run(false)?;
    assert_matches_reference(&seqs, &cached, 128);
    assert_matches_reference(&seqs, &plain, 128);
    assert_eq!(cached.finished[&rid(1)].num_cached_tokens, 0);
    for id in [2, 3] {
        assert_eq!(cached.finished[&rid(id)].num_cached_tokens, 16);
        assert_eq!(plain.finished[&rid(id)].num_cached_tokens, 0);
        let first = cached
            .outputs
            .iter()
            .flat_map(|o| o.seqs.iter())
            .find(|s| s.id == rid(id))
            .map(|s| (s.start_pos, s.token_ids.len()));
        assert_eq!(first, Some((16, 3)));
    }
    assert_eq!(plain.computed_tokens - cached.computed_tokens, 32);
    Ok(())
}

#[test]
fn identical_prompts_still_compute_their_last_token() -> R {
    let p = prompt(5, 8); // two full blocks of 4
    let seqs = vec![
        request(
            1,
            p.clone(),
            SamplingParams {
                ignore_eos: true,
                ..params(2)
            },
        ),
        request(
            2,
            p,
            SamplingParams {
                ignore_eos: true,
                ..params(2)
            },
        ),
    ];
    let res = drive(
        config(16, 4),
        vec![at(0, seqs[0].clone()), at(3, seqs[1].clone())],
        &[],
        50,
    )?;
    assert_matches_reference(&seqs, &res, 64);
    assert_eq!(res.finished[&rid(2)].num_cached_tokens, 4);
    Ok(())
}

#[test]
fn abort_waiting_and_running() -> R {
    let mut cfg = config(64, 4);
    cfg.max_num_seqs = 1;
    let mut s = Scheduler::new(cfg.clone())?;
    let mut model = FakeModel::new(&cfg);
    s.add(fixed_request(1, 5, 10))?;
    s.add(fixed_request(2, 5, 10))?;
    let out = s.schedule()?;
    assert_eq!(out.seqs.len(), 1);
    // Abort the waiting one: it never held blocks.
    let f = s.abort(rid(2))?;
    assert_eq!(
        f.as_ref()
            .map(|f| (f.reason.clone(), f.output_token_ids.len())),
        Some((FinishReason::Abort, 0))
    );
    // Abort the running one while its step is in flight: update ignores its token.
    let used = s.num_used_blocks();
    assert!(used > 0);
    let sampled = model.run(&s, &out);
    let f = s.abort(rid(1))?;
    assert_eq!(f.map(|f| f.reason), Some(FinishReason::Abort));
    assert_eq!(s.num_used_blocks(), 0);
    assert_eq!(s.update(&sampled), Ok(vec![]));
    assert_eq!(s.abort(rid(1)), Ok(None));
    assert!(!s.has_unfinished());
    s.check_invariants()
}

#[test]
fn abort_during_run_keeps_others_correct() -> R {
    let cfg = config(8, 4);
    let seqs: Vec<_> = (1..=6).map(|i| fixed_request(i, 6, 10)).collect();
    let arrivals = seqs.iter().map(|s| at(0, s.clone())).collect();
    let res = drive(
        cfg.clone(),
        arrivals,
        &[(3, rid(2)), (4, rid(6)), (9, rid(4))],
        1000,
    )?;
    let mut aborted = 0;
    for s in &seqs {
        let f = &res.finished[&s.id()];
        let (want, _) = reference(s.prompt_token_ids(), s.params(), &[EOS], max_len(&cfg));
        if f.reason == FinishReason::Abort {
            assert!([2, 4, 6].contains(&s.id().0));
            assert!(want.starts_with(&f.output_token_ids));
            aborted += 1;
        } else {
            assert_eq!(f.output_token_ids, want);
        }
    }
    assert!(aborted >= 2);
    Ok(())
}

#[test]
fn finish_for_stop_string_frees_blocks() -> R {
    let cfg = config(16, 4);
    let mut s = Scheduler::new(cfg.clone())?;
    let mut model = FakeModel::new(&cfg);
    s.add(fixed_request(1, 5, 10))?;
    let out = s.schedule()?;
    let sampled = model.run(&s, &out);
    s.update(&sampled)?;
    let f = s.finish(rid(1), FinishReason::Stop)?;
    assert_eq!(
        f.map(|f| (f.reason, f.output_token_ids.len())),
        Some((FinishReason::Stop, 1))
    );
    assert_eq!(s.num_free_blocks(), 16);
    assert_eq!(s.schedule()?.seqs.len(), 0);
    s.check_invariants()
}

#[test]
fn new_requests_join_a_running_batch() -> R {
    let cfg = config(64, 4);
    let seqs: Vec<_> = (1..=4).map(|i| fixed_request(i, 4, 6)).collect();
    let arrivals = seqs
        .iter()
        .enumerate()
        .map(|(k, s)| at(2 * k, s.clone()))
        .collect();
    let res = drive(cfg.clone(), arrivals, &[], 100)?;
    assert_matches_reference(&seqs, &res, max_len(&cfg));
    // At step 2, request 1 decodes while request 2 prefills, in one batch.
    let step2: Vec<_> = res.outputs[2]
        .seqs
        .iter()
        .map(|s| (s.id, s.token_ids.len()))
        .collect();
    assert_eq!(step2, vec![(rid(1), 1), (rid(2), 4)]);
    Ok(())
}

#[test]
fn sampling_through_the_scheduler_is_seeded() -> R {
    let cfg = config(16, 4);
    let sampler = tandem_sched::Sampler::new(vec![EOS]);
    let run = |other: bool| -> Result<Vec<u32>, SchedError> {
        let mut s = Scheduler::new(cfg.clone())?;
        let p = SamplingParams {
            seed: Some(9),
            ignore_eos: true,
            ..params(6)
        };
        s.add(request(
            1,
            prompt(1, 3),
            SamplingParams {
                temperature: 1.0,
                ..p
            },
        ))?;
        if other {
            s.add(request(
                2,
                prompt(2, 3),
                SamplingParams {
                    temperature: 1.0,
                    seed: None,
                    ..params(6)
                },
            ))?;
        }
        let mut done = Vec::new();
        while s.has_unfinished() {
            let out = s.schedule()?;
            let mut sampled = Vec::new();
            for id in out.sampling_ids() {
                let mut logits: Vec<f32> = (0..VOCAB).map(|v| (v % 7) as f32 * 0.3).collect();
                sampled.push((id, s.sample(id, &sampler, &mut logits)?.token));
            }
            done.extend(s.update(&sampled)?);
        }
        let f = done.into_iter().find(|f| f.id == rid(1));
        Ok(f.map(|f| f.output_token_ids).unwrap_or_default())
    };
    let alone = run(false)?;
    assert_eq!(alone.len(), 6);
    assert_eq!(alone, run(true)?);
    Ok(())
}

#[test]
fn lanes_split_the_sequences_and_step_independently() -> R {
    let mut s = Scheduler::new(config(64, 4))?;
    s.set_lanes(2)?;
    assert_eq!(s.num_lanes(), 2);
    for id in 1..=4 {
        s.add(fixed_request(id, 3, 3))?;
    }
    // Lane 0 takes its half of the four (the oldest two), lane 1 the rest, while lane 0's
    // step is still in flight.
    let a = s.schedule_lane(0)?;
    assert_eq!(
        a.seqs.iter().map(|q| q.id).collect::<Vec<_>>(),
        [rid(1), rid(2)]
    );
    assert_eq!(s.schedule_lane(0), Err(SchedError::StepInFlight));
    assert!(s.lane_in_flight(0) && !s.lane_in_flight(1));
    let b = s.schedule_lane(1)?;
    assert_eq!(
        b.seqs.iter().map(|q| q.id).collect::<Vec<_>>(),
        [rid(3), rid(4)]
    );
    assert!(matches!(s.schedule_lane(2), Err(SchedError::Invariant(_))));
    assert_eq!(s.set_lanes(3), Err(SchedError::StepInFlight));
    s.check_invariants()?;
    // Lanes close in any order; a lane's update only takes its own sequences' tokens.
    assert_eq!(
        s.update_lane(1, &[(rid(1), 5)]),
        Err(SchedError::UnexpectedSample(rid(1)))
    );
    s.update_lane(1, &[(rid(3), 5), (rid(4), 6)])?;
    let b2 = s.schedule_lane(1)?;
    assert_eq!(
        b2.seqs
            .iter()
            .map(|q| (q.id, q.start_pos))
            .collect::<Vec<_>>(),
        [(rid(3), 3), (rid(4), 3)]
    );
    s.update_lane(0, &[(rid(1), 7), (rid(2), 8)])?;
    let a2 = s.schedule_lane(0)?;
    assert_eq!(
        a2.seqs
            .iter()
            .map(|q| q.token_ids.clone())
            .collect::<Vec<_>>(),
        [vec![7], vec![8]]
    );
    s.check_invariants()?;
    Ok(())
}

#[test]
fn a_lone_prompt_gets_the_whole_budget_across_lanes() -> R {
    let mut s = Scheduler::new(config(64, 4))?; // 64 tokens per step
    s.set_lanes(2)?;
    s.add(fixed_request(1, 100, 2))?;
    let a = s.schedule_lane(0)?;
    assert_eq!(a.num_batched_tokens, 64);
    // Once another lane holds a sequence, a lane gets its half.
    s.add(fixed_request(2, 100, 2))?;
    let b = s.schedule_lane(1)?;
    assert_eq!((b.seqs[0].id, b.num_batched_tokens), (rid(2), 32));
    s.update_lane(0, &[])?;
    assert_eq!(s.schedule_lane(0)?.num_batched_tokens, 32);
    Ok(())
}

#[test]
fn a_lane_preempts_only_its_own_sequences() -> R {
    // 6 blocks of 2: two 3-token prompts per lane take 2 blocks each... then decodes run out.
    let mut cfg = config(6, 2);
    cfg.enable_prefix_caching = false;
    let mut s = Scheduler::new(cfg)?;
    s.set_lanes(2)?;
    for id in 1..=3 {
        s.add(fixed_request(id, 3, 8))?;
    }
    let a = s.schedule_lane(0)?; // 1, 2: 4 blocks
    assert_eq!(a.seqs.len(), 2);
    let b = s.schedule_lane(1)?; // 3: 2 blocks, cache full
    assert_eq!(b.seqs.len(), 1);
    s.update_lane(0, &[(rid(1), 5), (rid(2), 5)])?;
    // Lane 0's decodes fit (position 3 is in the second block); the next ones do not.
    let a = s.schedule_lane(0)?;
    assert_eq!(a.seqs.len(), 2);
    s.update_lane(0, &[(rid(1), 5), (rid(2), 5)])?;
    // Position 4 needs a third block each: lane 0 preempts its newest (2), never lane 1's 3,
    // whose step is in flight, although 3 arrived last.
    let a = s.schedule_lane(0)?;
    assert_eq!(a.preempted, [rid(2)]);
    assert_eq!(a.seqs.iter().map(|q| q.id).collect::<Vec<_>>(), [rid(1)]);
    assert!(s.running_ids().contains(&rid(3)));
    s.check_invariants()?;
    Ok(())
}

#[derive(Debug, Clone)]
struct Case {
    cfg: SchedulerConfig,
    reqs: Vec<(usize, usize, usize, usize, bool)>, // (arrival step, prefix id, suffix len, max tokens, eos on)
    aborts: Vec<(usize, usize)>,                   // (step, request index)
}

fn case() -> impl Strategy<Value = Case> {
    (
        1usize..6,     // max_num_seqs
        1usize..24,    // max_num_batched_tokens
        1usize..6,     // block_size
        4usize..24,    // num_blocks
        any::<bool>(), // prefix caching
        prop::option::of(1usize..8),
        prop::collection::vec(
            (0usize..20, 0usize..4, 1usize..20, 1usize..16, any::<bool>()),
            1..14,
        ),
        prop::collection::vec((0usize..30, 0usize..14), 0..3),
    )
        .prop_map(|(seqs, budget, bs, nb, pc, chunk, reqs, aborts)| Case {
            cfg: SchedulerConfig {
                max_num_seqs: seqs,
                max_num_batched_tokens: budget,
                block_size: bs,
                num_blocks: nb,
                enable_prefix_caching: pc,
                long_prefill_chunk: chunk,
                max_model_len: None,
            },
            reqs,
            aborts,
        })
}

/// Runs a random case with the scheduler in `lanes` lanes (1: the plain `drive`, more: lanes
/// stepped in rotation, every step index scaled by `lanes` so that a round of lanes stands for
/// one plain step) and checks that every request finishes exactly once with the tokens (and
/// length) it would have produced alone, or a prefix of them if aborted; the drivers check
/// leaks and stalls. Prompts too long for the cache must be rejected at add time.
fn check_case(c: &Case, lanes: usize) -> Result<(), TestCaseError> {
    let max_model_len = c.cfg.num_blocks * c.cfg.block_size;
    let prefixes: Vec<Vec<u32>> = (0..4)
        .map(|k| prompt(500 + k, k as usize * c.cfg.block_size + 1))
        .collect();
    let mut seqs = Vec::new();
    let mut arrivals = Vec::new();
    for (i, &(step, prefix, suffix, max_tokens, eos)) in c.reqs.iter().enumerate() {
        let mut p = if prefix == 0 {
            Vec::new()
        } else {
            prefixes[prefix].clone()
        };
        p.extend(prompt(i as u64, suffix));
        if p.len() >= max_model_len {
            let mut s =
                Scheduler::new(c.cfg.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let rejected = matches!(
                s.add(request(i as u64, p, params(max_tokens))),
                Err(SchedError::PromptTooLong { .. })
            );
            prop_assert!(rejected);
            continue;
        }
        let params = SamplingParams {
            ignore_eos: !eos,
            ..params(max_tokens)
        };
        let seq = request(i as u64, p, params);
        seqs.push(seq.clone());
        arrivals.push(Arrival {
            step: step * lanes,
            seq,
        });
    }
    let live: Vec<u64> = seqs.iter().map(|s| s.id().0).collect();
    let aborts: Vec<_> = c
        .aborts
        .iter()
        .filter(|a| live.contains(&(a.1 as u64)))
        .map(|&(step, i)| (step * lanes, rid(i as u64)))
        .collect();
    let res = if lanes == 1 {
        drive(c.cfg.clone(), arrivals, &aborts, 20_000)
    } else {
        drive_lanes(c.cfg.clone(), lanes, arrivals, &aborts, 40_000)
    }
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(res.finished.len(), seqs.len());
    for s in &seqs {
        let f = &res.finished[&s.id()];
        let (want, reason) = reference(s.prompt_token_ids(), s.params(), &[EOS], max_model_len);
        if f.reason == FinishReason::Abort {
            prop_assert!(aborts.iter().any(|a| a.1 == s.id()));
            prop_assert!(want.starts_with(&f.output_token_ids));
        } else {
            prop_assert_eq!(&f.output_token_ids, &want);
            prop_assert_eq!(&f.reason, &reason);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Random arrivals, lengths, limits and aborts: every request finishes exactly once, with
    /// the tokens (and length) it would have produced alone, no block leaks, no stall.
    #[test]
    fn every_request_finishes_once_with_the_right_tokens(c in case()) {
        check_case(&c, 1)?;
    }

    /// The same with the scheduler split into 2-3 lanes stepped in rotation (each scheduled
    /// while the others are in flight).
    #[test]
    fn lanes_finish_every_request_with_the_right_tokens(c in case(), lanes in 2usize..4) {
        check_case(&c, lanes)?;
    }
}
