//! The probe that records cross-attention probabilities for MagicTailor's attention
//! loss, and the block kinds it selects by. Apart from `attention.rs` so that `nn.rs`
//! (whose `Ctx` carries a probe) and `attention.rs` (which uses `nn`) do not import
//! each other.

use std::cell::RefCell;

use candle_core::Tensor;

/// Which block a transformer sits in; the attention loss averages down and up, not mid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    Down,
    Mid,
    Up,
}

/// Records head-averaged cross-attention probabilities `[batch, queries, keys]` of every
/// cross-attention layer whose query grid is one of `sides` (`side x side`), in the chosen
/// block kinds. Recorded maps stay in the graph, so a loss on them trains q/k adapters
/// and tokens.
pub struct AttnProbe {
    pub sides: Vec<usize>,
    pub kinds: Vec<BlockKind>,
    /// The query counts recorded (`side * side` for each side, or any grid's `h * w`).
    queries: Vec<usize>,
    maps: RefCell<Vec<(String, Tensor)>>,
}

impl AttnProbe {
    pub fn new(sides: &[usize], kinds: &[BlockKind]) -> Self {
        Self {
            sides: sides.to_vec(),
            kinds: kinds.to_vec(),
            queries: sides.iter().map(|s| s * s).collect(),
            maps: RefCell::new(Vec::new()),
        }
    }
    /// Records the layers with `queries` queries (grids that need not be square).
    pub fn for_queries(queries: &[usize], kinds: &[BlockKind]) -> Self {
        Self {
            queries: queries.to_vec(),
            ..Self::new(&[], kinds)
        }
    }
    pub(crate) fn wants(&self, kind: BlockKind, queries: usize) -> bool {
        self.kinds.contains(&kind) && self.queries.contains(&queries)
    }
    pub(crate) fn record(&self, path: &str, probs: Tensor) {
        self.maps.borrow_mut().push((path.to_string(), probs));
    }
    /// Takes the recorded maps, in forward order, named by module path.
    pub fn take(&self) -> Vec<(String, Tensor)> {
        std::mem::take(&mut *self.maps.borrow_mut())
    }
}
