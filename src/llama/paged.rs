//! The Llama family over the engine's paged K/V cache: one model step for a batch of
//! sequences that each feed their uncached tokens (a prompt, or one token), with every
//! sequence's own adapter slot (or none) in the prefix table, as `gpt2/paged.rs` does for
//! GPT-2. Each sequence's new queries and keys are rotated at its own positions (after its
//! prefix) before the keys go into its pages; the prefix table is never rotated.

use super::model::Llama;
use crate::attn::paged::PagedAttnArgs;
use crate::attn::{AttnFwdArgs, AttnFwdOut, Meta};
use crate::device::{Backend, MatmulOpts};
use crate::error::{Error, Result};
use crate::lm::paged::{PagedKv, PagedSeq, PrefixMode, PrefixTable};
use crate::tensor::{DType, Tensor};

/// The most new tokens a sequence may feed to the decode kernel (its contract's `Tq`).
const MAX_DECODE_TOKENS: usize = 16;

impl Llama {
    /// One engine step ([`crate::lm::PrefixLm::step_paged`]): sequences feeding the same
    /// number of tokens run as one `[B, t]` pass.
    pub(crate) fn step_paged_impl(
        &self,
        be: &dyn Backend,
        seqs: &[PagedSeq],
        kv: &mut PagedKv,
        prefixes: &PrefixTable,
        mode: PrefixMode,
    ) -> Result<Vec<Vec<f32>>> {
        let p = prefixes.prefix_len();
        let start = |s: &PagedSeq| match (mode, s.adapter) {
            (PrefixMode::CopiedIntoCache, Some(_)) => s.cached.max(p),
            _ => s.cached,
        };
        let mut out: Vec<Option<Vec<f32>>> = vec![None; seqs.len()];
        let mut fed: Vec<usize> = seqs.iter().map(|s| s.tokens.len() - start(s)).collect();
        fed.sort_unstable();
        fed.dedup();
        for t in fed {
            if t == 0 {
                return Err(Error::index(
                    "sequence",
                    "nothing to feed after the copied prefix (the prompt needs a real token)",
                ));
            }
            let group: Vec<usize> = (0..seqs.len())
                .filter(|&i| seqs[i].tokens.len() - start(&seqs[i]) == t)
                .collect();
            let members: Vec<&PagedSeq> = group.iter().map(|&i| &seqs[i]).collect();
            let logits = self.paged_pass(be, &members, t, kv, prefixes, mode)?;
            for (i, l) in group.into_iter().zip(logits) {
                out[i] = Some(l);
            }
        }
        out.into_iter()
            .map(|l| l.ok_or_else(|| Error::index("sequence", "was fed in no group")))
            .collect()
    }

