//! What users reach for on the command line: text data and truncation, the `tokenize`
//! command, sharded checkpoints and `vocab.json` + `merges.txt`, generation up to the end of
//! the context, the help texts and the flags' errors.

mod common;

use common::files::{cli, copy_dir, fixture, s, tmp_dir};
use prefix_attn::tokenizer::Tokenizer;
use prefix_attn::train::data::{load_jsonl, truncate, DataLimits, Example, Truncation};
use std::path::Path;

/// Runs the CLI: (success, stdout, stderr); never a panic.
fn run(args: &[&str]) -> (bool, String, String) {
    let (status, out, err) = cli(args);
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    (status.success(), out, err)
}

fn ok(args: &[&str]) -> String {
    let (good, out, err) = run(args);
    assert!(good, "{args:?} failed: {err}");
    out
}

fn fails(args: &[&str], words: &[&str]) -> String {
    let (good, _, err) = run(args);
    assert!(!good, "{args:?} should fail");
    for w in words {
        assert!(err.contains(w), "{err:?} should mention {w:?}");
    }
    err
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

fn ex(ids: &[u32], prompt: usize) -> Example {
    Example {
        input_ids: ids.to_vec(),
        labels: ids
            .iter()
            .enumerate()
            .map(|(i, &x)| if i < prompt { -100 } else { x as i32 })
            .collect(),
    }
}

#[test]
fn truncation_cuts_the_prompt_first() {
    let ids: Vec<u32> = (10..20).collect();
    // Prompt of 4 (10..14), completion 14..20; 10 tokens down to 7.
    let mut e = ex(&ids, 4);
    truncate(&mut e, 7, Truncation::Left);
    assert_eq!(e.input_ids, vec![13, 14, 15, 16, 17, 18, 19]);
    assert_eq!(e.labels, vec![-100, 14, 15, 16, 17, 18, 19]);
    let mut e = ex(&ids, 4);
    truncate(&mut e, 7, Truncation::Right);
    assert_eq!(e.input_ids, vec![10, 14, 15, 16, 17, 18, 19]);
    assert_eq!(e.labels[0], -100);
    // More excess than prompt: the prompt goes, then the end of the completion.
    let mut e = ex(&ids, 4);
    truncate(&mut e, 4, Truncation::Left);
    assert_eq!(e.input_ids, vec![14, 15, 16, 17]);
    // No prompt: the chosen side of the whole example.
    let mut e = ex(&ids, 0);
    truncate(&mut e, 3, Truncation::Left);
    assert_eq!(e.input_ids, vec![17, 18, 19]);
    let mut e = ex(&ids, 0);
    truncate(&mut e, 3, Truncation::Right);
    assert_eq!(e.input_ids, vec![10, 11, 12]);
    assert_eq!(e.labels, vec![10, 11, 12]);
    // Short enough: untouched.
    let mut e = ex(&ids, 4);
    truncate(&mut e, 10, Truncation::Left);
    assert_eq!(e, ex(&ids, 4));
}

#[test]
fn text_lines_and_max_length() {
    let model = fixture("tiny-a/model");
    let tok = Tokenizer::load(&model.join("tokenizer.json")).unwrap();
    let d = tmp_dir("text");
    let p = d.join("text.jsonl");
    let text = "name : The Eagle | food : French || The Eagle serves French food .";
    std::fs::write(&p, serde_json::json!({ "text": text }).to_string() + "\n").unwrap();
    let ex = load_jsonl(&p, Some(&tok), Some(0), DataLimits::new(503, 64)).unwrap();
    let mut want = tok.encode(text).unwrap();
    want.push(0);
    assert_eq!(ex[0].input_ids, want);
    let labels: Vec<i32> = want.iter().map(|&x| x as i32).collect();
    assert_eq!(ex[0].labels, labels, "every token of a text line counts");
    // eval: a text line scores like the same ids given as input_ids.
    let ids = d.join("ids.jsonl");
    std::fs::write(
        &ids,
        serde_json::json!({ "input_ids": want }).to_string() + "\n",
    )
    .unwrap();
    let a = json(&ok(&["eval", "--model", &s(&model), "--data", &s(&p)]));
    let b = json(&ok(&["eval", "--model", &s(&model), "--data", &s(&ids)]));
    assert_eq!(a["loss"], b["loss"]);
    // --max-length truncates instead of refusing, and says how many.
    let long: Vec<String> = (0..65).map(|i| (1 + i % 500).to_string()).collect();
    let lp = d.join("long.jsonl");
    std::fs::write(
        &lp,
        format!(
            "{{\"input_ids\": [{}]}}\n{{\"input_ids\": [5, 6, 7]}}\n",
            long.join(",")
        ),
    )
    .unwrap();
    fails(
        &["eval", "--model", &s(&model), "--data", &s(&lp)],
        &["65 tokens", "--max-length"],
    );
    let (good, out, err) = run(&[
        "eval",
        "--model",
        &s(&model),
        "--data",
        &s(&lp),
        "--max-length",
        "20",
    ]);
    assert!(good, "{err}");
    assert!(
        err.contains("1 of 2 examples truncated to 20 tokens"),
        "{err}"
    );
    assert_eq!(json(&out)["truncated"], 1);
    assert_eq!(json(&out)["tokens"], 19 + 2);
    let out = ok(&[
        "eval",
        "--model",
        &s(&model),
        "--data",
        &s(&lp),
        "--truncate",
        "left",
    ]);
    assert_eq!(json(&out)["tokens"], 63 + 2);
    fails(
        &[
            "eval",
            "--model",
            &s(&model),
            "--data",
            &s(&lp),
            "--max-length",
            "70",
        ],
        &["--max-length", "70", "64"],
    );
    fails(
        &[
            "eval",
            "--model",
            &s(&model),
            "--data",
            &s(&lp),
            "--truncate",
            "middle",
        ],
        &["--truncate", "middle", "left or right"],
    );
}

#[test]
fn tokenize_prints_the_ids_generate_takes() {
    let model = fixture("tiny-a/model");
    let tok = Tokenizer::load(&model.join("tokenizer.json")).unwrap();
    let text = "name : The Eagle | food :";
    let out = ok(&["tokenize", "--model", &s(&model), text]);
    let want = tok.encode(text).unwrap();
    let got: Vec<u32> = out.trim().split(", ").map(|t| t.parse().unwrap()).collect();
    assert_eq!(got, want);
    let v = json(&ok(&["tokenize", "--model", &s(&model), text, "--json"]));
    assert_eq!(v["ids"].as_array().unwrap().len(), want.len());
    assert!(v["tokens"][0].is_string());
    // The printed form goes straight back into generate, as does the prompt text.
    let a = ok(&[
        "generate",
        "--model",
        &s(&model),
        "--input-ids",
        out.trim(),
        "--json",
        "--max-new-tokens",
        "4",
    ]);
    let b = ok(&[
        "generate",
        "--model",
        &s(&model),
        "--prompt",
        text,
        "--json",
        "--max-new-tokens",
        "4",
    ]);
    assert_eq!(json(&a)["ids"], json(&b)["ids"]);
    fails(
        &["tokenize", "--model", &s(&fixture("tiny-b/model")), "hi"],
        &["no tokenizer"],
    );
}

#[test]
fn generate_stops_at_the_context_and_strips_eos() {
    // tiny-b: n_positions 32, no tokenizer.
    let m = s(&fixture("tiny-b/model"));
    for ids in ["1,2", "1, 2", "[1, 2]", " 1 2 "] {
        let (good, out, err) = run(&[
            "generate",
            "--model",
            &m,
            "--input-ids",
            ids,
            "--max-new-tokens",
            "40",
            "--json",
        ]);
        assert!(good, "{ids:?}: {err}");
        let v = json(&out);
        if v["finish_reason"] == "context" {
            // 32 positions: 2 prompt tokens + 30 fed back + the one predicted last.
            assert_eq!(v["ids"].as_array().unwrap().len(), 31);
            assert!(err.contains("end of the context"), "{err}");
        } else {
            assert_eq!(v["finish_reason"], "eos", "{v}");
        }
    }
    // EOS: make the first generated token the EOS of a copy of tiny-a (which has a
    // tokenizer): generation stops there and the text leaves it out.
    let d = tmp_dir("eos");
    let model = d.join("model");
    copy_dir(&fixture("tiny-a/model"), &model);
    let first = json(&ok(&[
        "generate",
        "--model",
        &s(&model),
        "--prompt",
        "name : The Eagle",
        "--json",
        "--max-new-tokens",
        "1",
    ]))["ids"][0]
        .as_u64()
        .unwrap();
    let cfg_path = model.join("config.json");
    let mut cfg = json(&std::fs::read_to_string(&cfg_path).unwrap());
    cfg["eos_token_id"] = first.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let v = json(&ok(&[
        "generate",
        "--model",
        &s(&model),
        "--prompt",
        "name : The Eagle",
        "--json",
    ]));
    assert_eq!(v["finish_reason"], "eos");
    assert_eq!(v["ids"], serde_json::json!([first]));
    assert_eq!(v["text"], "", "the EOS token is not part of the text");
    let plain = ok(&[
        "generate",
        "--model",
        &s(&model),
        "--prompt",
        "name : The Eagle",
    ]);
    assert_eq!(plain, "\n");
}

/// A model saved in shards (`model.safetensors.index.json`) loads and scores exactly as the
/// single file.
#[test]
fn sharded_checkpoints() {
    use prefix_attn::io::{write_safetensors_f32, SafetensorsFile};
    let d = tmp_dir("shards");
    let model = d.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(fixture("tiny-a/model").join(f), model.join(f)).unwrap();
    }
    let src = SafetensorsFile::open(&fixture("tiny-a/model/model.safetensors")).unwrap();
    let names = src.names().unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = names
        .iter()
        .map(|n| {
            let (shape, data) = src.f32(n).unwrap();
            (n.clone(), shape, data)
        })
        .collect();
    let half = tensors.len() / 2;
    let mut map = serde_json::Map::new();
    for (i, part) in [&tensors[..half], &tensors[half..]].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let entries: Vec<(&str, Vec<usize>, &[f32])> = part
            .iter()
            .map(|(n, sh, v)| (n.as_str(), sh.clone(), v.as_slice()))
            .collect();
        write_safetensors_f32(&model.join(&file), &entries).unwrap();
        for (n, _, _) in part.iter() {
            map.insert(n.clone(), file.clone().into());
        }
    }
    std::fs::write(
        model.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let data = s(&fixture("tiny-a/eval.jsonl"));
    let adapter = s(&fixture("tiny-a/adapter"));
    let a = json(&ok(&[
        "eval",
        "--model",
        &s(&model),
        "--adapter",
        &adapter,
        "--data",
        &data,
    ]));
    let b = json(&ok(&[
        "eval",
        "--model",
        &s(&fixture("tiny-a/model")),
        "--adapter",
        &adapter,
        "--data",
        &data,
    ]));
    assert_eq!(a["loss"], b["loss"]);
    // A shard that is missing, or an index that names a tensor its shard lacks.
    std::fs::rename(
        model.join("model-00002-of-00002.safetensors"),
        d.join("away.safetensors"),
    )
    .unwrap();
    fails(
        &["eval", "--model", &s(&model), "--data", &data],
        &[
            "model.safetensors.index.json",
            "model-00002-of-00002.safetensors",
            "missing",
        ],
    );
    std::fs::rename(
        d.join("away.safetensors"),
        model.join("model-00002-of-00002.safetensors"),
    )
    .unwrap();
    let mut bad = map.clone();
    let (k0, _) = map.iter().next().unwrap();
    bad.insert(k0.clone(), "model-00002-of-00002.safetensors".into());
    std::fs::write(
        model.join("model.safetensors.index.json"),
        serde_json::json!({ "weight_map": bad }).to_string(),
    )
    .unwrap();
    fails(
        &["eval", "--model", &s(&model), "--data", &data],
        &["index.json", "does not hold it"],
    );
    // Neither form.
    let empty = d.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::copy(
        fixture("tiny-a/model/config.json"),
        empty.join("config.json"),
    )
    .unwrap();
    fails(
        &["eval", "--model", &s(&empty), "--data", &data],
        &["model.safetensors", "index.json"],
    );
}

