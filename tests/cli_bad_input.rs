//! Bad files and arguments through the command line: a clear error that names the file,
//! line or tensor, a non-zero exit, and never a panic.

mod common;

use common::files::{cli, fixture, s, tmp_dir, TmpPath};
use std::path::Path;

/// Copies the tiny-a model folder so a test can break one file.
fn model_copy(name: &str) -> TmpPath {
    let src = fixture("tiny-a/model");
    let dst = tmp_dir(name);
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    dst
}

/// Runs the CLI and returns stderr, asserting a clean failure (exit 1, no panic).
fn fails(args: &[&str]) -> String {
    let (status, _, stderr) = cli(args);
    assert!(!status.success(), "expected failure for {args:?}");
    assert!(!stderr.contains("panicked"), "panic for {args:?}: {stderr}");
    stderr
}

fn has(msg: &str, words: &[&str]) {
    for w in words {
        assert!(msg.contains(w), "{msg:?} should mention {w:?}");
    }
}

fn eval_err(model: &Path, adapter: Option<&Path>, data: &Path) -> String {
    let mut args = vec![
        "eval".to_string(),
        "--model".into(),
        s(model),
        "--data".into(),
        s(data),
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter".into(), s(a)]);
    }
    fails(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn bad_model_folders() {
    let data = fixture("tiny-a/eval.jsonl");
    // Missing folder.
    has(
        &eval_err(Path::new("/nonexistent/model"), None, &data),
        &["config.json"],
    );
    // Malformed and unsupported config.
    let m = model_copy("cfg");
    std::fs::write(m.join("config.json"), "{ not json").unwrap();
    has(
        &eval_err(&m, None, &data),
        &["config.json", "not a model config"],
    );
    let cfg = std::fs::read_to_string(fixture("tiny-a/model/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["scale_attn_by_inverse_layer_idx"] = true.into();
    std::fs::write(m.join("config.json"), v.to_string()).unwrap();
    has(
        &eval_err(&m, None, &data),
        &[
            "config.json",
            "scale_attn_by_inverse_layer_idx",
            "not supported",
        ],
    );
    v["scale_attn_by_inverse_layer_idx"] = false.into();
    v["activation_function"] = "relu".into();
    std::fs::write(m.join("config.json"), v.to_string()).unwrap();
    has(&eval_err(&m, None, &data), &["activation_function", "relu"]);
    // A config that disagrees with the weights.
    v["activation_function"] = "gelu_new".into();
    v["n_embd"] = 32.into();
    std::fs::write(m.join("config.json"), v.to_string()).unwrap();
    has(
        &eval_err(&m, None, &data),
        &["model.safetensors", "shape", "config.json implies"],
    );
    // Truncated weights.
    let m = model_copy("trunc");
    let bytes = std::fs::read(m.join("model.safetensors")).unwrap();
    std::fs::write(m.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    has(
        &eval_err(&m, None, &data),
        &["model.safetensors", "not a valid safetensors file"],
    );
    // Missing weights file.
    std::fs::remove_file(m.join("model.safetensors")).unwrap();
    has(&eval_err(&m, None, &data), &["model.safetensors"]);
}

#[test]
fn bad_adapters() {
    let model = fixture("tiny-a/model");
    let data = fixture("tiny-a/eval.jsonl");
    // An adapter of another model.
    has(
        &eval_err(&model, Some(&fixture("tiny-b/adapter")), &data),
        &[
            "adapter",
            "does not fit the model",
            "num_layers 2 vs n_layer 3",
        ],
    );
    // Wrong peft_type, and a prompt_embeddings of the wrong shape.
    let a = tmp_dir("adapter");
    let cfg = std::fs::read_to_string(fixture("tiny-a/adapter/adapter_config.json")).unwrap();
    std::fs::copy(
        fixture("tiny-a/adapter/adapter_model.safetensors"),
        a.join("adapter_model.safetensors"),
    )
    .unwrap();
    std::fs::write(
        a.join("adapter_config.json"),
        cfg.replace("PREFIX_TUNING", "LORA"),
    )
    .unwrap();
    has(
        &eval_err(&model, Some(&a), &data),
        &["adapter_config.json", "PREFIX_TUNING"],
    );
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["num_virtual_tokens"] = 6.into();
    std::fs::write(a.join("adapter_config.json"), v.to_string()).unwrap();
    has(
        &eval_err(&model, Some(&a), &data),
        &["adapter_model.safetensors", "prompt_embeddings", "[5, 384]"],
    );
    // Missing config.
    std::fs::remove_file(a.join("adapter_config.json")).unwrap();
    has(&eval_err(&model, Some(&a), &data), &["adapter_config.json"]);
}

#[test]
fn bad_data_files() {
    let model = fixture("tiny-a/model");
    let d = tmp_dir("data");
    let case = |name: &str, content: &[u8], words: &[&str]| {
        let p = d.join(name);
        std::fs::write(&p, content).unwrap();
        has(&eval_err(&model, None, &p), words);
    };
    case("empty.jsonl", b"", &["empty.jsonl", "no examples"]);
    case(
        "broken.jsonl",
        b"{\"input_ids\": [1, 2]}\n{\"input_ids\": [1, \n",
        &["broken.jsonl", "line 2", "not valid JSON"],
    );
    case(
        "utf8.jsonl",
        b"{\"prompt\": \"\xff\xfe\"}\n",
        &["utf8.jsonl", "UTF-8"],
    );
    case(
        "vocab.jsonl",
        b"{\"input_ids\": [1, 503]}\n",
        &["vocab.jsonl", "line 1", "503", "vocabulary"],
    );
    case(
        "labels.jsonl",
        b"{\"input_ids\": [1, 2], \"labels\": [1]}\n",
        &["line 1", "labels"],
    );
    case(
        "neg.jsonl",
        b"{\"input_ids\": [1, -2]}\n",
        &["line 1", "input_ids"],
    );
    case(
        "shape.jsonl",
        b"{\"txt\": \"hello\"}\n",
        &["line 1", "input_ids", "prompt", "text"],
    );
    case(
        "half.jsonl",
        b"{\"prompt\": \"hello\"}\n",
        &["line 1", "\"prompt\" without \"completion\""],
    );
    let long: Vec<String> = (0..65).map(|i| (i % 500).to_string()).collect();
    case(
        "long.jsonl",
        format!("{{\"input_ids\": [{}]}}\n", long.join(",")).as_bytes(),
        &["line 1", "65 tokens", "at most 64", "--max-length"],
    );
    // With a prefix of 5, only 59 tokens fit.
    let p = d.join("long60.jsonl");
    let ids: Vec<String> = (0..60).map(|i| i.to_string()).collect();
    std::fs::write(&p, format!("{{\"input_ids\": [{}]}}\n", ids.join(","))).unwrap();
    has(
        &eval_err(&model, Some(&fixture("tiny-a/adapter")), &p),
        &["60 tokens", "at most 59"],
    );
    // Prompt/completion without a tokenizer (tiny-b has none).
    let p = d.join("text.jsonl");
    std::fs::write(&p, "{\"prompt\": \"a\", \"completion\": \"b\"}\n").unwrap();
    has(
        &eval_err(&fixture("tiny-b/model"), None, &p),
        &["line 1", "tokenizer.json"],
    );
}

#[test]
fn bad_generate_arguments() {
    let m = s(&fixture("tiny-b/model"));
    has(
        &fails(&["generate", "--model", &m, "--prompt", "hi"]),
        &["tokenizer.json"],
    );
    has(
        &fails(&["generate", "--model", &m, "--input-ids", "1,97"]),
        &["97", "vocabulary"],
    );
    has(
        &fails(&["generate", "--model", &m, "--input-ids", "1,x"]),
        &["--input-ids", "\"x\""],
    );
    // A prompt that does not fit the context (tiny-b: n_positions 32).
    let long: Vec<String> = (0..33).map(|i| (i % 90).to_string()).collect();
    has(
        &fails(&["generate", "--model", &m, "--input-ids", &long.join(",")]),
        &["--prompt", "33 prompt tokens", "n_positions = 32"],
    );
    has(
        &fails(&[
            "generate",
            "--model",
            &m,
            "--input-ids",
            "1,2",
            "--device",
            "cuda",
        ]),
        &["cuda"],
    );
    // The kernel devices take head dims 64 and 128; tiny-b has 16.
    has(
        &fails(&[
            "generate",
            "--model",
            &m,
            "--input-ids",
            "1,2",
            "--device",
            "emu",
        ]),
        &["head dim 16", "64 and 128"],
    );
    // auto says which device it took (the cpu here unless a GPU is present).
    let (_, _, stderr) = cli(&[
        "generate",
        "--model",
        &m,
        "--input-ids",
        "1,2",
        "--max-new-tokens",
        "2",
        "--device",
        "auto",
    ]);
    assert!(
        stderr.contains("device auto:"),
        "auto should say which device it took: {stderr}"
    );
    has(
        &fails(&[
            "generate",
            "--model",
            &m,
            "--input-ids",
            "1,2",
            "--device",
            "tpu",
        ]),
        &["--device", "tpu"],
    );
}

/// Prompt/completion lines are tokenized separately, concatenated, EOS appended, and only
/// the completion and EOS counted.
#[test]
fn prompt_completion_examples() {
    use prefix_attn::tokenizer::Tokenizer;
    use prefix_attn::train::data::{load_jsonl, DataLimits};
    let tok = Tokenizer::load(&fixture("tiny-a/model/tokenizer.json")).unwrap();
    let d = tmp_dir("pc");
    let p = d.join("pc.jsonl");
    std::fs::write(
        &p,
        "{\"prompt\": \"name : The Eagle |\", \"completion\": \" The Eagle serves food.\"}\n\n",
    )
    .unwrap();
    let ex = load_jsonl(&p, Some(&tok), Some(0), DataLimits::new(503, 64)).unwrap();
    assert_eq!(ex.len(), 1);
    let pi = tok.encode("name : The Eagle |").unwrap();
    let ci = tok.encode(" The Eagle serves food.").unwrap();
    let mut ids = pi.clone();
    ids.extend(&ci);
    ids.push(0);
    assert_eq!(ex[0].input_ids, ids);
    assert!(ex[0].labels[..pi.len()].iter().all(|&l| l == -100));
    assert_eq!(
        ex[0].labels[pi.len()..],
        ids[pi.len()..]
            .iter()
            .map(|&x| x as i32)
            .collect::<Vec<_>>()[..]
    );
}
