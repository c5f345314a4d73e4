//! Parity of the Llama family with Hugging Face transformers 5.24 + PEFT 0.21: fixtures
//! written by `tools/make_fixtures.py --llama` from small random models (a Llama with GQA,
//! an explicit head_dim and an untied head, stored bf16 in shards; a Qwen2 with q/k/v biases
//! and a tied head, stored f32; a Mistral with head dim 32 and an unused sliding window, stored
//! f16), computed in f64 (see each fixture's versions.json).

mod common;

use common::files::{cli, llama_fixture, tmp_out};
use common::{f64s, rel_err};
use prefix_attn::device::cpu::CpuBackend;
use prefix_attn::device::Backend;
use prefix_attn::io::SafetensorsFile;
use prefix_attn::llama::{Activations, GradScratch, Llama};
use prefix_attn::lm::{generate, Batch, PrefixLm};
use prefix_attn::prefix::encoder::{PrefixEncoder, PARAM_NAMES};
use prefix_attn::prefix::{AdapterConfig, PrefixAdapter};
use prefix_attn::tensor::{DType, Tensor};
use prefix_attn::train::optim::{OptimizerKind, Schedule};
use prefix_attn::train::{train, Length, TrainConfig};
use std::path::{Path, PathBuf};

const MODELS: [&str; 3] = ["llama-gqa", "qwen2-tied", "mistral-f16"];

/// f32 against f64 references, relative to the largest reference value (as for GPT-2).
const TOL: f64 = 1e-5;

struct Fixture {
    dir: PathBuf,
    expected: SafetensorsFile,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let dir = llama_fixture(name);
        let expected = SafetensorsFile::open(&dir.join("expected.safetensors")).unwrap();
        Fixture { dir, expected }
    }
    fn f64(&self, name: &str) -> Vec<f64> {
        self.expected.f64(name).unwrap().1
    }
    fn i64(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        self.expected.i64(name).unwrap()
    }
    fn examples(&self) -> Vec<(Vec<u32>, Vec<i32>)> {
        let (shape, ids) = self.i64("input_ids");
        let (_, mask) = self.i64("attention_mask");
        let (_, labels) = self.i64("labels");
        let (b, t) = (shape[0], shape[1]);
        (0..b)
            .map(|i| {
                let n = (0..t).filter(|&j| mask[i * t + j] == 1).count();
                (
                    (0..n).map(|j| ids[i * t + j] as u32).collect(),
                    (0..n).map(|j| labels[i * t + j] as i32).collect(),
                )
            })
            .collect()
    }
    fn d(&self, s: &str) -> String {
        self.dir.join(s).to_string_lossy().into_owned()
    }
}

