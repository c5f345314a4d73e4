//! Argument checks shared by every backend's dense operations, so that each device refuses
//! the same inputs with the same message.

use crate::error::{Error, Result};

/// `[rows, cols]` of a 2-D view.
pub(crate) fn dims2(arg: &str, dims: &[usize]) -> Result<(usize, usize)> {
    match dims {
        [r, c] => Ok((*r, *c)),
        _ => Err(Error::shape(arg, "rank 2 [rows, cols]", dims)),
    }
}

/// `got == want`, or a shape error naming `arg`.
pub(crate) fn same_shape(arg: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(Error::shape(arg, format!("{want:?}"), got));
    }
    Ok(())
}

/// Every row index in `0..m`.
pub(crate) fn rows_in_range(rows: &[i32], m: usize) -> Result<()> {
    match rows.iter().find(|&&r| r < 0 || r as usize >= m) {
        Some(r) => Err(Error::index("rows", format!("row {r} outside 0..{m}"))),
        None => Ok(()),
    }
}

/// The arguments of `Backend::embed`; returns the width `C`.
pub(crate) fn embed_args(
    ids: &[i32],
    seq_len: usize,
    wte: &[usize],
    wpe: &[usize],
    pos_offset: usize,
    out: &[usize],
) -> Result<usize> {
    let (vocab, c) = dims2("wte", wte)?;
    let (npos, c2) = dims2("wpe", wpe)?;
    if c2 != c {
        return Err(Error::shape("wpe", format!("[n_positions, {c}]"), wpe));
    }
    same_shape("embed out", out, &[ids.len(), c])?;
    if seq_len == 0 || ids.len() % seq_len != 0 {
        return Err(Error::shape(
            "ids",
            format!("a multiple of the sequence length {seq_len}"),
            &[ids.len()],
        ));
    }
    if pos_offset + seq_len > npos {
        return Err(Error::index(
            "positions",
            format!(
                "positions {pos_offset}..{} exceed n_positions = {npos}",
                pos_offset + seq_len
            ),
        ));
    }
    if let Some((i, id)) = ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id < 0 || id as usize >= vocab)
    {
        return Err(Error::index(
            "ids",
            format!("token id {id} at {i} is outside the vocabulary 0..{vocab}"),
        ));
    }
    Ok(c)
}

/// The arguments of `Backend::cross_entropy` (without the gradient buffer); returns
/// `(rows, vocab)`.
pub(crate) fn cross_entropy_args(
    logits: &[usize],
    targets: &[i32],
    losses: &[usize],
) -> Result<(usize, usize)> {
    let (m, v) = dims2("logits", logits)?;
    if targets.len() != m {
        return Err(Error::shape(
            "targets",
            format!("[{m}] like the logits rows"),
            &[targets.len()],
        ));
    }
    same_shape("losses", losses, &[m])?;
    if let Some((i, t)) = targets
        .iter()
        .enumerate()
        .find(|(_, &t)| t != -100 && (t < 0 || t as usize >= v))
    {
        return Err(Error::index(
            "labels",
            format!("label {t} at {i} is outside the vocabulary 0..{v} (and not -100)"),
        ));
    }
    Ok((m, v))
}
