//! Parity with Hugging Face transformers 5.24 + PEFT 0.21: fixtures written by
//! `tools/make_fixtures.py` from small random GPT-2s (computed in f64; see versions.json).

mod common;

use common::files::{cli, fixture, tmp_out};
use common::rel_err;
use prefix_attn::device::cpu::CpuBackend;
use prefix_attn::device::Backend;
use prefix_attn::gpt2::{Activations, Gpt2, Gradients};
use prefix_attn::io::SafetensorsFile;
use prefix_attn::lm::{generate, Batch};
use prefix_attn::prefix::encoder::{PrefixEncoder, PARAM_NAMES};
use prefix_attn::prefix::{AdapterConfig, PrefixAdapter};
use prefix_attn::tensor::{DType, Tensor};
use prefix_attn::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

struct Fixture {
    dir: PathBuf,
    expected: SafetensorsFile,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let dir = fixture(name);
        let expected = SafetensorsFile::open(&dir.join("expected.safetensors")).unwrap();
        Fixture { dir, expected }
    }
    fn f64(&self, name: &str) -> Vec<f64> {
        self.expected.f64(name).unwrap().1
    }
    fn i64(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        self.expected.i64(name).unwrap()
    }
    /// The batch's real tokens and labels, per sequence.
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
}

/// Max |got - want| relative to max |want|.
fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_f32_vec().into_iter().map(f64::from).collect()
}

const TOL: f64 = 1e-5;

fn check_model(name: &str) {
    let fx = Fixture::new(name);
    let be = CpuBackend;
    let model = Gpt2::load(&fx.dir.join("model"), &be).unwrap();
    let c = model.config.clone();

    // The MLP prefix from PEFT's initial encoder weights.
    let dims = PrefixEncoder::dims_in(&fx.dir.join("prefix_encoder.safetensors")).unwrap();
    assert_eq!((dims.num_layers, dims.token_dim), (c.n_layer, c.n_embd));
    let enc = PrefixEncoder::load(&fx.dir.join("prefix_encoder.safetensors"), dims, &be).unwrap();
    let mut eacts = enc.acts(&be).unwrap();
    enc.forward(&be, &mut eacts).unwrap();
    let e = rel_err(&f64s(&eacts.prefix), &fx.f64("prefix"));
    eprintln!("{name}: prefix rel err {e:.2e}");
    assert!(e < TOL, "{name}: prefix differs by {e}");

    // Logits at real positions and the loss, with and without the prefix.
    let examples = fx.examples();
    let refs: Vec<(&[u32], &[i32])> = examples
        .iter()
        .map(|(a, b)| (a.as_slice(), b.as_slice()))
        .collect();
    let batch = Batch::new(&refs).unwrap();
    let (shape, _) = fx.i64("input_ids");
    assert_eq!(
        batch.seq_len, shape[1],
        "the longest fixture sequence is unpadded"
    );
    let v = c.vocab_size;
    for (with_prefix, logits_name, loss_name) in [
        (true, "logits", "loss"),
        (false, "logits_base", "loss_base"),
    ] {
        let mut acts =
            Activations::new(&model, &be, batch.batch_size, batch.seq_len, with_prefix).unwrap();
        let prefix = with_prefix.then_some(&eacts.prefix);
        let loss = model.forward(&be, &batch, prefix, &mut acts, None).unwrap();
        let want = fx.f64(logits_name);
        let got = acts.logits().to_f32_vec();
        let (mut g, mut w) = (vec![], vec![]);
        for (b, (ids, _)) in examples.iter().enumerate() {
            for t in 0..ids.len() {
                let row = (b * batch.seq_len + t) * v;
                g.extend(got[row..row + v].iter().map(|&x| x as f64));
                w.extend(&want[row..row + v]);
            }
        }
        let e = rel_err(&g, &w);
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
            // Gradients of the mean loss w.r.t. the prefix and every encoder parameter.
            let mut grads = Gradients::new(
                &model,
                &be,
                batch.batch_size,
                batch.seq_len,
                dims.prefix_len,
            )
            .unwrap();
            model
                .backward(&be, &batch, &eacts.prefix, &acts, &mut grads)
                .unwrap();
            let inv = 1.0 / loss.count as f64;
            let gp: Vec<f64> = f64s(&grads.d_prefix).iter().map(|x| x * inv).collect();
            let e = rel_err(&gp, &fx.f64("grad.prefix"));
            eprintln!("{name}: grad.prefix rel err {e:.2e}");
            assert!(e < TOL, "{name}: grad.prefix differs by {e}");
            let mut eg = PrefixEncoder::zeros(dims, &be).unwrap();
            enc.backward(&be, &mut eacts, &grads.d_prefix, inv as f32, &mut eg)
                .unwrap();
            for (i, pname) in PARAM_NAMES.iter().enumerate() {
                let e = rel_err(&f64s(&eg.params[i]), &fx.f64(&format!("grad.{pname}")));
                eprintln!("{name}: grad.{pname} rel err {e:.2e}");
                assert!(e < TOL, "{name}: grad.{pname} differs by {e}");
            }
        }
    }

    // PEFT's saved adapter holds the encoder output, and our writer produces PEFT's config.
    let ad = PrefixAdapter::load(&fx.dir.join("adapter")).unwrap();
    let e = rel_err(
        &ad.prompt_embeddings
            .iter()
            .map(|&x| x as f64)
            .collect::<Vec<_>>(),
        &fx.f64("prefix"),
    );
    assert!(e < TOL, "{name}: adapter prompt_embeddings differ by {e}");
    let ours = tmp_out(&format!("parity-{name}"));
    let cfg = AdapterConfig::for_model(&c, dims.prefix_len, dims.hidden);
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
    let st = SafetensorsFile::open(&ours.join("adapter_model.safetensors")).unwrap();
    assert_eq!(st.names().unwrap(), vec!["prompt_embeddings".to_string()]);
    assert_eq!(st.f32("prompt_embeddings").unwrap().1, ad.prompt_embeddings);

    // Greedy generation with the cache, against HF's full-recompute reference.
    let prefix = be
        .upload(
            &Tensor::from_f32(
                &[dims.prefix_len, dims.out_dim()],
                &ad.prompt_embeddings,
                DType::F32,
            )
            .unwrap(),
        )
        .unwrap();
    let prompt: Vec<u32> = fx
        .i64("gen.prompt_ids")
        .1
        .iter()
        .map(|&x| x as u32)
        .collect();
    for (pre, ids_name) in [(Some(&prefix), "gen.ids"), (None, "gen.ids_base")] {
        let want: Vec<u32> = fx.i64(ids_name).1.iter().map(|&x| x as u32).collect();
        let got = generate::greedy_until(&model, &be, pre, &prompt, want.len(), c.eos_token_id)
            .unwrap()
            .ids;
        assert_eq!(got, want, "{name}: {ids_name}");
    }
}

