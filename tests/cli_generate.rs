//! `prefix-attn generate` with the engine: a request file over several adapters decoded in
//! one batch (greedy, seeded sampling, beam search), against transformers + PEFT's
//! `generate` (the committed decoding fixtures) and the library's contiguous-cache decoder;
//! reproducible sampling; the flags' and the file's errors.

mod common;

use common::files::{cli, fixture, ids, s, strings, tmp_dir};
use prefix_attn::device::cpu::CpuBackend;
use prefix_attn::device::Backend;
use prefix_attn::gpt2::Gpt2;
use prefix_attn::lm::generate;
use prefix_attn::prefix::PrefixAdapter;
use prefix_attn::rng::Rng;
use prefix_attn::tensor::{DType, Tensor};
use serde_json::Value;
use std::path::Path;

fn run(args: &[String]) -> (bool, String, String) {
    let (status, out, err) = cli(args);
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    (status.success(), out, err)
}

fn lines(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The fixture adapter with noise added, saved as a second adapter folder.
fn perturbed_adapter(dst: &Path) -> Vec<f32> {
    let mut ad = PrefixAdapter::load(&fixture("tiny-a").join("adapter")).unwrap();
    let mut rng = Rng::new(3);
    for x in ad.prompt_embeddings.iter_mut() {
        *x += 0.5 * rng.normal() as f32;
    }
    ad.save(dst).unwrap();
    ad.prompt_embeddings
}

#[test]
fn a_request_file_over_two_adapters_and_none_matches_the_references() {
    let dir = tmp_dir("gen-data");
    let model = fixture("tiny-a").join("model");
    let a = fixture("tiny-a").join("adapter");
    let b = dir.join("b");
    let b_vals = perturbed_adapter(&b);
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-a").join("decoding.json")).unwrap(),
    )
    .unwrap();
    let greedy_case = doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["case"] == "greedy")
        .unwrap();
    let prompt = ids(&greedy_case["prompt"]);
    let prompt_json = serde_json::to_string(&prompt).unwrap();
    let data = dir.join("req.jsonl");
    std::fs::write(
        &data,
        format!(
            "{{\"input_ids\": {prompt_json}, \"adapter\": \"fx\", \"max_new_tokens\": 10}}\n\
             \n\
             {{\"input_ids\": {prompt_json}, \"adapter\": null, \"max_new_tokens\": 6}}\n\
             {{\"input_ids\": [5, 17, 2], \"adapter\": \"b\"}}\n\
             {{\"prompt\": \"name : The Eagle |\", \"adapter\": \"fx\"}}\n"
        ),
    )
    .unwrap();
    let (ok, out, err) = run(&strings(&[
        "generate",
        "--model",
        &s(&model),
        "--adapter",
        &format!("fx={}", s(&a)),
        "--adapter",
        &s(&b),
        "--data",
        &s(&data),
        "--max-new-tokens",
        "7",
    ]));
    assert!(ok, "{err}");
    let rows = lines(&out);
    assert_eq!(rows.len(), 4);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["index"], i, "input order");
    }
    assert_eq!(
        ids(&rows[0]["ids"]),
        ids(&greedy_case["ids"]),
        "transformers + PEFT"
    );
    assert_eq!(rows[0]["adapter"], "fx");
    assert_eq!(rows[1]["adapter"], Value::Null);
    assert_eq!(rows[2]["adapter"], "b");
    assert_eq!(rows[1]["finish_reason"], "length");
    // The library's contiguous-cache decoder with the same prefixes.
    let be = CpuBackend;
    let m = Gpt2::load(&model, &be).unwrap();
    let fx = PrefixAdapter::load(&a).unwrap();
    let pre = |v: &[f32]| {
        let p = fx.config.num_virtual_tokens;
        be.upload(&Tensor::from_f32(&[p, v.len() / p], v, DType::F32).unwrap())
            .unwrap()
    };
    let eos = m.config.eos_token_id;
    let want1 = generate::greedy_until(&m, &be, None, &prompt, 6, eos)
        .unwrap()
        .ids;
    assert_eq!(ids(&rows[1]["ids"]), want1);
    let want2 = generate::greedy_until(&m, &be, Some(&pre(&b_vals)), &[5, 17, 2], 7, eos)
        .unwrap()
        .ids;
    assert_eq!(ids(&rows[2]["ids"]), want2);
    let tok = prefix_attn::tokenizer::Tokenizer::for_model(&model, m.config.vocab_size)
        .unwrap()
        .unwrap();
    let p3 = tok.encode("name : The Eagle |").unwrap();
    let want3 = generate::greedy_until(&m, &be, Some(&pre(&fx.prompt_embeddings)), &p3, 7, eos)
        .unwrap()
        .ids;
    assert_eq!(ids(&rows[3]["ids"]), want3);
    assert_eq!(rows[3]["text"], tok.decode(&want3).unwrap());
}