    fn paged_pass(
        &self,
        be: &dyn Backend,
        seqs: &[&PagedSeq],
        t: usize,
        kv: &mut PagedKv,
        prefixes: &PrefixTable,
        mode: PrefixMode,
    ) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let w = &self.weights;
        let (b, e, f) = (seqs.len(), c.hidden_size, c.intermediate_size);
        let (hq, hkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (qw, kw) = (c.q_width(), c.kv_width());
        let m = b * t;
        let dt = self.dtype;
        let p = prefixes.prefix_len();
        let copied = mode == PrefixMode::CopiedIntoCache;
        let width = seqs.iter().map(|s| s.pages.len()).max().unwrap_or(1).max(1);
        let mut bt = vec![0i32; b * width];
        for (i, s) in seqs.iter().enumerate() {
            for (j, &pg) in s.pages.iter().enumerate() {
                bt[i * width + j] = pg as i32;
            }
        }
        let mut ids = Vec::with_capacity(m);
        let half = d / 2;
        let (mut cos, mut sin) = (Vec::with_capacity(m * half), Vec::with_capacity(m * half));
        let mut prefix_copies: Vec<(usize, usize, usize)> = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            let offset = if s.adapter.is_some() && !copied { p } else { 0 };
            let first = s.tokens.len() - t;
            if let (true, Some(a)) = (copied, s.adapter) {
                if s.cached < p {
                    prefix_copies.push((i, a as usize, s.cached));
                }
            }
            if offset + s.tokens.len() > c.max_position_embeddings {
                return Err(Error::index(
                    "sequence",
                    format!(
                        "{} tokens after a prefix of {offset} exceed max_position_embeddings = {}",
                        s.tokens.len(),
                        c.max_position_embeddings
                    ),
                ));
            }
            if let Some(&bad) = s.tokens[first..]
                .iter()
                .find(|&&id| id as usize >= c.vocab_size)
            {
                return Err(Error::index(
                    "tokens",
                    format!("token {bad} outside the vocabulary 0..{}", c.vocab_size),
                ));
            }
            ids.extend(s.tokens[first..].iter().map(|&id| id as i32));
            let (cs, sn) = c.rope_tables(offset + first, t);
            cos.extend(cs);
            sin.extend(sn);
        }
        let cos = be.upload(&Tensor::from_f32(&[b, t, half], &cos, DType::F32)?)?;
        let sin = be.upload(&Tensor::from_f32(&[b, t, half], &sin, DType::F32)?)?;
        let decode = t <= MAX_DECODE_TOKENS;
        let starts: Vec<i32> = seqs.iter().map(|s| (s.tokens.len() - t) as i32).collect();
        let len_max = seqs.iter().map(|s| s.tokens.len()).max().unwrap_or(0);
        let (key_rows, len_max) = if decode {
            (Vec::new(), 1)
        } else {
            (kv.rows_of(seqs, len_max), len_max)
        };
        let lens_q = vec![t as i32; b];
        let lens_k: Vec<i32> = seqs.iter().map(|s| s.tokens.len() as i32).collect();
        let prefix_index: Vec<i32> = seqs
            .iter()
            .map(|s| match s.adapter {
                Some(a) if !copied => a as i32,
                _ => -1,
            })
            .collect();
        let scale = 1.0 / (d as f32).sqrt();
        let eps = c.rms_norm_eps;

