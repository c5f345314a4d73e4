//! The demo: prefix-tuning end to end on an embedded default that needs no download.
//!
//! It writes a small GPT-2 with seeded random weights (Hugging Face layout) and a
//! word-level tokenizer made from the data's words, generates a table-to-text data set
//! (restaurant records to sentences, in the spirit of E2E), trains a prefix, and reports
//! held-out loss before and after and a few generations. The model is random: the prefix
//! learns the task's format and vocabulary, not language.

use crate::device::Backend;
use crate::error::{Error, Result};
use crate::gpt2::random::{small_config, write_random_model};
use crate::io::write_atomic;
use crate::lm::generate;
use crate::prefix::PrefixAdapter;
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;
use crate::train::data::{load_jsonl, DataLimits};
use crate::train::optim::Schedule;
use crate::train::trainer::{evaluate, train_observed, TrainObserver};
use crate::train::{train, Length, TrainConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Settings of a demo run.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Output folder (recreated if it holds an earlier demo; [`default_out`] by default).
    pub out: PathBuf,
    /// Training steps.
    pub steps: usize,
    /// Training examples.
    pub train_examples: usize,
    /// Held-out examples.
    pub eval_examples: usize,
    /// Seed of everything.
    pub seed: u64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            out: default_out(),
            steps: 300,
            train_examples: 400,
            eval_examples: 40,
            seed: 0,
        }
    }
}

/// Where the demo writes by default: `target/prefix-attn-demo` when the current folder has
/// a `target/` folder (a cargo checkout), else `prefix-attn-demo` in the system's temporary
/// folder. Never the current folder itself.
pub fn default_out() -> PathBuf {
    let target = Path::new("target");
    if target.is_dir() {
        target.join("prefix-attn-demo")
    } else {
        std::env::temp_dir().join("prefix-attn-demo")
    }
}

/// What the demo measured.
#[derive(Clone, Debug)]
pub struct DemoReport {
    /// Held-out loss of the frozen model without a prefix.
    pub loss_no_prefix: f64,
    /// Held-out loss with the initial (untrained) prefix.
    pub loss_before: f64,
    /// Held-out loss with the trained prefix.
    pub loss_after: f64,
    /// `(prompt, generated, reference)` for a few held-out records.
    pub samples: Vec<(String, String, String)>,
    /// Where everything was written.
    pub out: PathBuf,
}

const MARKER: &str = "demo.json";
const NAMES: [&str; 12] = [
    "The Eagle",
    "Blue Spice",
    "The Mill",
    "Zizzi",
    "Aromi",
    "The Punter",
    "Cotto",
    "Giraffe",
    "The Vaults",
    "Alimentum",
    "Midsummer House",
    "The Phoenix",
];
const FOODS: [&str; 6] = [
    "Italian", "French", "Chinese", "Indian", "Japanese", "English",
];
const AREAS: [&str; 2] = ["city centre", "riverside"];
const PRICES: [&str; 3] = ["cheap", "moderate", "expensive"];
const RATINGS: [&str; 3] = ["low", "average", "high"];

fn record(rng: &mut Rng) -> (String, String) {
    let pick = |rng: &mut Rng, xs: &[&'static str]| xs[rng.below(xs.len() as u64) as usize];
    let (name, food, area, price, rating) = (
        pick(rng, &NAMES),
        pick(rng, &FOODS),
        pick(rng, &AREAS),
        pick(rng, &PRICES),
        pick(rng, &RATINGS),
    );
    let prompt = format!(
        "name : {name} | food : {food} | area : {area} | price : {price} | rating : {rating} ||"
    );
    let completion = if rng.below(2) == 0 {
        format!(" {name} is a {price} {food} restaurant in the {area} with a {rating} rating .")
    } else {
        format!(" In the {area} , {name} serves {price} {food} food and has a {rating} rating .")
    };
    (prompt, completion)
}

/// Writes a word-level `tokenizer.json` whose vocabulary is every word of `texts`, plus
/// `<|endoftext|>` (id 0) and `<unk>`. Returns the vocabulary size.
fn write_tokenizer(path: &Path, texts: &[String]) -> Result<usize> {
    let mut words: Vec<String> = texts
        .iter()
        .flat_map(|t| t.split_whitespace().map(String::from))
        .collect();
    words.sort();
    words.dedup();
    let mut vocab: BTreeMap<String, u32> = BTreeMap::new();
    vocab.insert("<|endoftext|>".into(), 0);
    vocab.insert("<unk>".into(), 1);
    for w in words {
        let n = vocab.len() as u32;
        vocab.entry(w).or_insert(n);
    }
    let n = vocab.len();
    // The tokenizer.json format of Hugging Face `tokenizers` for a word-level model split on
    // whitespace; decoding joins the tokens with spaces.
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
             "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "<unk>", "single_word": false, "lstrip": false,
             "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    write_atomic(
        path,
        serde_json::to_string(&json).unwrap_or_default().as_bytes(),
    )?;
    Ok(n)
}