#[test]
fn beam_search_and_seeded_sampling_from_the_command_line() {
    let dir = tmp_dir("gen-modes");
    let model = fixture("tiny-a").join("model");
    let adapter = fixture("tiny-a").join("adapter");
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-a").join("decoding.json")).unwrap(),
    )
    .unwrap();
    let beam = doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["case"] == "beam3")
        .unwrap();
    let prompt = ids(&beam["prompt"])
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let base = strings(&["generate", "--model", &s(&model), "--adapter", &s(&adapter)]);
    let with = |extra: &[&str]| {
        let mut a = base.clone();
        a.extend(strings(extra));
        let (ok, out, err) = run(&a);
        assert!(ok, "{extra:?}: {err}");
        out
    };
    let out = with(&[
        "--input-ids",
        &prompt,
        "--num-beams",
        "3",
        "--max-new-tokens",
        "8",
        "--json",
    ]);
    assert_eq!(
        ids(&lines(&out)[0]["ids"]),
        ids(&beam["ids"]),
        "transformers beam search"
    );

    // Sampling: the same seed gives the same tokens; top-k 1 is greedy; request 0 of a file
    // samples as the single prompt does.
    let sample = [
        "--input-ids",
        &prompt,
        "--temperature",
        "1.5",
        "--max-new-tokens",
        "12",
        "--json",
    ];
    let a = with(&[&sample[..], &["--seed", "7"]].concat());
    let b = with(&[&sample[..], &["--seed", "7"]].concat());
    let c = with(&[&sample[..], &["--seed", "8"]].concat());
    assert_eq!(a, b);
    assert_ne!(ids(&lines(&a)[0]["ids"]), ids(&lines(&c)[0]["ids"]));
    let k1 = with(&[&sample[..], &["--top-k", "1"]].concat());
    let greedy = with(&["--input-ids", &prompt, "--max-new-tokens", "12", "--json"]);
    assert_eq!(ids(&lines(&k1)[0]["ids"]), ids(&lines(&greedy)[0]["ids"]));
    let data = dir.join("r.jsonl");
    let prompt_list = format!("[{prompt}]");
    std::fs::write(
        &data,
        format!("{{\"input_ids\": {prompt_list}}}\n{{\"input_ids\": [1, 2, 3], \"seed\": 5}}\n"),
    )
    .unwrap();
    let file = with(&[
        "--data",
        &s(&data),
        "--temperature",
        "1.5",
        "--max-new-tokens",
        "12",
        "--seed",
        "7",
    ]);
    assert_eq!(ids(&lines(&file)[0]["ids"]), ids(&lines(&a)[0]["ids"]));
    // A request's own seed: alone or in the batch, the same sample.
    std::fs::write(&data, "{\"input_ids\": [1, 2, 3], \"seed\": 5}\n").unwrap();
    let alone = with(&[
        "--data",
        &s(&data),
        "--temperature",
        "1.5",
        "--max-new-tokens",
        "12",
    ]);
    assert_eq!(lines(&alone)[0]["ids"], lines(&file)[1]["ids"]);

    // --out: written atomically, never over an existing file.
    let out_file = dir.join("out.jsonl");
    with(&["--data", &s(&data), "--out", &s(&out_file)]);
    let first = std::fs::read_to_string(&out_file).unwrap();
    assert_eq!(lines(&first).len(), 1);
    let mut again = base.clone();
    again.extend(strings(&[
        "--data",
        &s(&data),
        "--out",
        &s(&out_file),
        "--max-new-tokens",
        "3",
    ]));
    let (ok, _, err) = run(&again);
    assert!(!ok && err.contains("exists; not overwriting"), "{err}");
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), first);
}