fn check_model(name: &str) {
    let fx = Fixture::new(name);
    let be = CpuBackend;
    let model = Llama::load(&fx.dir.join("model"), &be).unwrap();
    let g = model.geometry();

    // The MLP prefix from PEFT's initial encoder weights; PEFT's token_dim is Hkv·D.
    let enc_path = fx.dir.join("prefix_encoder.safetensors");
    let dims = PrefixEncoder::dims_in(&enc_path).unwrap();
    assert_eq!((dims.num_layers, dims.token_dim), (g.layers, g.kv_width()));
    let enc = PrefixEncoder::load(&enc_path, dims, &be).unwrap();
    let mut eacts = enc.acts(&be).unwrap();
    enc.forward(&be, &mut eacts).unwrap();
    let e = rel_err(&f64s(&eacts.prefix), &fx.f64("prefix"));
    eprintln!("{name}: prefix rel err {e:.2e}");
    assert!(e < TOL, "{name}: prefix differs by {e}");

    let examples = fx.examples();
    let refs: Vec<(&[u32], &[i32])> = examples
        .iter()
        .map(|(a, b)| (a.as_slice(), b.as_slice()))
        .collect();
    let batch = Batch::new(&refs).unwrap();
    let v = g.vocab_size;
    let m = batch.batch_size * batch.seq_len;
    for (with_prefix, logits_name, loss_name) in [
        (true, "logits", "loss"),
        (false, "logits_base", "loss_base"),
    ] {
        let mut acts = Activations::with_rows(&model, &be, m, with_prefix).unwrap();
        let prefix = with_prefix.then_some(&eacts.prefix);
        let loss = model.forward(&be, &batch, prefix, &mut acts, None).unwrap();
        let want = fx.f64(logits_name);
        let got = acts.logits().to_f32_vec();
        let (mut gv, mut wv) = (vec![], vec![]);
        for (b, (ids, _)) in examples.iter().enumerate() {
            for t in 0..ids.len() {
                let row = (b * batch.seq_len + t) * v;
                gv.extend(got[row..row + v].iter().map(|&x| x as f64));
                wv.extend(&want[row..row + v]);
            }
        }
        let e = rel_err(&gv, &wv);
        let want_loss = fx.f64(loss_name)[0];
        let le = (loss.mean() - want_loss).abs() / want_loss;
        eprintln!(
            "{name}: {logits_name} rel err {e:.2e}, {loss_name} {} vs {want_loss} (rel {le:.2e})",
            loss.mean()
        );
        assert!(e < TOL, "{name}: {logits_name} differ by {e}");
        assert!(
            le < TOL,
            "{name}: {loss_name} {} vs {want_loss}",
            loss.mean()
        );

        if with_prefix {
            let mut scratch = GradScratch::new(&model, &be, m).unwrap();
            let mut d_prefix =
                Tensor::zeros(&[dims.prefix_len, g.prefix_width()], DType::F32).unwrap();
            model
                .backward(
                    &be,
                    &batch,
                    &eacts.prefix,
                    &acts,
                    &mut scratch,
                    &mut d_prefix,
                )
                .unwrap();
            let inv = 1.0 / loss.count as f64;
            let gp: Vec<f64> = f64s(&d_prefix).iter().map(|x| x * inv).collect();
            let e = rel_err(&gp, &fx.f64("grad.prefix"));
            eprintln!("{name}: grad.prefix rel err {e:.2e}");
            assert!(e < TOL, "{name}: grad.prefix differs by {e}");
            let mut eg = PrefixEncoder::zeros(dims, &be).unwrap();
            enc.backward(&be, &mut eacts, &d_prefix, inv as f32, &mut eg)
                .unwrap();
            for (i, pname) in PARAM_NAMES.iter().enumerate() {
                let e = rel_err(&f64s(&eg.params[i]), &fx.f64(&format!("grad.{pname}")));
                eprintln!("{name}: grad.{pname} rel err {e:.2e}");
                assert!(e < TOL, "{name}: grad.{pname} differs by {e}");
            }
        }
    }

    // PEFT's adapter holds the encoder output; read through the seam it gives PEFT's logits.
    let ad = PrefixAdapter::load(&fx.dir.join("adapter")).unwrap();
    let pe: Vec<f64> = ad.prompt_embeddings.iter().map(|&x| x as f64).collect();
    let e = rel_err(&pe, &fx.f64("prefix"));
    assert!(e < TOL, "{name}: adapter prompt_embeddings differ by {e}");
    let prefix = PrefixAdapter::load_for(&fx.dir.join("adapter"), &model, &be).unwrap();
    let mut acts = Activations::with_rows(&model, &be, m, false).unwrap();
    model
        .forward(&be, &batch, Some(&prefix), &mut acts, None)
        .unwrap();
    let (got, want) = (acts.logits().to_f32_vec(), fx.f64("logits"));
    let (mut gv, mut wv) = (vec![], vec![]);
    for (b, (ids, _)) in examples.iter().enumerate() {
        let row = b * batch.seq_len * v;
        gv.extend(got[row..row + ids.len() * v].iter().map(|&x| x as f64));
        wv.extend(&want[row..row + ids.len() * v]);
    }
    let e = rel_err(&gv, &wv);
    eprintln!("{name}: logits from PEFT's adapter rel err {e:.2e}");
    assert!(e < TOL, "{name}: logits from PEFT's adapter differ by {e}");

    // Our adapter writer produces PEFT's config and tensor.
    let ours = tmp_out(&format!("parity-{name}"));
    let cfg = AdapterConfig::for_model(&model.config, dims.prefix_len, dims.hidden);
    PrefixAdapter {
        config: cfg,
        prompt_embeddings: ad.prompt_embeddings.clone(),
    }
    .save(&ours)
    .unwrap();
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap())
            .unwrap()
    };
    assert_eq!(
        read(&ours),
        read(&fx.dir.join("adapter")),
        "{name}: adapter_config.json differs from PEFT's"
    );
    let back = PrefixAdapter::load(&ours).unwrap();
    assert_eq!(back.prompt_embeddings, ad.prompt_embeddings);

    // Greedy generation with the cache against the full-recompute reference.
    let prompt: Vec<u32> = fx
        .i64("gen.prompt_ids")
        .1
        .iter()
        .map(|&x| x as u32)
        .collect();
    for (pre, ids_name) in [(Some(&prefix), "gen.ids"), (None, "gen.ids_base")] {
        let want: Vec<u32> = fx.i64(ids_name).1.iter().map(|&x| x as u32).collect();
        let got =
            generate::greedy_until(&model, &be, pre, &prompt, want.len(), model.eos_token_id())
                .unwrap()
                .ids;
        assert_eq!(got, want, "{name}: {ids_name}");
    }
    // The fixture's gaps are far above f32 error, so the ids above are a real check.
    let gaps = fx.f64("gen.gaps");
    assert!(gaps.iter().all(|&x| x > 1e-3), "{name}: gaps {gaps:?}");
    let _ = be.synchronize();
}

