//! Tensor handles and views.
// Index arithmetic below spells out every term of the row-major formula.
#![allow(clippy::identity_op)]

use half::{bf16, f16};
use prefix_attn::rng::Rng;
use prefix_attn::tensor::{DType, Layout, Tensor};

#[test]
fn round_trips_every_dtype() {
    let vals = Rng::new(2).normal_vec(37, 3.0);
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let t = Tensor::from_f32(&[37], &vals, dt).unwrap();
        let back = t.to_f32_vec();
        for (a, b) in vals.iter().zip(&back) {
            assert_eq!(dt.round_f32(*a), *b);
        }
    }
    let h = Tensor::from_slice(&[2], &[f16::from_f32(1.5), f16::from_f32(-2.0)]).unwrap();
    assert_eq!(h.to_f32_vec(), vec![1.5, -2.0]);
    let b = Tensor::from_slice(&[1], &[bf16::from_f32(3.0)]).unwrap();
    assert_eq!(b.as_slice::<bf16>().unwrap()[0].to_f32(), 3.0);
    assert!(b.as_slice::<f16>().is_err());
}

#[test]
fn gpt2_qkv_views_address_the_right_elements() {
    // qkv [B=2, T=3, 3, H=2, D=4], value = its own linear index.
    let n = 2 * 3 * 3 * 2 * 4;
    let vals: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let qkv = Tensor::from_f32(&[2, 3, 3, 2, 4], &vals, DType::F32).unwrap();
    let k = qkv.view().select(2, 1).unwrap();
    assert_eq!(k.dims(), &[2, 3, 2, 4]);
    assert_eq!(k.strides(), &[72, 24, 4, 1]);
    // k[b=1, t=2, h=1, d=3] = qkv[1, 2, 1, 1, 3]
    let want = (((1 * 3 + 2) * 3 + 1) * 2 + 1) * 4 + 3;
    assert_eq!(k.get_f64(&[1, 2, 1, 3]).unwrap(), want as f64);
    let mut all = vec![0f32; k.numel()];
    k.gather_f32(&mut all).unwrap();
    assert_eq!(all[all.len() - 1], want as f32);
}

#[test]
fn peft_prefix_layer_views() {
    // PEFT prompt embeddings [P=3, L*2*C] with L=2, H=2, D=4 -> [P, L, 2, H, D].
    let (p, l, h, d) = (3, 2, 2, 4);
    let vals: Vec<f32> = (0..p * l * 2 * h * d).map(|i| i as f32).collect();
    let t = Tensor::from_f32(&[p, l * 2 * h * d], &vals, DType::F32).unwrap();
    let v = t.view().reshape(&[p, l, 2, h, d]).unwrap();
    let v_pre = v
        .select(1, 1)
        .unwrap()
        .select(1, 1)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    assert_eq!(v_pre.dims(), &[1, p, h, d]);
    // v_pre[0, j=2, h=1, d=0] = row 2, layer 1, v, head 1.
    let want = 2 * (l * 2 * h * d) + ((1 * 2 + 1) * h + 1) * d;
    assert_eq!(v_pre.get_f64(&[0, 2, 1, 0]).unwrap(), want as f64);
}

#[test]
fn unbind_gives_disjoint_writable_views() {
    let mut g = Tensor::zeros(&[2, 3, 3, 2, 4], DType::F16).unwrap();
    {
        let parts = g.view_mut().unbind(2).unwrap();
        for (i, mut p) in parts.into_iter().enumerate() {
            p.fill(i as f32 + 1.0).unwrap();
        }
    }
    let v = g.to_f32_vec();
    for (idx, x) in v.iter().enumerate() {
        let which = (idx / (2 * 4)) % 3;
        assert_eq!(*x, which as f32 + 1.0);
    }
}

#[test]
fn layout_helpers() {
    let l = Layout::contiguous(&[2, 3, 4]).unwrap();
    assert!(l.is_contiguous());
    assert_eq!(l.span(), 24);
    let s = l.select(1, 2).unwrap();
    assert_eq!(
        (s.dims(), s.strides(), s.offset()),
        (&[2, 4][..], &[12, 1][..], 8)
    );
    assert!(!s.is_contiguous());
    let u = s.unsqueeze(1).unwrap();
    assert_eq!(u.dims(), &[2, 1, 4]);
    assert_eq!(u.index(&[1, 0, 3]), 8 + 12 + 3);
    let n = l.narrow(2, 1, 2).unwrap();
    assert_eq!(n.index(&[0, 0, 0]), 1);
    assert!(Layout::new(&[usize::MAX, 2], &[2, 1], 0).is_err());
}