#[test]
fn bad_requests_and_flags_are_clear_errors() {
    let dir = tmp_dir("gen-bad");
    let model = fixture("tiny-a").join("model");
    let a = fixture("tiny-a").join("adapter");
    let data = dir.join("r.jsonl");
    let cases: [(&str, Vec<String>, &str); 6] = [
        (
            "{\"input_ids\": [1], \"adapter\": \"zz\"}\n",
            strings(&["--adapter", &format!("fx={}", s(&a))]),
            "adapter \"zz\" was not given",
        ),
        (
            "{\"input_ids\": [1]}\n",
            strings(&[
                "--adapter",
                &format!("x={}", s(&a)),
                "--adapter",
                &format!("y={}", s(&a)),
            ]),
            "2 adapters given",
        ),
        (
            "{\"input_ids\": [1]}\n{\"promt\": \"x\"}\n",
            vec![],
            "line 2: unknown field",
        ),
        (
            "{\"input_ids\": [1]}\n",
            strings(&["--top-k", "3"]),
            "need --temperature > 0",
        ),
        (
            "{\"input_ids\": [1]}\n",
            strings(&["--num-beams", "2", "--temperature", "1"]),
            "beam search is deterministic",
        ),
        (
            "{\"input_ids\": [99999]}\n",
            vec![],
            "outside the vocabulary",
        ),
    ];
    for (text, extra, want) in cases {
        std::fs::write(&data, text).unwrap();
        let mut args = strings(&["generate", "--model", &s(&model), "--data", &s(&data)]);
        args.extend(extra);
        let (ok, _, err) = run(&args);
        assert!(!ok && err.contains(want), "{args:?}: {err} (wanted {want})");
    }
}

/// `--stop TEXT`: the generation ends at the token that completes TEXT, the printed text ends
/// before it, and the ids are the greedy ids up to that token.
#[test]
fn stop_strings_end_the_text_before_them() {
    let model = fixture("tiny-a").join("model");
    let adapter = fixture("tiny-a").join("adapter");
    let be = CpuBackend;
    let m = Gpt2::load(&model, &be).unwrap();
    let tok = prefix_attn::tokenizer::Tokenizer::for_model(&model, m.config.vocab_size)
        .unwrap()
        .unwrap();
    let base = strings(&[
        "generate",
        "--model",
        &s(&model),
        "--adapter",
        &s(&adapter),
        "--prompt",
        "name : The Eagle |",
        "--max-new-tokens",
        "12",
        "--json",
    ]);
    let (ok, out, err) = run(&base);
    assert!(ok, "{err}");
    let full = ids(&lines(&out)[0]["ids"]);
    // A stop string: the text of the first token j ≥ 1 that does not occur in the text
    // before it (so the stop fires exactly at token j).
    let (j, stop) = (1..full.len())
        .find_map(|j| {
            let piece = tok.decode(&full[j..=j]).unwrap();
            let before = tok.decode(&full[..j]).unwrap();
            let ok =
                !piece.trim().is_empty() && !piece.contains('\u{fffd}') && !before.contains(&piece);
            ok.then_some((j, piece))
        })
        .expect("a token whose text is new");
    let mut args = base.clone();
    args.extend(strings(&["--stop", &stop]));
    let (ok, out, err) = run(&args);
    assert!(ok, "{err}");
    let row = &lines(&out)[0];
    assert_eq!(ids(&row["ids"]), full[..=j].to_vec());
    assert_eq!(row["finish_reason"], "stop");
    let text3 = tok.decode(&full[..=j]).unwrap();
    let want = &text3[..text3.find(&stop).unwrap()];
    assert_eq!(row["text"], want, "stop {stop:?}");
}