#[test]
fn tiny_a_matches_transformers_and_peft() {
    check_model("tiny-a");
}

#[test]
fn tiny_b_bf16_unprefixed_names_matches_transformers_and_peft() {
    check_model("tiny-b");
}

#[test]
fn tiny_c_f16_checkpoint_head_dim_64_matches_transformers_and_peft() {
    check_model("tiny-c");
}

#[test]
fn tokenizer_matches_python_tokenizers() {
    let dir = fixture("tiny-a");
    let tok = Tokenizer::load(&dir.join("model/tokenizer.json")).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("versions.json")).unwrap()).unwrap();
    let text = v["gen_prompt_text"].as_str().unwrap();
    let want: Vec<u32> = v["gen_prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(tok.encode(text).unwrap(), want);
    assert_eq!(tok.decode(&want).unwrap(), text);
}

#[test]
fn eval_and_generate_commands_match_the_fixtures() {
    for name in ["tiny-a", "tiny-b", "tiny-c"] {
        let fx = Fixture::new(name);
        let d = |s: &str| fx.dir.join(s).to_string_lossy().into_owned();
        for (adapter, loss_name) in [(true, "loss"), (false, "loss_base")] {
            let mut args = vec![
                "eval",
                "--model",
                &d("model")[..],
                "--data",
                &d("eval.jsonl")[..],
                "--batch-size",
                "2",
            ]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
            if adapter {
                args.extend(["--adapter".to_string(), d("adapter")]);
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
            assert!((v["perplexity"].as_f64().unwrap() - want.exp()).abs() / want.exp() < 1e-4);
            assert_eq!(
                v["tokens"].as_u64().unwrap() as usize,
                fx.examples()
                    .iter()
                    .map(|(_, l)| l[1..].iter().filter(|&&x| x != -100).count())
                    .sum::<usize>()
            );
        }
        let prompt: Vec<String> = fx
            .i64("gen.prompt_ids")
            .1
            .iter()
            .map(|x| x.to_string())
            .collect();
        let want: Vec<u64> = fx.i64("gen.ids").1.iter().map(|&x| x as u64).collect();
        let n = want.len().to_string();
        let joined = prompt.join(",");
        let (status, stdout, stderr) = cli(&[
            "generate",
            "--model",
            &d("model"),
            "--adapter",
            &d("adapter"),
            "--input-ids",
            &joined,
            "--max-new-tokens",
            &n,
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
        if name == "tiny-c" {
            // The same command on the emu device (f16 model, the CUDA kernels on the CPU):
            // the fixture records top-1/top-2 gaps > 0.1 along this path, safe for fp16.
            let (status, stdout, stderr) = cli(&[
                "generate",
                "--model",
                &d("model"),
                "--adapter",
                &d("adapter"),
                "--input-ids",
                &joined,
                "--max-new-tokens",
                &n,
                "--json",
                "--device",
                "emu",
            ]);
            assert!(
                status.success(),
                "{name}: generate --device emu failed: {stderr}"
            );
            let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
            let ids: Vec<u64> = v["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            assert_eq!(ids, want, "{name}: generate --device emu ids");
            // eval on emu: within 3× the fp16 PyTorch run's loss error.
            let (status, stdout, stderr) = cli(&[
                "eval",
                "--model",
                &d("model"),
                "--adapter",
                &d("adapter"),
                "--data",
                &d("eval.jsonl"),
                "--device",
                "emu",
            ]);
            assert!(
                status.success(),
                "{name}: eval --device emu failed: {stderr}"
            );
            let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
            let (got, want) = (v["loss"].as_f64().unwrap(), fx.f64("loss")[0]);
            let torch16 = (fx.f64("fp16.loss")[0] - want).abs();
            assert!(
                (got - want).abs() <= 3.0 * torch16 + 1e-4,
                "{name}: eval --device emu loss {got} vs {want} (torch fp16 off by {torch16:.2e})"
            );
        }
        assert_eq!(
            v["text"].is_null(),
            name != "tiny-a",
            "text is null exactly without a tokenizer"
        );
    }
}