/// GPT-2's `vocab.json` + `merges.txt` tokenize like the `tokenizer.json` they come from; a
/// tokenizer that does not fit the model is refused by name.
#[test]
fn vocab_and_merges_tokenizers() {
    let src = fixture("tiny-a/model");
    let tj = json(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap());
    let d = tmp_dir("bpe");
    let model = d.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), model.join(f)).unwrap();
    }
    std::fs::write(model.join("vocab.json"), tj["model"]["vocab"].to_string()).unwrap();
    let merges: Vec<String> = tj["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::Array(p) => {
                format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap())
            }
            other => other.as_str().unwrap().to_string(),
        })
        .collect();
    std::fs::write(
        model.join("merges.txt"),
        format!("#version: 0.2\n{}\n", merges.join("\n")),
    )
    .unwrap();
    let a = Tokenizer::load(&src.join("tokenizer.json")).unwrap();
    let b = Tokenizer::load_optional(&model).unwrap().unwrap();
    for text in [
        "name : The Eagle | food : French ||",
        " The Eagle serves French food .",
        "Zizzi<|endoftext|>naïve café 123  spaces\nnew line",
        "",
    ] {
        assert_eq!(a.encode(text).unwrap(), b.encode(text).unwrap(), "{text:?}");
        let ids = a.encode(text).unwrap();
        assert_eq!(a.decode(&ids).unwrap(), b.decode(&ids).unwrap());
    }
    let out = ok(&["tokenize", "--model", &s(&model), "The Eagle"]);
    assert!(!out.trim().is_empty());
    // merges.txt without vocab.json, and the reverse.
    std::fs::rename(model.join("merges.txt"), d.join("merges.txt")).unwrap();
    fails(
        &["tokenize", "--model", &s(&model), "x"],
        &["merges.txt", "missing"],
    );
    std::fs::rename(d.join("merges.txt"), model.join("merges.txt")).unwrap();
    // An empty vocabulary.
    let e = d.join("empty");
    copy_dir(&model, &e);
    std::fs::write(e.join("vocab.json"), "{}").unwrap();
    std::fs::write(e.join("merges.txt"), "#version: 0.2\n").unwrap();
    fails(
        &["tokenize", "--model", &s(&e), "x"],
        &["vocab.json", "vocabulary is empty"],
    );
    // A tokenizer with more tokens than the model (tiny-b: vocab_size 97).
    let big = d.join("big");
    copy_dir(&fixture("tiny-b/model"), &big);
    std::fs::copy(src.join("tokenizer.json"), big.join("tokenizer.json")).unwrap();
    fails(
        &[
            "eval",
            "--model",
            &s(&big),
            "--data",
            &s(&fixture("tiny-b/eval.jsonl")),
        ],
        &[
            "tokenizer.json",
            "vocab_size = 97",
            "do not belong together",
        ],
    );
}