fn write_jsonl(path: &Path, rows: &[(String, String)]) -> Result<()> {
    let text: String = rows
        .iter()
        .map(|(p, c)| serde_json::json!({"prompt": p, "completion": c}).to_string() + "\n")
        .collect();
    write_atomic(path, text.as_bytes())
}

/// Runs the demo; `observer` sees the training run.
pub fn run_demo(
    opts: &DemoOptions,
    be: &dyn Backend,
    observer: &mut dyn TrainObserver,
) -> Result<DemoReport> {
    if opts.steps == 0 {
        return Err(Error::index("--steps", "must be at least 1"));
    }
    let out = &opts.out;
    if out.exists() {
        let is_demo = out.join(MARKER).exists();
        let empty = std::fs::read_dir(out)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !is_demo && !empty {
            return Err(Error::Format {
                path: out.clone(),
                msg: "exists and is not a demo folder; choose another --out".into(),
            });
        }
        std::fs::remove_dir_all(out).map_err(|source| Error::Io {
            path: out.clone(),
            source,
        })?;
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    write_atomic(
        &out.join(MARKER),
        serde_json::json!({"demo": "prefix-attn", "seed": opts.seed})
            .to_string()
            .as_bytes(),
    )?;

    // Data and tokenizer.
    let mut rng = Rng::new(opts.seed);
    let rows: Vec<(String, String)> = (0..opts.train_examples + opts.eval_examples)
        .map(|_| record(&mut rng))
        .collect();
    let (train_rows, eval_rows) = rows.split_at(opts.train_examples);
    let model_dir = out.join("model");
    std::fs::create_dir_all(&model_dir).map_err(io(&model_dir))?;
    let texts: Vec<String> = rows
        .iter()
        .flat_map(|(p, c)| [p.clone(), c.clone()])
        .collect();
    let vocab = write_tokenizer(&model_dir.join("tokenizer.json"), &texts)?;
    let (train_path, eval_path) = (out.join("train.jsonl"), out.join("eval.jsonl"));
    write_jsonl(&train_path, train_rows)?;
    write_jsonl(&eval_path, eval_rows)?;

    // A small random GPT-2: 4 layers, 2 heads of 64 (a head dim the CUDA kernels take, so
    // the demo runs on every device), EOS = id 0.
    let mut cfg = small_config(4, 2, 64, vocab, 64);
    cfg.eos_token_id = Some(0);
    write_random_model(&model_dir, &cfg, opts.seed + 1, 0.1)?;

    let (prefix_len, mid_dim) = (8, 128);
    let tc = TrainConfig {
        prefix_len,
        mid_dim,
        length: Length::Steps(opts.steps),
        batch_size: 16,
        lr: 3e-3,
        schedule: Schedule::Linear,
        warmup_steps: opts.steps / 20,
        seed: opts.seed,
        save_every: 100,
        eval_data: Some(eval_path.clone()),
        eval_every: (opts.steps / 10).max(1),
        ..TrainConfig::new(model_dir.clone(), train_path, out.join("run"))
    };

    let model = crate::lm::load(&model_dir, be)?;
    let tok = Tokenizer::load(&model_dir.join("tokenizer.json"))?;
    let limits = DataLimits::new(vocab, cfg.n_positions - prefix_len);
    let eval = load_jsonl(&eval_path, Some(&tok), Some(0), limits)?;
    // The untrained prefix: the same seeded initialisation, zero steps.
    let init_cfg = TrainConfig {
        out: out.join("untrained"),
        length: Length::Steps(0),
        ..tc.clone()
    };
    train(&init_cfg, be, &mut |_| true)?;
    let untrained = PrefixAdapter::load_for(&init_cfg.out, model.as_ref(), be)?;
    // Held-out loss in chunks of 16 sequences.
    let mean_loss =
        |prefix| -> Result<f64> { Ok(evaluate(model.as_ref(), be, prefix, &eval, 16)?.mean()) };
    let loss_no_prefix = mean_loss(None)?;
    let loss_before = mean_loss(Some(&untrained))?;

    train_observed(&tc, be, observer)?;
    let trained = PrefixAdapter::load_for(&tc.out, model.as_ref(), be)?;
    let loss_after = mean_loss(Some(&trained))?;

    let mut samples = vec![];
    for (p, c) in eval_rows.iter().take(3) {
        let ids = tok.encode(p)?;
        let new =
            generate::greedy_until(model.as_ref(), be, Some(&trained), &ids, 24, Some(0))?.ids;
        let text = tok.decode(new.strip_suffix(&[0]).unwrap_or(&new))?;
        samples.push((p.clone(), text, c.trim().to_string()));
    }
    Ok(DemoReport {
        loss_no_prefix,
        loss_before,
        loss_after,
        samples,
        out: out.clone(),
    })
}
