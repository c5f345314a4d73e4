//! The Llama family over the engine's paged K/V cache: one model step for a batch of
//! sequences that each feed their uncached tokens (a prompt, or one token), with every
//! sequence's own adapter slot (or none) in the prefix table. The passes, the paged attention
//! and adapters of different lengths are the family-independent part, `crate::lm::paged`
//! ([`step_in_passes`], [`Pass`]). Each sequence's new queries and keys are rotated at its own
//! positions (after its own adapter's prefix) before the keys go into its pages; the prefix
//! table is never rotated.

use super::model::Llama;
use crate::device::{Backend, MatmulOpts};
use crate::error::{Error, Result};
use crate::lm::paged::{step_in_passes, PagedKv, PagedSeq, Pass, PrefixMode, PrefixTable};
use crate::tensor::{DType, Tensor};

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
        step_in_passes(seqs, prefixes, mode, |members, t| {
            self.paged_pass(be, members, t, kv, prefixes, mode)
        })
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
        let mut pass = Pass::new(be, seqs, t, kv, prefixes, mode, c.max_position_embeddings)?;
        if let Some(&bad) = pass.ids.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(Error::index(
                "tokens",
                format!("token {bad} outside the vocabulary 0..{}", c.vocab_size),
            ));
        }
        // Rotary tables at each sequence's own positions (consecutive within a sequence).
        let half = d / 2;
        let (mut cos, mut sin) = (Vec::with_capacity(m * half), Vec::with_capacity(m * half));
        for i in 0..b {
            let (cs, sn) = c.rope_tables(pass.positions[i * t] as usize, t);
            cos.extend(cs);
            sin.extend(sn);
        }
        let cos = be.upload(&Tensor::from_f32(&[b, t, half], &cos, DType::F32)?)?;
        let sin = be.upload(&Tensor::from_f32(&[b, t, half], &sin, DType::F32)?)?;
        let scale = 1.0 / (d as f32).sqrt();
        let eps = c.rms_norm_eps;

        let z = |shape: &[usize]| be.zeros(shape, dt);
        let mut x = z(&[m, e])?;
        be.gather_rows(&w.embed.view(), &pass.ids, &mut x.view_mut())?;
        let mut norm = z(&[m, e])?;
        let mut rstd = be.zeros(&[m], DType::F32)?;
        let (mut q, mut k, mut v) = (z(&[m, qw])?, z(&[m, kw])?, z(&[m, kw])?);
        let mut atty = z(&[m, qw])?;
        let (mut gate, mut up, mut act) = (z(&[m, f])?, z(&[m, f])?, z(&[m, f])?);
        let linear = |x: &Tensor, l: &super::weights::Linear, out: &mut Tensor| -> Result<()> {
            let bias = l.bias.as_ref().map(|b| b.view());
            self.packed.matmul(
                be,
                &x.view(),
                &l.weight,
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
            pass.attend(
                be,
                kv,
                prefixes,
                l,
                &q.view().reshape(&[b, t, hq, d])?,
                &k.view().reshape(&[b, t, hkv, d])?,
                &v.view().reshape(&[b, t, hkv, d])?,
                atty.view_mut().reshape(&[b, t, hq, d])?,
                scale,
            )?;
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
        let last = pass.last_rows();
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
        self.packed.matmul(
            be,
            &nl.view(),
            w.head(),
            None,
            &mut logits.view_mut(),
            MatmulOpts::nt(),
        )?;
        let host = be.download(&logits)?.to_f32_vec();
        Ok(host.chunks(vsz).map(|r| r.to_vec()).collect())
    }
}