#[test]
fn other_model_types_get_the_model_type_message() {
    let d = tmp_dir("falcon");
    std::fs::write(
        d.join("config.json"),
        r#"{"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100}"#,
    )
    .unwrap();
    let data = s(&fixture("tiny-a/eval.jsonl"));
    let err = fails(
        &["eval", "--model", &s(&d), "--data", &data],
        &[
            "config.json",
            "model_type \"falcon\"",
            "not supported",
            "llama",
        ],
    );
    assert!(!err.contains("missing field"), "{err}");
    // A Llama config is read as one: its own missing field is named.
    let d = tmp_dir("llama-partial");
    std::fs::write(
        d.join("config.json"),
        r#"{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100}"#,
    )
    .unwrap();
    fails(
        &["eval", "--model", &s(&d), "--data", &data],
        &["config.json", "llama config: missing num_attention_heads"],
    );
}

#[test]
fn help_and_flag_errors() {
    let help = ok(&["--help"]);
    assert!(!help.contains("being built"), "{help}");
    let pos = |w: &str| {
        help.find(&format!("\n  {w} "))
            .unwrap_or_else(|| panic!("{w} missing: {help}"))
    };
    let order = [
        "train",
        "eval",
        "generate",
        "demo",
        "tokenize",
        "bench",
        "check-attn",
        "shapes",
    ];
    for w in order.windows(2) {
        assert!(
            pos(w[0]) < pos(w[1]),
            "{} should come before {}: {help}",
            w[0],
            w[1]
        );
    }
    let train = ok(&["train", "--help"]);
    for w in [
        "--epochs <EPOCHS>",
        "[default: 5]",
        "--steps <STEPS>",
        "as many as --epochs take",
        "--batch-size <BATCH_SIZE>",
        "--grad-accum",
        "--no-prefix-projection",
        "--eval-data",
        "--max-length",
        "--base-model-name",
        "Ctrl-C",
    ] {
        assert!(train.contains(w), "train --help lacks {w:?}");
    }
    let eval = ok(&["eval", "--help"]);
    assert!(eval.contains("--batch-size <BATCH_SIZE>") && eval.contains("[default: 10]"));
    let step = ok(&["bench", "step", "--help"]);
    assert!(step.contains("cuda") && step.contains("emu") && step.contains("--batch-size"));
    let m = s(&fixture("tiny-a/model"));
    let data = s(&fixture("tiny-a/eval.jsonl"));
    let out = s(&tmp_dir("flags").join("run"));
    let base = ["train", "--model", &m, "--data", &data, "--out", &out];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|x| x.to_string()).collect()
    };
    let check = |extra: &[&str], words: &[&str]| {
        let a = with(extra);
        let err = fails(&a.iter().map(String::as_str).collect::<Vec<_>>(), words);
        assert!(!Path::new(&out).exists(), "{extra:?} left {out}: {err}");
        err
    };
    check(&["--steps", "0"], &["--steps", "at least 1"]);
    check(&["--epochs", "0"], &["--epochs", "at least 1"]);
    let e = check(&["--prefix-len", "0"], &["--prefix-len", "at least 1"]);
    assert!(!e.contains("--mid-dim"), "{e}");
    check(&["--mid-dim", "0"], &["--mid-dim", "at least 1"]);
    check(&["--batch-size", "0"], &["--batch-size", "at least 1"]);
    check(&["--grad-accum", "0"], &["--grad-accum", "at least 1"]);
    check(&["--optimizer", "adam"], &["--optimizer", "adamw or sgd"]);
    check(&["--lr-schedule", "cosine"], &["--lr-schedule", "cosine"]);
    check(&["--eval-every", "3"], &["--eval-data"]);
    check(
        &["--no-prefix-projection", "--mid-dim", "8"],
        &["--mid-dim", "--no-prefix-projection"],
    );
    check(&["--prefix-len", "64"], &["--prefix-len", "n_positions"]);
    check(&["--max-length", "80"], &["--max-length", "80"]);
    // bench step's batch flag has the common name (the old one still works).
    let a = ok(&[
        "bench",
        "step",
        "--batch-size",
        "2",
        "--seq",
        "8",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--json",
    ]);
    assert_eq!(json(&a)["batch"], 2);
    let a = ok(&[
        "bench", "step", "--batch", "3", "--seq", "8", "--steps", "1", "--warmup", "0", "--json",
    ]);
    assert_eq!(json(&a)["batch"], 3);
}

#[test]
fn demo_writes_outside_the_checkout_root_by_default() {
    let out = prefix_attn::demo::default_out();
    // The tests run in the crate root, which has target/.
    assert_eq!(out, Path::new("target").join("prefix-attn-demo"));
    let (good, _, err) = run(&["demo", "--steps", "0"]);
    assert!(!good && err.contains("--steps"), "{err}");
}