        let z = |shape: &[usize]| be.zeros(shape, dt);
        let mut x = z(&[m, e])?;
        be.gather_rows(&w.embed.view(), &ids, &mut x.view_mut())?;
        let mut norm = z(&[m, e])?;
        let mut rstd = be.zeros(&[m], DType::F32)?;
        let (mut q, mut k, mut v) = (z(&[m, qw])?, z(&[m, kw])?, z(&[m, kw])?);
        let (mut k_all, mut v_all) = (z(&[b * len_max, kw])?, z(&[b * len_max, kw])?);
        let mut atty = z(&[m, qw])?;
        let (mut gate, mut up, mut act) = (z(&[m, f])?, z(&[m, f])?, z(&[m, f])?);
        let linear = |x: &Tensor, l: &super::weights::Linear, out: &mut Tensor| -> Result<()> {
            let bias = l.bias.as_ref().map(|b| b.view());
            be.matmul(
                &x.view(),
                &l.weight.view(),
                bias.as_ref(),
                &mut out.view_mut(),
                MatmulOpts::nt(),
            )
        };
        for l in 0..c.num_hidden_layers {
            let lw = &w.layers[l];
            be.rmsnorm(
                &x.view(),
                &lw.input_norm.view(),
                eps,
                &mut norm.view_mut(),
                &mut rstd.view_mut(),
            )?;
            linear(&norm, &lw.q, &mut q)?;
            linear(&norm, &lw.k, &mut k)?;
            linear(&norm, &lw.v, &mut v)?;
            be.rope(
                &mut q.view_mut().reshape(&[b, t, hq, d])?,
                &cos.view(),
                &sin.view(),
            )?;
            be.rope(
                &mut k.view_mut().reshape(&[b, t, hkv, d])?,
                &cos.view(),
                &sin.view(),
            )?;
            let (kp, vp) = prefixes.layer(l)?;
            for &(i, a, from) in &prefix_copies {
                let n = p - from;
                let kr = kp.select(0, a)?.narrow(0, from, n)?.unsqueeze(0)?;
                let vr = vp.select(0, a)?.narrow(0, from, n)?.unsqueeze(0)?;
                let row = &bt[i * width..(i + 1) * width];
                kv.append(be, l, &kr, &vr, row, &[from as i32])?;
            }
            kv.append(
                be,
                l,
                &k.view().reshape(&[b, t, hkv, d])?,
                &v.view().reshape(&[b, t, hkv, d])?,
                &bt,
                &starts,
            )?;
            let (kc, vc) = kv.layer(l);
            let out = AttnFwdOut {
                o: atty.view_mut().reshape(&[b, t, hq, d])?,
                lse: None,
            };
            if decode {
                let pages = kv.num_pages();
                let ps = kv.page_size();
                let args = PagedAttnArgs::new(
                    q.view().reshape(&[b, t, hq, d])?,
                    kc.view().reshape(&[pages, ps, hkv, d])?,
                    vc.view().reshape(&[pages, ps, hkv, d])?,
                    Meta::Host(&bt),
                    Meta::Host(&lens_k),
                )
                .prefix(kp, vp)
                .prefix_index(Meta::Host(&prefix_index))
                .scale(scale);
                be.attn_decode(&args, out)?;
            } else {
                be.gather_rows(&kc.view(), &key_rows, &mut k_all.view_mut())?;
                be.gather_rows(&vc.view(), &key_rows, &mut v_all.view_mut())?;
                let args = AttnFwdArgs::new(
                    q.view().reshape(&[b, t, hq, d])?,
                    k_all.view().reshape(&[b, len_max, hkv, d])?,
                    v_all.view().reshape(&[b, len_max, hkv, d])?,
                )
                .prefix(kp, vp)
                .prefix_index(&prefix_index)
                .seqlens(&lens_q, &lens_k)
                .causal(true)
                .scale(scale);
                be.attn_fwd(&args, out)?;
            }
            // x += o(atty); x += down(silu(gate(n)) · up(n)), n = rms_post(x).
            linear(&atty, &lw.o, &mut norm)?;
            be.add_assign(&mut x.view_mut(), &norm.view())?;
            be.rmsnorm(
                &x.view(),
                &lw.post_norm.view(),
                eps,
                &mut norm.view_mut(),
                &mut rstd.view_mut(),
            )?;
            linear(&norm, &lw.gate, &mut gate)?;
            linear(&norm, &lw.up, &mut up)?;
            be.swiglu(&gate.view(), &up.view(), &mut act.view_mut())?;
            linear(&act, &lw.down, &mut norm)?;
            be.add_assign(&mut x.view_mut(), &norm.view())?;
        }
        // Only the last fed token of each sequence goes through the head.
        let last: Vec<i32> = (0..b).map(|i| (i * t + t - 1) as i32).collect();
        let mut xl = z(&[b, e])?;
        be.gather_rows(&x.view(), &last, &mut xl.view_mut())?;
        let mut nl = z(&[b, e])?;
        let mut rstd_l = be.zeros(&[b], DType::F32)?;
        be.rmsnorm(
            &xl.view(),
            &w.norm.view(),
            eps,
            &mut nl.view_mut(),
            &mut rstd_l.view_mut(),
        )?;
        let vsz = c.vocab_size;
        let mut logits = z(&[b, vsz])?;
        be.matmul(
            &nl.view(),
            &w.head().view(),
            None,
            &mut logits.view_mut(),
            MatmulOpts::nt(),
        )?;
        let host = be.download(&logits)?.to_f32_vec();
        Ok(host.chunks(vsz).map(|r| r.to_vec()).collect())
    }
}
