//! Key/value caches, owned by the caller.
//!
//! A [`KvCache`] holds every layer's keys and values for a group of sequences that
//! share one length: a single session of the block decoder or vanilla LM, or a
//! block-synchronous batch of the token decoder. Storage is preallocated with spare
//! capacity and written in place, so appending one position never copies the
//! history; it grows geometrically when full.

use candle_core::Tensor;

use crate::error::Result;

/// Keys and values of one layer: `[batch, heads, capacity, head_dim]`, of which
/// the first `len` positions are filled.
#[derive(Debug, Clone)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

/// Not `Clone`: tensors share storage and appends write in place, so a shallow
/// copy would alias. Use [`KvCache::deep_clone`] to fork a cache.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
    /// Capacity to allocate on first use; later growth doubles it.
    initial_capacity: usize,
    /// Hard upper bound on `len` (position table size or the local window).
    max_len: usize,
}

impl KvCache {
    /// An empty cache for `num_layers` layers that may grow to `max_len` positions,
    /// first allocating room for `initial_capacity` of them.
    pub fn new(num_layers: usize, initial_capacity: usize, max_len: usize) -> Self {
        Self { layers: vec![None; num_layers], len: 0, initial_capacity: initial_capacity.min(max_len).max(1), max_len }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Append `k`, `v` (`[batch, heads, t, head_dim]`) to `layer` and return views of
    /// the whole history `[batch, heads, len + t, head_dim]`. The cache length
    /// advances once the last layer has been appended to.
    pub(crate) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let need = self.len + t;
        if need > self.max_len {
            return Err(crate::error::ModelError::Input(format!(
                "sequence of {need} positions exceeds the cache limit of {}",
                self.max_len
            )));
        }
        let len = self.len;
        self.reserve(layer, need, len, k, v)?;
        let l = self.layers[layer].as_ref().expect("reserved above");
        l.k.slice_set(&k.contiguous()?, 2, len)?;
        l.v.slice_set(&v.contiguous()?, 2, len)?;
        let out = (l.k.narrow(2, 0, need)?, l.v.narrow(2, 0, need)?);
        if layer + 1 == self.layers.len() {
            self.len = need;
        }
        Ok(out)
    }

    /// Make `layer`'s storage hold at least `need` positions, keeping the first
    /// `keep`; shaped like `k`/`v` when first allocated. Grows geometrically.
    fn reserve(&mut self, layer: usize, need: usize, keep: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let slot = &mut self.layers[layer];
        let cap = slot.as_ref().map_or(0, |l| l.k.dim(2).unwrap_or(0));
        if need <= cap {
            return Ok(());
        }
        let new_cap = need.max(2 * cap).max(self.initial_capacity).min(self.max_len.max(need));
        let grow = |old: Option<&Tensor>, like: &Tensor| -> Result<Tensor> {
            let (b, h, _, d) = like.dims4()?;
            let buf = Tensor::zeros((b, h, new_cap, d), like.dtype(), like.device())?;
            if let Some(old) = old {
                let keep = keep.min(old.dim(2)?);
                if keep > 0 {
                    buf.slice_set(&old.narrow(2, 0, keep)?.contiguous()?, 2, 0)?;
                }
            }
            Ok(buf)
        };
        let nk = grow(slot.as_ref().map(|l| &l.k), k)?;
        let nv = grow(slot.as_ref().map(|l| &l.v), v)?;
        *slot = Some(LayerKv { k: nk, v: nv });
        Ok(())
    }

    /// `layer`'s keys and values over the first `width` positions, which may run
    /// past the filled length (into zeroed or stale-but-finite storage that the
    /// caller masks out). Lets rows of different lengths be batched as one tensor.
    pub(crate) fn padded(&mut self, layer: usize, width: usize) -> Result<(Tensor, Tensor)> {
        let (k, v) = match &self.layers[layer] {
            Some(l) => (l.k.clone(), l.v.clone()),
            None => return Err(crate::error::ModelError::Input("padded view of an empty cache".into())),
        };
        // Keep all storage: this layer may already hold a position past `len`.
        let cap = k.dim(2)?;
        self.reserve(layer, width, cap, &k, &v)?;
        let l = self.layers[layer].as_ref().expect("reserved above");
        Ok((l.k.narrow(2, 0, width)?, l.v.narrow(2, 0, width)?))
    }

    /// An independent copy (e.g. to fork a shared prompt prefix).
    pub fn deep_clone(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| l.as_ref().map(|l| Ok::<_, crate::error::ModelError>(LayerKv { k: l.k.copy()?, v: l.v.copy()? })).transpose())
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers, len: self.len, initial_capacity: self.initial_capacity, max_len: self.max_len })
    }

    /// Forget every position from `len` on (the storage stays allocated).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}
