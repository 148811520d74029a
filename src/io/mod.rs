//! Everything magictailor reads from or writes to disk besides model folders: atomic
//! writes, PNG bytes, safetensors, pseudo-word embeddings, checkpoints, and the layout of
//! a training run's output folder. `train` writes through here and `infer` reads through
//! here; neither knows the other.
//!
//! May import only `error`: every other module may import it.

mod atomic;
pub mod checkpoint;
pub mod console;
pub mod embeds;
pub mod leftovers;
pub mod lock;
pub mod png;
pub mod progress;
pub mod run;
pub mod tensors;
pub mod ticker;

pub use atomic::write_atomic;