#[test]
fn llama_gqa_bf16_sharded_matches_transformers_and_peft() {
    check_model("llama-gqa");
}

#[test]
fn qwen2_biases_tied_matches_transformers_and_peft() {
    check_model("qwen2-tied");
}

#[test]
fn mistral_f16_head_dim_32_matches_transformers_and_peft() {
    check_model("mistral-f16");
}

/// The trainer's configuration of the fixtures' `adamw` run (3 steps on the whole batch).
fn adamw_run(fx: &Fixture, out: PathBuf) -> TrainConfig {
    let dims = PrefixEncoder::dims_in(&fx.dir.join("prefix_encoder.safetensors")).unwrap();
    TrainConfig {
        init: Some(fx.dir.join("prefix_encoder.safetensors")),
        prefix_len: dims.prefix_len,
        mid_dim: dims.hidden,
        length: Length::Steps(3),
        batch_size: 8,
        lr: 1e-2,
        schedule: Schedule::Constant,
        warmup_steps: 0,
        optimizer: OptimizerKind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
        seed: 0,
        save_every: 0,
        ..TrainConfig::new(fx.dir.join("model"), fx.dir.join("eval.jsonl"), out)
    }
}

/// Three AdamW steps of the trainer (through `lm::load`, the encoder and the optimiser of
/// `train/`) against torch.optim.AdamW on the same batch.
#[test]
fn three_adamw_steps_match_torch_optim() {
    for name in MODELS {
        let fx = Fixture::new(name);
        let out = tmp_out(&format!("{name}-adamw"));
        let cfg = adamw_run(&fx, out.to_path_buf());
        let r = train(&cfg, &CpuBackend, &mut |_| true).unwrap();
        let want = |k: &str| fx.f64(&format!("train.adamw.{k}"));
        let e = rel_err(&r.losses, &want("losses"));
        eprintln!("{name} adamw: losses {:?} rel err {e:.2e}", r.losses);
        assert!(
            e < TOL,
            "{name}: losses {:?} vs {:?}",
            r.losses,
            want("losses")
        );
        let ad = PrefixAdapter::load(&out).unwrap();
        let pe: Vec<f64> = ad.prompt_embeddings.iter().map(|&x| x as f64).collect();
        let e = rel_err(&pe, &want("prefix"));
        eprintln!("{name} adamw: adapter rel err {e:.2e}");
        assert!(e < TOL, "{name}: adapter after 3 steps differs by {e}");
        let enc = SafetensorsFile::open(&out.join("prefix_encoder.safetensors")).unwrap();
        for n in PARAM_NAMES {
            let got: Vec<f64> = enc.f32(n).unwrap().1.iter().map(|&x| x as f64).collect();
            let e = rel_err(&got, &want(n));
            // As for GPT-2: an AdamW update of an element whose gradient is near eps moves
            // with the gradient's last bits, so single parameters get a looser bound.
            assert!(e < 1e-4, "{name}: {n} differs by {e}");
        }
    }
}

