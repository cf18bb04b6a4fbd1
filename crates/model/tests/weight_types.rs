//! Every weight type against f32 on every fixture family: each prompt teacher-forced on the
//! f32 model's greedy tokens, and at every step the logits of bf16 / q8_0 / q4_0 compared with
//! f32's by cosine similarity: >= 0.9999 (bf16), 0.999 (q8_0), 0.9 (q4_0; measured worst
//! 0.925 on these 64-wide random layers) at every step whose sequence has so far been routed
//! to the same experts as f32's. The fixtures' routers are random with top-k gaps as small as
//! 1e-4, so a rounded weight can flip an expert choice anywhere in a sequence's history, a
//! discrete change no rounding bound covers (q8_0: 10-45 of 48 steps per family); those steps
//! only have to stay recognisably the same distribution (cosine >= 0.5). The greedy tokens of bf16 and q8_0 equal f32's wherever f32's top-2 margin is
//! wider than twice the largest logit difference of that step.

mod common;
use common::reran_with_exact_bf16;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tandem_model::generate::argmax;
use tandem_model::weights::LinearType;
use tandem_model::{BatchLayout, ExpertSelection, KvCache, Model, SeqSlot, WeightType};

const FAMILIES: [&str; 8] = [
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "dbrx",
    "glm4_moe",
    "deepseek_v2",
    "deepseek_v3",
];
const STEPS: usize = 8;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

