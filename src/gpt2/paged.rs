//! GPT-2 over the engine's paged K/V cache: one model step for a batch of sequences that
//! each feed their uncached tokens (a prompt, or one token), with every sequence's own
//! adapter slot (or none) in the prefix table. The passes, the paged attention and adapters
//! of different lengths are the family-independent part, `crate::lm::paged`
//! ([`step_in_passes`], [`Pass`]); this file is GPT-2's dense part around them.

use super::model::BlockMlpBufs;
use super::Gpt2;
use crate::device::{Backend, MatmulOpts};
use crate::error::Result;
use crate::lm::paged::{step_in_passes, PagedKv, PagedSeq, Pass, PrefixMode, PrefixTable};
use crate::tensor::Tensor;

impl Gpt2 {
    /// One engine step: feeds every sequence's uncached tokens, writes their keys and values
    /// into `kv`, and returns each sequence's last-position logits `[V]`, in order.
    ///
    /// With [`PrefixMode::CopiedIntoCache`] (the naive method, for comparison) a sequence
    /// with an adapter starts with `P` placeholder tokens whose cache rows receive a copy of
    /// its adapter's prefix instead of being computed, and attention runs without a prefix.
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
        let (b, e, h, d) = (seqs.len(), c.n_embd, c.n_head, c.head_dim());
        let m = b * t;
        let dt = self.dtype;
        let mut pass = Pass::new(be, seqs, t, kv, prefixes, mode, c.n_positions)?;
        let scale = if c.scale_attn_weights {
            1.0 / (d as f32).sqrt()
        } else {
            1.0
        };
        let eps = c.layer_norm_epsilon;

        let z = |shape: &[usize]| be.zeros(shape, dt);
        let mut x = z(&[m, e])?;
        let mut pos_emb = z(&[m, e])?;
        be.gather_rows(&w.wte.view(), &pass.ids, &mut x.view_mut())?;
        be.gather_rows(&w.wpe.view(), &pass.positions, &mut pos_emb.view_mut())?;
        be.add_assign(&mut x.view_mut(), &pos_emb.view())?;
        drop(pos_emb);
        let (mut ln, mut qkv, mut q) = (z(&[m, e])?, z(&[m, 3 * e])?, z(&[m, e])?);
        let (mut atty, mut mid, mut fch, mut fcg) = (
            z(&[m, e])?,
            z(&[m, e])?,
            z(&[m, c.n_inner])?,
            z(&[m, c.n_inner])?,
        );
        let mut next = z(&[m, e])?;
        let (mut mean, mut rstd) = (
            be.zeros(&[m], crate::tensor::DType::F32)?,
            be.zeros(&[m], crate::tensor::DType::F32)?,
        );
        for l in 0..c.n_layer {
            self.block_qkv(
                be,
                l,
                &x.view(),
                &mut ln.view_mut(),
                &mut mean.view_mut(),
                &mut rstd.view_mut(),
                &mut qkv.view_mut(),
            )?;
            let qkv_v = qkv.view().reshape(&[b, t, 3, h, d])?;
            be.copy(
                &qkv_v.select(2, 0)?,
                &mut q.view_mut().reshape(&[b, t, h, d])?,
            )?;
            pass.attend(
                be,
                kv,
                prefixes,
                l,
                &q.view().reshape(&[b, t, h, d])?,
                &qkv_v.select(2, 1)?,
                &qkv_v.select(2, 2)?,
                atty.view_mut().reshape(&[b, t, h, d])?,
                scale,
            )?;
            self.block_mlp(
                be,
                l,
                &x.view(),
                &atty.view(),
                BlockMlpBufs {
                    mid: mid.view_mut(),
                    ln: ln.view_mut(),
                    mean: mean.view_mut(),
                    rstd: rstd.view_mut(),
                    fch: fch.view_mut(),
                    fcg: fcg.view_mut(),
                    out: next.view_mut(),
                },
            )?;
            std::mem::swap(&mut x, &mut next);
        }
        // Only the last fed token of each sequence goes through the head.
        let last = pass.last_rows();
        let mut xl = z(&[b, e])?;
        be.gather_rows(&x.view(), &last, &mut xl.view_mut())?;
        let mut lnf = z(&[b, e])?;
        let (mut mean_l, mut rstd_l) = (
            be.zeros(&[b], crate::tensor::DType::F32)?,
            be.zeros(&[b], crate::tensor::DType::F32)?,
        );
        be.layernorm(
            &xl.view(),
            &w.lnf_w.view(),
            &w.lnf_b.view(),
            eps,
            &mut lnf.view_mut(),
            &mut mean_l.view_mut(),
            &mut rstd_l.view_mut(),
        )?;
        let v = c.vocab_size;
        let mut logits: Tensor = z(&[b, v])?;
        self.packed.matmul(
            be,
            &lnf.view(),
            &w.wte,
            None,
            &mut logits.view_mut(),
            MatmulOpts::nt(),
        )?;
        let host = be.download(&logits)?.to_f32_vec();
        Ok(host.chunks(v).map(|r| r.to_vec()).collect())
    }
}