/// `eval` and `generate --adapter` take these models with no change above `lm/`.
#[test]
fn eval_and_generate_commands_match_the_fixtures() {
    for name in MODELS {
        let fx = Fixture::new(name);
        for (adapter, loss_name) in [(true, "loss"), (false, "loss_base")] {
            let mut args = vec![
                "eval".to_string(),
                "--model".into(),
                fx.d("model"),
                "--data".into(),
                fx.d("eval.jsonl"),
                "--batch-size".into(),
                "2".into(),
            ];
            if adapter {
                args.extend(["--adapter".to_string(), fx.d("adapter")]);
            }
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let (status, stdout, stderr) = cli(&argv);
            assert!(status.success(), "{name}: eval failed: {stderr}");
            let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
            let want = fx.f64(loss_name)[0];
            let got = v["loss"].as_f64().unwrap();
            assert!(
                (got - want).abs() / want < TOL,
                "{name}: eval loss {got} vs {want}"
            );
        }
        let prompt: Vec<String> = fx
            .i64("gen.prompt_ids")
            .1
            .iter()
            .map(|x| x.to_string())
            .collect();
        let want: Vec<u64> = fx.i64("gen.ids").1.iter().map(|&x| x as u64).collect();
        let (status, stdout, stderr) = cli(&[
            "generate",
            "--model",
            &fx.d("model"),
            "--adapter",
            &fx.d("adapter"),
            "--input-ids",
            &prompt.join(","),
            "--max-new-tokens",
            &want.len().to_string(),
            "--json",
        ]);
        assert!(status.success(), "{name}: generate failed: {stderr}");
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        let ids: Vec<u64> = v["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(ids, want, "{name}: generate --json ids");
        // The same request through the serving engine (`--data`: the paged step), once with
        // the adapter and once bare.
        let data = tmp_out(&format!("{name}-requests.jsonl"));
        let ids_json = format!("[{}]", prompt.join(","));
        std::fs::write(
            &*data,
            format!(
                "{{\"input_ids\": {ids_json}, \"max_new_tokens\": {n}}}\n{{\"input_ids\": {ids_json}, \"adapter\": null, \"max_new_tokens\": {n}}}\n",
                n = want.len()
            ),
        )
        .unwrap();
        let (status, stdout, stderr) = cli(&[
            "generate",
            "--model",
            &fx.d("model"),
            "--adapter",
            &fx.d("adapter"),
            "--data",
            &data.to_string_lossy(),
        ]);
        assert!(status.success(), "{name}: generate --data failed: {stderr}");
        let rows: Vec<serde_json::Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let ids_of = |v: &serde_json::Value| -> Vec<u64> {
            v["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect()
        };
        assert_eq!(
            ids_of(&rows[0]),
            want,
            "{name}: generate --data with the adapter"
        );
        let base: Vec<u64> = fx.i64("gen.ids_base").1.iter().map(|&x| x as u64).collect();
        assert_eq!(
            ids_of(&rows[1])[..],
            base[..rows[1]["ids"].as_array().unwrap().len()],
            "{name}: generate --data bare"
        );
    }
}

/// The CUDA kernels on the emulator (f16 model) against the fixture `llama-gqa`: logits and
/// loss within 3× PyTorch fp16's own error, the prefix gradient, greedy generation and 3 AdamW
/// steps of the trainer (`common::llama_fp16`, which `tests/gpu.rs` runs on cuda).
#[test]
fn llama_gqa_on_emu_within_fp16_error() {
    let be = prefix_attn::device::emu::EmuBackend;
    match common::llama_fp16::llama_gqa_fp16_parity(&be) {
        Ok(report) => report.iter().for_each(|l| eprintln!("emu {l}")),
        Err(e) => panic!("emu: {e}"),
    }
}
