//! CPU versions of the paged kernels, in f32 arithmetic whatever the storage
//! dtype. They define the functions the CUDA kernels must match.

use candle_core::WithDType;

use super::ops::{HeadShape, PagedAttention};

/// Head vector `x` with its first `rot` channels rotated (rotate-half) for
/// position `pos`, as f32. The angles are computed as the rotary table is.
fn rope<T: WithDType>(x: &[T], rot: usize, base: f32, pos: u32, out: &mut [f32]) {
    let half = rot / 2;
    for (o, v) in out.iter_mut().zip(x) {
        *o = v.to_f64() as f32;
    }
    for i in 0..half {
        let inv_freq = 1.0 / base.powf((2 * i) as f32 / rot as f32);
        let a = pos as f32 * inv_freq;
        let (s, c) = (a.sin(), a.cos());
        let (x1, x2) = (x[i].to_f64() as f32, x[i + half].to_f64() as f32);
        out[i] = x1 * c - x2 * s;
        out[i + half] = x2 * c + x1 * s;
    }
}

pub(super) fn kv_write<T: WithDType>(s: &HeadShape, pool: &mut [T], qkv: &[T], index: &[u32]) {
    let (h, hd) = (s.heads, s.head_dim);
    let n = qkv.len() / (3 * h * hd);
    let mut k = vec![0f32; hd];
    for i in 0..n {
        let (slot, pos) = (index[3 * i] as usize, index[3 * i + 1]);
        for head in 0..h {
            let src = (i * h + head) * 3 * hd;
            rope(&qkv[src + hd..src + 2 * hd], s.rot, s.rope_base, pos, &mut k);
            let dst = (slot * 2 * h + head) * hd;
            for c in 0..hd {
                pool[dst + c] = T::from_f64(k[c] as f64);
            }
            pool[dst + h * hd..dst + h * hd + hd].copy_from_slice(&qkv[src + 2 * hd..src + 3 * hd]);
        }
    }
}

pub(super) fn attend<T: WithDType>(op: &PagedAttention, qkv: &[T], pool: &[T], index: &[u32]) -> Vec<T> {
    let (h, hd) = (op.shape.heads, op.shape.head_dim);
    let n = op.tokens;
    let mut out = vec![T::zero(); n * h * hd];
    let mut q = vec![0f32; hd];
    let mut scores = vec![0f32; op.max_keys];
    let mut acc = vec![0f32; hd];
    for i in 0..n {
        let (pos, row) = (index[3 * i + 1] as usize, index[3 * i + 2] as usize);
        let table = &index[3 * n + row * op.max_pages..3 * n + (row + 1) * op.max_pages];
        let slot = |key: usize| table[key / op.page_size] as usize * op.page_size + key % op.page_size;
        for head in 0..h {
            let src = (i * h + head) * 3 * hd;
            rope(&qkv[src..src + hd], op.shape.rot, op.shape.rope_base, pos as u32, &mut q);
            let mut max = f32::NEG_INFINITY;
            for (key, sc) in scores.iter_mut().enumerate().take(pos + 1) {
                let k = &pool[(slot(key) * 2 * h + head) * hd..][..hd];
                *sc = q.iter().zip(k).map(|(a, b)| a * b.to_f64() as f32).sum::<f32>() * op.scale;
                max = max.max(*sc);
            }
            acc.iter_mut().for_each(|a| *a = 0.0);
            let mut total = 0f32;
            for (key, sc) in scores.iter().enumerate().take(pos + 1) {
                let p = (sc - max).exp();
                total += p;
                let v = &pool[((slot(key) * 2 + 1) * h + head) * hd..][..hd];
                for (a, x) in acc.iter_mut().zip(v) {
                    *a += p * x.to_f64() as f32;
                }
            }
            let o = &mut out[(i * h + head) * hd..][..hd];
            for (o, a) in o.iter_mut().zip(&acc) {
                *o = T::from_f64((a / total) as f64);
            }
        }
    }
    out
}