fn prompts(dir: &Path) -> Vec<Vec<u32>> {
    let text = std::fs::read_to_string(dir.join("expected.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| serde_json::from_value(p["ids"].clone()).unwrap())
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        ab += *x as f64 * *y as f64;
        aa += *x as f64 * *x as f64;
        bb += *y as f64 * *y as f64;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(1e-30)
}

fn top2_margin(x: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::MIN, f32::MIN);
    for &v in x {
        if v > a {
            b = a;
            a = v;
        } else if v > b {
            b = v;
        }
    }
    a - b
}

fn load(dir: &Path, ty: WeightType) -> Model {
    Model::load_typed(dir, &ExpertSelection::All, LinearType::Is(ty))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// One sequence: its KV cache and position.
struct Seq {
    kv: KvCache,
    len: usize,
}

impl Seq {
    fn new(m: &Model, cap: usize) -> Self {
        Self {
            kv: KvCache::new(&m.cfg, 4, cap.div_ceil(4)),
            len: 0,
        }
    }

    /// Runs `tokens`; the last token's logits and every row's expert set per MoE layer.
    fn step(&mut self, m: &Model, tokens: &[u32]) -> (Vec<f32>, Vec<BTreeSet<u32>>) {
        let layout = BatchLayout {
            seqs: vec![SeqSlot {
                start_pos: self.len,
                num_tokens: tokens.len(),
                block_table: (0..self.kv.num_blocks as u32).collect(),
            }],
        };
        let mut routes = Vec::new();
        let h = m
            .forward_observed(tokens, &layout, &mut self.kv, &mut |_, r| {
                routes.extend(r.ids.chunks(r.top_k).map(|c| c.iter().copied().collect()))
            })
            .unwrap();
        self.len += tokens.len();
        (m.logits(&h, &layout.last_rows()).unwrap(), routes)
    }
}

#[derive(Default, Debug)]
struct Outcome {
    /// Worst cosine over the steps routed like f32.
    worst_same_route: f64,
    steps: usize,
    /// Steps after an expert choice differed from f32's.
    rerouted: usize,
    tokens_compared: usize,
}

fn compare(name: &str, ty: WeightType, min_cos: f64) -> Outcome {
    let dir = fixture(name);
    let reference = load(&dir, WeightType::F32);
    let typed = load(&dir, ty);
    assert_eq!(typed.weight_type(), ty);
    let mut o = Outcome {
        worst_same_route: 1.0,
        ..Outcome::default()
    };
    for (i, prompt) in prompts(&dir).iter().enumerate() {
        let cap = prompt.len() + STEPS + 1;
        let (mut a, mut b) = (Seq::new(&reference, cap), Seq::new(&typed, cap));
        let mut next = prompt.clone();
        let mut rerouted = false;
        for step in 0..STEPS {
            let (x, ra) = a.step(&reference, &next);
            let (y, rb) = b.step(&typed, &next);
            rerouted |= ra != rb;
            let c = cosine(&x, &y);
            o.steps += 1;
            if rerouted {
                o.rerouted += 1;
                // (not on the grouped-routing fixtures: a flipped expert there is scaled by
                // routed_scaling_factor 2.5 in a 64-wide model; deepseek_v3 bf16 measured a
                // cosine of 0.47 after one)
                assert!(
                    c >= 0.5 || !FAMILIES[..5].contains(&name),
                    "{name} {ty} prompt {i} step {step}: cosine {c}"
                );
            } else {
                o.worst_same_route = o.worst_same_route.min(c);
                assert!(
                    c >= min_cos,
                    "{name} {ty} prompt {i} step {step}: cosine {c} < {min_cos} with the \
                     same experts as f32"
                );
            }
            let diff = x
                .iter()
                .zip(&y)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            if top2_margin(&x) > 2.0 * diff && ty != WeightType::Q4_0 {
                assert_eq!(
                    argmax(&x),
                    argmax(&y),
                    "{name} {ty} prompt {i} step {step}: greedy token differs"
                );
                o.tokens_compared += 1;
            }
            next = vec![argmax(&x)];
        }
    }
    o
}

#[test]
fn every_type_tracks_f32_on_every_family() {
    if reran_with_exact_bf16("every_type_tracks_f32_on_every_family") {
        return;
    }
    for name in FAMILIES {
        for (ty, min_cos) in [
            (WeightType::Bf16, 0.9999),
            (WeightType::Q8_0, 0.999),
            (WeightType::Q4_0, 0.9),
        ] {
            // On the three-layer grouped-routing fixtures (GLM-4.5, DeepSeek) q4_0's rounding
            // changes some expert choice during every prefill already, so no step keeps f32's
            // route and the bound above has nothing to check (measured: glm4_moe 48 of 48
            // steps rerouted). bf16 and q8_0 are checked on them.
            if ty == WeightType::Q4_0 && !FAMILIES[..5].contains(&name) {
                continue;
            }
            // MLA chains two more projections per layer (the query and latent bottlenecks),
            // and the rounding of each adds up: measured down to 0.99982 (bf16) and 0.99760
            // (q8_0) on steps routed like f32, 1 - cosine about 6x mixtral's for both types.
            let min_cos = match (name.starts_with("deepseek"), ty) {
                (true, WeightType::Bf16) => 0.9998,
                (true, WeightType::Q8_0) => 0.997,
                _ => min_cos,
            };
            let o = compare(name, ty, min_cos);
            eprintln!("{name} {ty}: {o:?}");
            // The bound was exercised: some steps kept f32's routing (every prompt's first
            // step but for q4_0, whose prefill already reroutes some).
            assert!(o.rerouted < o.steps, "{name} {ty}: {o:?}");
            if ty != WeightType::Q4_0 {
                assert!(
                    o.tokens_compared > 0,
                    "{name} {ty}: no step had a clear margin"
                );
            }
        }
    }
}

/// bf16 at the AVX512_BF16 level, where the activations of every bf16 product are rounded to
/// bf16 too (as llama.cpp does), against f32 on every family, as above with bounds of their
/// own: rounding the activations adds about as much error as rounding the weights, measured
/// down to 0.99986 (glm4_moe) on steps routed like f32, and on the MLA fixtures, which chain
/// more projections, 0.99974 (deepseek_v2) and 0.99960 (deepseek_v3).
#[test]
fn bf16_dot_tracks_f32_on_every_family() {
    if !tandem_kernels::simd().bf16_dot() {
        eprintln!("not at the AVX512_BF16 level: nothing to check");
        return;
    }
    for name in FAMILIES {
        let min_cos = if name.starts_with("deepseek") {
            0.9995
        } else {
            0.9998
        };
        let o = compare(name, WeightType::Bf16, min_cos);
        eprintln!("{name} bf16 dot: {o:?}");
        assert!(o.rerouted < o.steps, "{name}: {o:?}");
        assert!(o.tokens_compared > 0, "{name}: no step had a clear margin");
    }
}

#[test]
fn auto_keeps_the_checkpoint_type() {
    // qwen2_moe's fixture is stored in bf16, the others in f32.
    for (name, want) in [
        ("qwen2_moe", WeightType::Bf16),
        ("mixtral", WeightType::F32),
    ] {
        let m = Model::load(fixture(name)).unwrap();
        assert_eq!(m.weight_type(), want, "{name}");
        let mem = m.weight_memory();
        assert_eq!(mem.by_type.keys().collect::<Vec<_>>(), vec![want.name()]);
    }
}

#[test]
fn resident_memory_is_within_five_percent_of_the_weights() {
    for ty in WeightType::ALL {
        let m = load(&fixture("mixtral"), ty);
        let mem = m.weight_memory();
        let (held, own) = (mem.resident_bytes as f64, mem.weight_bytes() as f64);
        // The fixtures' 64-wide layers pad little; the demo model's 1024-wide ones pad less.
        assert!(
            held >= own && held <= 1.05 * own,
            "{ty}: resident {held} vs weights {own}"
        );
        // Smaller types hold fewer bytes, in the formats' ratios: q8_0 34 and q4_0 18 bytes
        // per 32 weights against f32's 128. Routers stay f32, and the LM head is q8_0 under
        // q4_0.
        let f32_bytes = load(&fixture("mixtral"), WeightType::F32)
            .weight_memory()
            .weight_bytes() as f64;
        let got = |t: &str| mem.by_type.get(t).copied().unwrap_or(0) as f64;
        let lm_head = (m.cfg.vocab_size * m.cfg.hidden_size * 4) as f64;
        let routers = got("f32");
        let (main, want) = match ty {
            WeightType::F32 => (got("f32"), f32_bytes),
            WeightType::Bf16 => (got("bf16"), f32_bytes / 2.0),
            WeightType::Q8_0 => (got("q8_0"), (f32_bytes - routers) * 34.0 / 128.0),
            WeightType::Q4_0 => {
                assert_eq!(got("q8_0"), lm_head * 34.0 / 128.0, "q4_0's LM head");
                (got("q4_0"), (f32_bytes - routers - lm_head) * 18.0 / 128.0)
            }
            other => unreachable!("{other} is a GGUF type, not in WeightType::ALL"),
        };
        assert!((main - want).abs() < 1.0, "{ty}: {main} bytes, want {want}");
    }
}

#[test]
fn gpt_oss_types_track_f32() {
    // Separate from the families above (their per-family bounds were measured on them).
    for name in ["gpt_oss", "gpt_oss_mxfp4"] {
        // q8_0 measured 0.99901 / 0.99903 on steps routed like f32: four layers of biased
        // projections, sinks and the SwiGLU clamp; the bound leaves that a little room.
        for (ty, min_cos) in [(WeightType::Bf16, 0.9999), (WeightType::Q8_0, 0.998)] {
            let o = compare(name, ty, min_cos);
            eprintln!("{name} {ty}: {o:?}");
            assert!(o.rerouted < o.steps, "{name} {ty}: {o:?}");
        }
    }
}

#[test]
fn gpt_oss_mxfp4_experts_are_held_in_the_checkpoints_bf16() {
    // The dequantized MXFP4 values (e2m1 times a power of two) are exact in bf16, the type of
    // the checkpoint's other tensors: under `auto` every linear layer is bf16, routers too.
    let m = Model::load(fixture("gpt_oss_mxfp4")).unwrap();
    assert_eq!(m.weight_type(), WeightType::Bf16);
    let mem = m.weight_memory();
    assert_eq!(mem.by_type.keys().collect::<Vec<_>>(), vec!["bf16"]);
    let e = m.layers[0].experts.routed[0].as_ref().unwrap();
    assert_eq!(e.gate_up.weight_type(), WeightType::Bf16);
    // Every value is a multiple of a power of two by one of the e2m1 magnitudes.
    let fp4 = [0.0f32, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    for v in e.down.w.unpack() {
        let (m, _) = frexp(v.abs());
        assert!(
            v == 0.0 || fp4.iter().any(|f| *f > 0.0 && frexp(*f).0 == m),
            "{v} is not an MXFP4 value"
        );
    }
}

/// `x = m * 2^e` with `m` in [0.5, 1).
fn frexp(x: f32) -> (f32, i32) {
    if x == 0.0 {
        return (0.0, 0);
    }
    let e = x.log2().floor() as i32 + 1;
    (x / 2f32.powi(e), e)
}
